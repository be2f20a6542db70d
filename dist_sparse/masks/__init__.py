"""Mask storage: bit-packing (1 bit per weight), mask files, exact distributed top-k selection."""

from dist_sparse.masks.io import load_masks, save_masks
from dist_sparse.masks.packing import pack_bits, packed_nbytes, unpack_bits

__all__ = ["pack_bits", "unpack_bits", "packed_nbytes", "save_masks", "load_masks"]
