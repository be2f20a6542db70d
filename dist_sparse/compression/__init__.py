"""Sparse gradient compression with error feedback (docs/compression.md).

- :mod:`.base`: the compressor interface and registry; :mod:`.topk`, :mod:`.randomk`, :mod:`.threshold`.
- :mod:`.feedback`: per-rank residuals (Stich et al. 2018), DGC momentum correction and warm-up (Lin et al. 2018).
- :mod:`.exchange`: the bucketed all-gather of indices + values, byte accounting.
- :mod:`.gradient`: one boundary's exchange for tensors keyed by name.

The DeepSpeed side (where the local gradients come from, where the averages go) is
:mod:`dist_sparse.integration.ds_compression`.
"""

from dist_sparse.compression import randomk, threshold, topk  # noqa: F401  (register the compressors)
from dist_sparse.compression.base import COMPRESSORS, Compressor, keep_count, register
from dist_sparse.compression.exchange import Outgoing, SparseExchange
from dist_sparse.compression.feedback import ErrorFeedback
from dist_sparse.compression.gradient import GradientCompression

__all__ = ["COMPRESSORS", "Compressor", "ErrorFeedback", "GradientCompression", "Outgoing", "SparseExchange",
           "keep_count", "register"]
