"""Replicate sharded masks: every rank gets the *full* mask of every parameter, kept bit-packed.

A rank stores only the mask bits of its own range of each parameter (``mask_start``/``mask_len`` of the
sparsifier's views). A sender that selects coordinates of its *full local gradient* (gradient compression, the
packed reduction of compact state) must know the whole mask, identically on every rank. One all-gather of every
rank's packed bits (plus one of its ranges) assembles them; the result stays packed, 1 bit per weight.
"""

import torch

from dist_sparse import distributed as D
from dist_sparse.masks.packing import pack_bits, packed_nbytes, unpack_bits


def gather_full_masks(views: list, packed: dict, group=None, device=None) -> tuple:
    """``(masks, handed_bytes)``: name -> (packed bits of the full mask, numel) for every view, on ``device``, and
    the bytes this rank handed to the collectives (ranges, length, padded bits). ``packed`` maps a view's name to
    this rank's packed bits of ``[mask_start, mask_start + mask_len)``; the ranks' ranges must tile each
    parameter (ZeRO-1/2 fragments, ZeRO-3 shards). A collective: every rank calls it with the same views."""
    if not views:
        return {}, 0
    device = torch.device("cpu") if device is None else torch.device(device)
    ranges = torch.tensor([[v.mask_start, v.mask_len] for v in views], dtype=torch.int64, device=device)
    mine = torch.cat([packed[v.name].to(device) for v in views])
    all_ranges = [r.tolist() for r in D.all_gather_equal(ranges, group)]
    all_bits = D.all_gather_varlen(mine, group)
    # int64 ranges, the int64 length all_gather_varlen sends first, then the bits padded to the longest
    handed = ranges.numel() * 8 + 8 + max(b.numel() for b in all_bits)
    cursor = [0] * len(all_bits)  # per rank: where its next view's bytes start
    out = {}
    for k, v in enumerate(views):
        full = torch.zeros(v.numel, dtype=torch.bool, device=device)
        for r, bits in enumerate(all_bits):
            start, length = all_ranges[r][k]
            nbytes = packed_nbytes(length)
            if length:
                full[start: start + length] = unpack_bits(bits[cursor[r]: cursor[r] + nbytes], length)
            cursor[r] += nbytes
        out[v.name] = (pack_bits(full), v.numel)
    return out, handed
