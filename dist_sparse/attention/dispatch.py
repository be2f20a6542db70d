"""``block_sparse_attention``: input checks and the choice of implementation.

Implementations: ``"triton"`` (GPU kernels in ``kernels/block_sparse_attn.py``), ``"cpu"`` (vectorised PyTorch,
``dist_sparse/attention/cpu.py``) and ``"reference"`` (dense scores + mask; for tests). ``"auto"`` (the default)
picks Triton for CUDA tensors when Triton is installed, the CPU path for CPU tensors and the reference elsewhere. The
``implementation`` argument wins over the ``DIST_SPARSE_ATTENTION_IMPL`` environment variable, which wins over
``"auto"``.
"""

from __future__ import annotations

import os

import torch

import dist_sparse.kernels.block_sparse_attn as _kernels

from .cpu import cpu_block_sparse_attention

__all__ = ["IMPLEMENTATIONS", "block_sparse_attention", "resolve_implementation"]

IMPLEMENTATIONS = ("auto", "triton", "cpu", "reference")
ENV_VAR = "DIST_SPARSE_ATTENTION_IMPL"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def resolve_implementation(device: torch.device, implementation: str | None = None) -> str:
    """The implementation that will run for tensors on ``device`` ("triton", "cpu" or "reference")."""
    choice = implementation or os.environ.get(ENV_VAR) or "auto"
    if choice not in IMPLEMENTATIONS:
        source = "implementation" if implementation else ENV_VAR
        raise ValueError(f"{source} must be one of {', '.join(IMPLEMENTATIONS)}, got {choice!r}")
    if choice == "auto":
        if device.type == "cuda" and _kernels.HAS_TRITON:
            return "triton"
        # Other accelerators (MPS, XPU, CUDA without Triton) get the dense reference: correct, not fast.
        return "cpu" if device.type == "cpu" else "reference"
    if choice == "cpu" and device.type != "cpu":
        raise ValueError(f"implementation 'cpu' needs CPU tensors, got {device.type} tensors")
    return choice


def _check_inputs(q, k, v, layout, block_size, attn_mask) -> torch.Tensor:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor (batch, heads, seq, head_dim), got {shape}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    batch, heads, seq, dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[2] != seq or k.shape[3] != dim:
        raise ValueError(
            f"k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)}: batch, seq and head_dim must agree "
            "(use the dense path for decoding with a cache)"
        )
    if k.shape[1] == 0 or heads % k.shape[1]:
        raise ValueError(f"q heads ({heads}) must be a multiple of k/v heads ({k.shape[1]}) (grouped-query attention)")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if not isinstance(layout, torch.Tensor):
        raise TypeError(f"layout must be a bool tensor, got {type(layout).__name__}")
    if layout.dim() == 2:
        layout = layout.unsqueeze(0)
    nb = -(-seq // block_size)
    if layout.dim() != 3 or layout.shape[0] not in (1, heads) or layout.shape[1:] != (nb, nb):
        raise ValueError(
            f"layout must have shape (1 or {heads}, {nb}, {nb}) for seq {seq} and block_size {block_size}, "
            f"got {tuple(layout.shape)}"
        )
    if layout.dtype != torch.bool:
        if layout.is_floating_point() or layout.is_complex():
            raise TypeError(f"layout must be bool (or integer 0/1), got {layout.dtype}")
        layout = layout != 0
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool or attn_mask.dim() != 4:
            raise ValueError("attn_mask must be a 4-D bool tensor broadcastable to (batch, heads, seq, seq)")
        want = (batch, heads, seq, seq)
        if any(s not in (1, w) for s, w in zip(attn_mask.shape[:2], want[:2])) or attn_mask.shape[2:] != want[2:]:
            raise ValueError(f"attn_mask shape {tuple(attn_mask.shape)} does not broadcast to {want}")
    return layout


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    block_size: int,
    causal: bool = False,
    scale: float | None = None,
    *,
    attn_mask: torch.Tensor | None = None,
    implementation: str | None = None,
    keep_probabilities: bool | str = "auto",
) -> torch.Tensor:
    """Attention that computes only the active ``block_size`` x ``block_size`` blocks of ``layout``.

    Args:
        q: ``(batch, heads, seq, head_dim)``.
        k, v: ``(batch, kv_heads, seq, head_dim)``; ``heads`` must be a multiple of ``kv_heads`` (grouped-query).
        layout: bool ``(heads or 1, ceil(seq / block_size), ceil(seq / block_size))`` block mask; see
            :mod:`dist_sparse.attention.layouts`. A trailing partial block is padded (padded keys never count).
        block_size: tokens per block side (the Triton kernels need a power of two >= 16).
        causal: also mask keys after the query (inside diagonal blocks; blocks above the diagonal are skipped).
        scale: softmax scale, ``head_dim ** -0.5`` by default.
        attn_mask: optional dense bool mask broadcastable to ``(batch, heads, seq, seq)`` (True = attend), applied
            on top of the layout, e.g. a padding mask. It costs reading one mask tile per active block.
        implementation: ``"auto"``, ``"triton"``, ``"cpu"`` or ``"reference"`` (see module docstring).
        keep_probabilities: the CPU path's backward reuses the forward's probabilities of the active blocks:
            ``"auto"`` when they take at most 4x the bytes of q, k, v and the output, ``True`` always, ``False``
            never (recomputed from the log-sum-exp, as the Triton kernels always do).

    Rows whose allowed set is empty (no active block, or everything masked) produce zeros, never NaN.
    Returns a tensor shaped and typed like ``q``.
    """
    if keep_probabilities != "auto" and not isinstance(keep_probabilities, bool):
        raise ValueError(f"keep_probabilities must be 'auto', True or False, got {keep_probabilities!r}")
    layout = _check_inputs(q, k, v, layout, block_size, attn_mask)
    impl = resolve_implementation(q.device, implementation)
    # Resolved through the module on every call so a test that reloads kernels.block_sparse_attn (to switch Triton's
    # interpreter on) reaches the reloaded kernels.
    if impl == "triton":
        fn = _kernels.triton_block_sparse_attention
    elif impl == "cpu":
        return cpu_block_sparse_attention(q, k, v, layout, block_size, causal, scale, attn_mask,
                                          keep_probabilities=keep_probabilities)
    else:
        fn = _kernels.reference_block_sparse_attention
    return fn(q, k, v, layout, block_size, causal, scale, attn_mask)
