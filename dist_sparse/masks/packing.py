"""Bit-packing of boolean masks: 8 weights per byte, least significant bit first.

A 90%-sparse model keeps one bit per weight for its mask instead of a byte (torch.bool) or four (float masks);
this is what `state_bytes_per_rank` counts for masks.
"""

import torch

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def packed_nbytes(numel: int) -> int:
    """Bytes needed to store ``numel`` mask bits."""
    return (int(numel) + 7) // 8


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor (any shape, read flat) into a uint8 tensor of ``ceil(numel / 8)`` bytes."""
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_bits expects a torch.bool tensor, got {mask.dtype}")
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(-1, 8).to(torch.uint8)
    return (bits * _BIT_WEIGHTS.to(bits.device)).sum(dim=1, dtype=torch.uint8)


# Byte value -> its 8 bits as 8 bool bytes (bit 0 first), stored as one int64 per byte value: unpacking is then one
# gather of 8-byte words, whose result is viewed back as bools. Measured 14x faster than testing every bit
# (0.37 vs 5.3 ms for 4M weights, one thread); compact state unpacks a tensor's mask on every step.
_UNPACK_TABLES: dict = {}


def _unpack_table(device: torch.device) -> torch.Tensor:
    key = str(device)
    table = _UNPACK_TABLES.get(key)
    if table is None:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1  # [byte value, bit]
        table = _UNPACK_TABLES[key] = bits.to(torch.uint8).contiguous().view(torch.int64).reshape(256).to(device)
    return table


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a flat boolean tensor of ``numel`` elements."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_bits expects a torch.uint8 tensor, got {packed.dtype}")
    if packed.numel() != packed_nbytes(numel):
        raise ValueError(f"{packed.numel()} packed bytes cannot hold exactly {numel} bits")
    words = _unpack_table(packed.device).index_select(0, packed.reshape(-1).to(torch.int32))
    return words.view(torch.bool)[:numel]
