"""Counter-based random numbers: a value per (seed, stream, global index), the same on any number of ranks.

Random masks (``static``, the initial masks of SET/RigL) and SET's random regrowth must not depend on how a tensor
is sharded, so we cannot draw from a per-rank generator. Instead each element's value is a hash of its global index
(the "lowbias32"-style integer mixer, kept inside 60 bits so int64 arithmetic never overflows).
"""

import torch

_M32 = 0xFFFFFFFF
_MUL = 0x045D9F3B


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = ((x >> 16) ^ x) * _MUL & _M32
    x = ((x >> 16) ^ x) * _MUL & _M32
    return (x >> 16) ^ x


def uniform(seed: int, stream: int, start: int, length: int, device=None) -> torch.Tensor:
    """Floats in [0, 1) for global indices ``start .. start + length - 1`` of stream ``stream``."""
    idx = torch.arange(start, start + length, dtype=torch.int64, device=device)
    key = _mix(torch.tensor((seed * 1_000_003 + stream * 7919) & _M32, dtype=torch.int64))
    x = _mix((idx & _M32) ^ key)
    x = _mix(x ^ ((idx >> 32) & _M32) ^ (key >> 3))
    return (x >> 8).to(torch.float32) / float(1 << 24)
