"""Compact (packed) storage of training state for active weights only; see docs/memory.md."""

from dist_sparse.compact.packed import Fragment, PackedPartition

__all__ = ["Fragment", "PackedPartition"]
