"""Block layouts: boolean ``(heads or 1, n_blocks, n_blocks)`` masks, ``layout[h, i, j]`` = query block i attends key
block j.

Every builder returns a 3-D bool tensor on the CPU; layouts compose with :func:`union`. With ``causal=True`` a builder
drops the blocks above the diagonal (the kernels skip them anyway under causal attention, but a causal layout gives
honest densities and lets ``bigbird`` spend its random blocks on the past). Causal masking *inside* diagonal blocks
is the kernel's job (``causal=True`` in :func:`dist_sparse.attention.block_sparse_attention`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "LAYOUT_TYPES",
    "bigbird_layout",
    "build_layout",
    "dense_layout",
    "from_mask",
    "global_layout",
    "layout_density",
    "local_layout",
    "strided_layout",
    "union",
]


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _finish(layout: torch.Tensor, causal: bool) -> torch.Tensor:
    if causal:
        layout = layout & torch.ones(layout.shape[-2:], dtype=torch.bool).tril()
    return layout if layout.dim() == 3 else layout.unsqueeze(0)


def dense_layout(num_blocks: int, *, causal: bool = False) -> torch.Tensor:
    """Every block active: block-sparse attention then equals ordinary (causal) attention. Useful as a baseline."""
    _check_int("num_blocks", num_blocks, 1)
    return _finish(torch.ones(num_blocks, num_blocks, dtype=torch.bool), causal)


def local_layout(num_blocks: int, window: int = 1, *, causal: bool = False) -> torch.Tensor:
    """Sliding window: block i attends blocks j with ``|i - j| <= window`` (``0 <= i - j <= window`` if causal)."""
    _check_int("num_blocks", num_blocks, 1)
    _check_int("window", window, 0)
    idx = torch.arange(num_blocks)
    return _finish((idx[:, None] - idx[None, :]).abs() <= window, causal)


def _block_indices(name: str, blocks: int | Sequence[int], num_blocks: int) -> list[int]:
    if isinstance(blocks, int) and not isinstance(blocks, bool):
        blocks = [blocks]
    out = []
    for b in blocks:
        if isinstance(b, bool) or not isinstance(b, int):
            raise TypeError(f"{name} must hold ints, got {type(b).__name__}")
        if not -num_blocks <= b < num_blocks:
            raise ValueError(f"{name}: block index {b} is outside [-{num_blocks}, {num_blocks})")
        out.append(b % num_blocks)
    return out


def global_layout(num_blocks: int, blocks: int | Sequence[int] = (0,), *, causal: bool = False) -> torch.Tensor:
    """Global blocks (negative indices count from the end) attend every block and are attended by every block."""
    _check_int("num_blocks", num_blocks, 1)
    sel = _block_indices("blocks", blocks, num_blocks)
    layout = torch.zeros(num_blocks, num_blocks, dtype=torch.bool)
    layout[sel, :] = True
    layout[:, sel] = True
    return _finish(layout, causal)


def strided_layout(num_blocks: int, stride: int, summary: int = 1, *, causal: bool = False) -> torch.Tensor:
    """The "fixed" pattern of the Sparse Transformer (Child et al., 2019), in blocks.

    Block i attends every block of its own chunk of ``stride`` blocks, and the last ``summary`` blocks of every chunk,
    which act as summaries that all later chunks can read.
    """
    _check_int("num_blocks", num_blocks, 1)
    _check_int("stride", stride, 1)
    _check_int("summary", summary, 1)
    if summary > stride:
        raise ValueError(f"summary must be <= stride ({stride}), got {summary}")
    idx = torch.arange(num_blocks)
    same_chunk = (idx[:, None] // stride) == (idx[None, :] // stride)
    summary_col = (idx % stride) >= (stride - summary)
    return _finish(same_chunk | summary_col[None, :], causal)


def bigbird_layout(
    num_blocks: int,
    window: int = 1,
    num_global: int = 1,
    num_random: int = 2,
    *,
    seed: int = 0,
    num_heads: int = 1,
    causal: bool = False,
) -> torch.Tensor:
    """BigBird (Zaheer et al., 2020): sliding window + the first ``num_global`` blocks as global + ``num_random``
    random key blocks per query-block row, drawn among the blocks not already active (per head when ``num_heads > 1``).

    The random blocks come from a ``torch.Generator`` seeded with ``seed``: the same arguments give the same layout on
    every rank and every run, which data-parallel training needs.
    """
    _check_int("num_global", num_global, 0)
    _check_int("num_random", num_random, 0)
    _check_int("num_heads", num_heads, 1)
    _check_int("seed", seed, 0)
    if num_global > num_blocks:
        raise ValueError(f"num_global must be <= num_blocks ({num_blocks}), got {num_global}")
    base = local_layout(num_blocks, window, causal=causal)
    if num_global:
        base = base | global_layout(num_blocks, list(range(num_global)), causal=causal)
    layout = base.expand(num_heads, num_blocks, num_blocks).clone()
    if num_random:
        gen = torch.Generator().manual_seed(seed)
        scores = torch.rand(num_heads, num_blocks, num_blocks, generator=gen)
        candidate = ~layout
        if causal:
            candidate &= torch.ones(num_blocks, num_blocks, dtype=torch.bool).tril()
        scores = scores.masked_fill(~candidate, -1.0)
        top, idx = scores.topk(min(num_random, num_blocks), dim=-1)
        # Rows with fewer candidates than num_random pick up "-1" entries: drop those.
        picked = torch.zeros_like(layout).scatter_(-1, idx, top >= 0)
        layout |= picked
    return layout


def from_mask(mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block-reduce any token mask ``(seq, seq)`` or ``(heads, seq, seq)``: a block is active if any entry in it is.

    The kernels then compute whole blocks; pass the token mask as ``attn_mask`` as well if the exact token pattern
    matters (the block layout alone is a superset of it). Seq lengths that are not a multiple of ``block_size`` are
    padded with inactive entries.
    """
    _check_int("block_size", block_size, 1)
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 3) or mask.shape[-1] != mask.shape[-2]:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a square (seq, seq) or (heads, seq, seq) tensor, got {shape}")
    m = mask.to(torch.bool)
    if m.dim() == 2:
        m = m.unsqueeze(0)
    seq = m.shape[-1]
    nb = -(-seq // block_size)
    pad = nb * block_size - seq
    if pad:
        m = torch.nn.functional.pad(m, (0, pad, 0, pad))
    return m.reshape(m.shape[0], nb, block_size, nb, block_size).any(dim=4).any(dim=2).cpu()


def union(*layouts: torch.Tensor) -> torch.Tensor:
    """Element-wise OR; a single-head layout broadcasts over the heads of a per-head one."""
    if not layouts:
        raise ValueError("union needs at least one layout")
    shapes = {tuple(lay.shape[-2:]) for lay in layouts}
    if len(shapes) != 1:
        raise ValueError(f"layouts must have the same number of blocks, got shapes {sorted(shapes)}")
    heads = {lay.shape[0] for lay in layouts if lay.shape[0] != 1}
    if len(heads) > 1:
        raise ValueError(f"layouts have different head counts {sorted(heads)}")
    out = layouts[0].to(torch.bool)
    for lay in layouts[1:]:
        out = out | lay.to(torch.bool)
    return out


def layout_density(layout: torch.Tensor) -> float:
    """Fraction of blocks that are active (what block-sparse attention computes relative to dense, non-causal)."""
    return float(layout.to(torch.float32).mean().item())


LAYOUT_TYPES = ("dense", "local", "global", "strided", "bigbird")


def build_layout(
    specs: Sequence[Mapping],
    num_blocks: int,
    *,
    num_heads: int = 1,
    causal: bool = False,
    seed: int = 0,
) -> torch.Tensor:
    """Union of layouts described by config specs (``{"type": "local", "window": 2}``, ...); see ``AttentionConfig``.

    A ``bigbird`` spec without its own ``seed`` uses ``seed`` plus its position in the list, so two bigbird entries
    do not draw the same random blocks.
    """
    if not specs:
        raise ValueError("specs must list at least one layout")
    parts = []
    for pos, spec in enumerate(specs):
        params = {key: val for key, val in spec.items() if key != "type"}
        kind = spec.get("type")
        if kind == "dense":
            parts.append(dense_layout(num_blocks, causal=causal, **params))
        elif kind == "local":
            parts.append(local_layout(num_blocks, causal=causal, **params))
        elif kind == "global":
            # Clamp indices into range: a config written for long sequences still works on short ones.
            blocks = [b for b in _as_list(params.get("blocks", [0])) if -num_blocks <= b < num_blocks] or [0]
            parts.append(global_layout(num_blocks, blocks, causal=causal))
        elif kind == "strided":
            parts.append(strided_layout(num_blocks, causal=causal, **params))
        elif kind == "bigbird":
            params.setdefault("seed", seed + pos)
            params["num_global"] = min(params.get("num_global", 1), num_blocks)
            parts.append(bigbird_layout(num_blocks, num_heads=num_heads, causal=causal, **params))
        else:
            raise ValueError(f"unknown layout type {kind!r}; expected one of {', '.join(LAYOUT_TYPES)}")
    return union(*parts)


def _as_list(blocks) -> list:
    return [blocks] if isinstance(blocks, int) else list(blocks)
