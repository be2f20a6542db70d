"""Packed (compact) storage of one rank's flat ZeRO partition: values only where the mask is set.

A rank's partition of one optimizer group is a flat range holding *fragments* of several parameters (some
sparsified, some not). :class:`PackedPartition` describes that layout and moves values between the dense form
(what DeepSpeed and the checkpoint format see) and the packed form (what is stored): fragment after fragment, the
active positions of each in increasing order, so a fragment's packed values sit at ``[offsets[k], offsets[k+1])``
and their positions are exactly the set bits of its mask. Nothing else addresses them: no index tensors are kept,
the bit-packed masks the sparsifier already stores are the index.

Dense (non-sparsified) fragments have every position active (``mask is None``). Positions of the partition that
belong to no fragment (DeepSpeed's alignment padding) are not stored at all.

This module knows nothing about DeepSpeed; :mod:`dist_sparse.integration.compact_zero` maps DeepSpeed's buffers
onto it.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Fragment:
    """The part of parameter ``name`` held in this partition: partition positions ``[start, start + length)``,
    which are the parameter's flat positions ``[param_start, param_start + length)``."""

    name: str
    start: int
    length: int
    param_start: int
    sparse: bool  # True: positions are addressed by the sparsifier's mask; False: all active


class PackedPartition:
    """The layout of one rank's partition of one optimizer group, packed by the current masks.

    ``mask_of(name)`` returns the bool mask (length = the fragment's length) of a sparsified fragment; the layout
    (``offsets``) is recomputed by :meth:`relayout` whenever the masks change.
    """

    def __init__(self, fragments: list, mask_of: Callable[[str], torch.Tensor]):
        self.fragments = list(fragments)
        self.mask_of = mask_of
        self.index = {f.name: k for k, f in enumerate(self.fragments)}
        self.offsets = self._offsets(self.masks())

    # -- layout ------------------------------------------------------------------------------------------------
    def masks(self) -> list:
        """The current mask of every fragment (None for a dense fragment)."""
        out = []
        for f in self.fragments:
            if not f.sparse:
                out.append(None)
                continue
            m = self.mask_of(f.name).reshape(-1)
            if m.numel() != f.length:
                raise ValueError(f"mask of {f.name} has {m.numel()} bits, its fragment {f.length} positions")
            out.append(m)
        return out

    def _offsets(self, masks: list) -> list:
        offsets = [0]
        for f, m in zip(self.fragments, masks):
            offsets.append(offsets[-1] + (f.length if m is None else int(m.sum())))
        return offsets

    @property
    def numel(self) -> int:
        """Number of packed (active) values."""
        return self.offsets[-1]

    def relayout(self, masks: list | None = None) -> None:
        self.offsets = self._offsets(self.masks() if masks is None else masks)

    def slice(self, packed: torch.Tensor, name: str) -> torch.Tensor:
        """The packed values of one fragment (a view)."""
        k = self.index[name]
        return packed.narrow(0, self.offsets[k], self.offsets[k + 1] - self.offsets[k])

    # -- dense <-> packed --------------------------------------------------------------------------------------
    @staticmethod
    def pack_fragment(dense: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        dense = dense.reshape(-1)
        return dense if mask is None else dense[mask.to(dense.device)]

    @staticmethod
    def unpack_fragment(values: torch.Tensor, mask: torch.Tensor | None, dtype=None) -> torch.Tensor:
        """Dense values of a fragment: packed values at the mask's set positions, exact zeros elsewhere."""
        dtype = dtype or values.dtype
        if mask is None:
            return values.to(dtype).clone()
        out = torch.zeros(mask.numel(), dtype=dtype, device=values.device)
        out.masked_scatter_(mask.to(values.device), values.to(dtype))
        return out

    def pack(self, dense_of: Callable[[int], torch.Tensor], masks: list, dtype: torch.dtype,
             device=None) -> torch.Tensor:
        """One packed tensor from the dense fragments ``dense_of(k)`` (a new tensor, laid out by ``masks``)."""
        offsets = self._offsets(masks)
        out = torch.empty(offsets[-1], dtype=dtype, device=device)
        for k, m in enumerate(masks):
            if offsets[k + 1] > offsets[k]:
                out.narrow(0, offsets[k], offsets[k + 1] - offsets[k]).copy_(self.pack_fragment(dense_of(k), m))
        return out

    def unpack(self, packed: torch.Tensor, name: str, mask: torch.Tensor | None = None, dtype=None) -> torch.Tensor:
        """The dense values of fragment ``name`` (laid out by the current masks unless ``mask`` is given)."""
        k = self.index[name]
        if mask is None and self.fragments[k].sparse:
            mask = self.mask_of(name).reshape(-1)
        return self.unpack_fragment(self.slice(packed, name), mask, dtype)

    def repack(self, packed: torch.Tensor, old_masks: list, new_masks: list) -> torch.Tensor:
        """Move packed values from the ``old_masks`` layout to ``new_masks``: positions active in both keep their
        value exactly, newly active ones start at 0, ones no longer active are dropped. Works fragment by
        fragment, so the dense transient is one fragment at a time."""
        old_offsets = self._offsets(old_masks)

        def dense_of(k):
            values = packed.narrow(0, old_offsets[k], old_offsets[k + 1] - old_offsets[k])
            return self.unpack_fragment(values, old_masks[k])

        return self.pack(dense_of, new_masks, packed.dtype, packed.device)

    def scatter_into(self, packed: torch.Tensor, target: torch.Tensor, masks: list, keep: dict | None = None) -> None:
        """Write packed values into a dense partition tensor (any dtype): inactive positions become exactly 0,
        except those of ``keep`` (name -> bool mask over the fragment: positions not packed whose value the target
        itself holds, frozen weights) which are left as they are."""
        for k, (f, m) in enumerate(zip(self.fragments, masks)):
            dst = target.narrow(0, f.start, f.length)
            values = packed.narrow(0, self.offsets[k], self.offsets[k + 1] - self.offsets[k])
            kept = None if keep is None else keep.get(f.name)
            if m is None:
                dst.copy_(values)
            elif kept is None:
                dst.zero_()
                dst.masked_scatter_(m.to(dst.device), values.to(dst.dtype))
            else:
                dst.masked_fill_(~(m | kept).to(dst.device), 0)
                dst.masked_scatter_(m.to(dst.device), values.to(dst.dtype))
