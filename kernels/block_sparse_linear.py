"""Block-sparse linear layers in Triton: forward, dX and sampled dW kernels, and a plain PyTorch reference.

The weight is the ``(out, in)`` matrix of ``nn.Linear`` (GPT-2's ``Conv1D`` stores its transpose; the callers
transpose views, never data). It is cut into ``(bh, bw)`` blocks, ``nr x nc`` of them; a bool *layout*
``(nr, nc)`` says which blocks are active, and the active blocks are *packed* row-major into one
``(nnz, bh, bw)`` tensor (see ``dist_sparse.linear.index.BlockIndex``). Three products are computed over active
blocks only:

* ``_bsl_lut_kernel``  ``Y = X Wᵀ``: one program per (token tile, output block row), walking the row's active
  blocks; and ``dX = dY W`` with the same kernel on the transposed layout: one program per (token tile, input block
  column), walking the column's blocks, so no atomics are needed.
* ``_bsl_dw_kernel``   ``dW_b = dY[:, r]ᵀ X[:, c]`` for each active block ``b = (r, c)`` (the *sampled* product):
  one program per active block, looping over token tiles.

The dense ``dW`` that RigL's growth needs on its update steps is one ordinary matmul (``torch.mm``), not a kernel.

Like ``block_sparse_attn.py`` this module imports without CUDA and without Triton (``HAS_TRITON``); with
``TRITON_INTERPRET=1`` set before it is imported, the kernels run on CPU tensors through Triton's interpreter.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the CPU path and the reference still work
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "expand_layout",
    "reference_block_sparse_linear",
    "triton_block_ok",
    "triton_grad_input",
    "triton_grad_weight_blocks",
    "triton_interpreting",
    "triton_linear_forward",
]


def expand_layout(layout: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """Element mask ``(out, in)`` of a block layout ``(nr, nc)`` (edge blocks of irregular shapes are cut)."""
    bh, bw = block
    full = layout.to(torch.bool).repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    return full[: shape[0], : shape[1]]


# ----------------------------------------------------------------------------------------------------------------------
# Plain reference: the masked dense product. The tests measure every implementation against it.
# ----------------------------------------------------------------------------------------------------------------------


class _MaskedLinearRef(torch.autograd.Function):
    """``y = x (W * M)ᵀ + b`` by dense matmuls; ``dW`` is the dense gradient, masked to the layout unless
    ``dense_grad`` (then it is the full ``dYᵀ X``, the gradient RigL scores for growth)."""

    @staticmethod
    def forward(ctx, x, weight_oi, bias, mask, dense_grad):
        w = weight_oi * mask
        ctx.save_for_backward(x, w, mask)
        ctx.dense_grad, ctx.has_bias = dense_grad, bias is not None
        y = x.matmul(w.t())
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx, dy):
        x, w, mask = ctx.saved_tensors
        dx = dy.matmul(w)
        dw = dy.reshape(-1, dy.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]))
        if not ctx.dense_grad:
            dw = dw * mask
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias else None
        return dx, dw, db, None, None


def reference_block_sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                  layout: torch.Tensor, block: tuple[int, int], transposed: bool = False,
                                  dense_grad: bool = False) -> torch.Tensor:
    """Dense reference with the operator's semantics: ``weight`` is ``(out, in)`` (``(in, out)`` when
    ``transposed``, GPT-2's ``Conv1D``), ``layout`` the ``(nr, nc)`` block mask over ``(out, in)``. Computes in fp32
    and returns ``x``'s dtype."""
    w_oi = weight.t() if transposed else weight
    mask = expand_layout(layout.to(weight.device), block, tuple(w_oi.shape)).to(torch.float32)
    y = _MaskedLinearRef.apply(x.float(), w_oi.float(), None if bias is None else bias.float(), mask, dense_grad)
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _bsl_lut_kernel(
        A, P, Out, LutIn, LutBlk, LutCount,
        n_tok, stride_am, stride_om, stride_lut,
        B_IN: tl.constexpr, B_OUT: tl.constexpr, TRANS_W: tl.constexpr, BLOCK_M: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        # Out[m, o*B_OUT:(o+1)*B_OUT] = sum over the LUT entries (o, i, b) of A[m, i*B_IN:(i+1)*B_IN] @ Wb, where
        # Wb (B_IN, B_OUT) is block b transposed (forward: A = X, blocks are (B_OUT, B_IN)) or as stored
        # (dX: A = dY, blocks are (B_IN, B_OUT)). One kernel, two orientations of the layout.
        pid_m = tl.program_id(0)
        o = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_i = tl.arange(0, B_IN)
        offs_o = tl.arange(0, B_OUT)
        row_ok = offs_m < n_tok
        if TRANS_W:
            w_off = offs_i[:, None] + offs_o[None, :] * B_IN
        else:
            w_off = offs_i[:, None] * B_OUT + offs_o[None, :]
        count = tl.load(LutCount + o)
        acc = tl.zeros([BLOCK_M, B_OUT], dtype=tl.float32)
        for idx in range(0, count):
            i = tl.load(LutIn + o * stride_lut + idx)
            b = tl.load(LutBlk + o * stride_lut + idx)
            a = tl.load(A + offs_m[:, None] * stride_am + i * B_IN + offs_i[None, :], mask=row_ok[:, None], other=0.0)
            w = tl.load(P + b * B_IN * B_OUT + w_off)
            if IEEE:
                acc += tl.dot(a, w, input_precision="ieee")
            else:
                acc += tl.dot(a, w)
        tl.store(Out + offs_m[:, None] * stride_om + o * B_OUT + offs_o[None, :], acc.to(Out.dtype.element_ty),
                 mask=row_ok[:, None])

    @triton.jit
    def _bsl_dw_kernel(
        DY, X, DP, Rows, Cols,
        n_tok, stride_dym, stride_xm,
        BH: tl.constexpr, BW: tl.constexpr, BLOCK_M: tl.constexpr, IEEE: tl.constexpr,
    ):
        # DP[b] = DY[:, r*BH:(r+1)*BH]ᵀ @ X[:, c*BW:(c+1)*BW] for the active block b = (r, c), accumulated in fp32
        b = tl.program_id(0)
        r = tl.load(Rows + b)
        c = tl.load(Cols + b)
        offs_h = tl.arange(0, BH)
        offs_w = tl.arange(0, BW)
        acc = tl.zeros([BH, BW], dtype=tl.float32)
        for m0 in range(0, n_tok, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            ok = offs_m < n_tok
            dyt = tl.load(DY + offs_m[None, :] * stride_dym + r * BH + offs_h[:, None], mask=ok[None, :], other=0.0)
            x = tl.load(X + offs_m[:, None] * stride_xm + c * BW + offs_w[None, :], mask=ok[:, None], other=0.0)
            if IEEE:
                acc += tl.dot(dyt, x, input_precision="ieee")
            else:
                acc += tl.dot(dyt, x)
        tl.store(DP + b * BH * BW + offs_h[:, None] * BW + offs_w[None, :], acc)


# ----------------------------------------------------------------------------------------------------------------------
# Host side. Inputs arrive padded and flattened: x (n_tok, nc * bw), packed blocks (nnz, bh, bw), contiguous.
# ----------------------------------------------------------------------------------------------------------------------

_BLOCK_M = 32  # token tile; 32 keeps the interpreter fast and is a reasonable GPU tile for 32-64 wide blocks


def triton_interpreting() -> bool:
    """True when the kernels above were built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_bsl_lut_kernel, InterpretedFunction)


def triton_block_ok(block: tuple[int, int]) -> bool:
    """Whether the Triton kernels take this block shape: ``tl.dot`` needs powers of two >= 16 on both sides."""
    return all(b >= 16 and not b & (b - 1) for b in block)


def _check(x: torch.Tensor, block: tuple[int, int]) -> None:
    if not HAS_TRITON:
        raise RuntimeError("the Triton block-sparse linear kernels need the `triton` package")
    if not x.is_cuda and not triton_interpreting():
        raise RuntimeError("the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before "
                           "kernels.block_sparse_linear is imported (CPU interpreter, for testing only)")
    if not triton_block_ok(block):
        raise ValueError(f"the Triton kernels need block sides that are powers of two >= 16, got {block}")


def _launch(x: torch.Tensor) -> dict:
    return {"num_warps": 4, "num_stages": 2} if x.is_cuda else {}


def _lut_product(a: torch.Tensor, packed: torch.Tensor, lut, n_out: int, b_in: int, b_out: int,
                 trans_w: bool) -> torch.Tensor:
    idx_in, blk, count = lut
    out = torch.empty(a.shape[0], n_out * b_out, device=a.device, dtype=a.dtype)
    grid = (triton.cdiv(a.shape[0], _BLOCK_M), n_out)
    _bsl_lut_kernel[grid](a, packed, out, idx_in, blk, count, a.shape[0], a.stride(0), out.stride(0),
                          idx_in.stride(0), B_IN=b_in, B_OUT=b_out, TRANS_W=trans_w, BLOCK_M=_BLOCK_M,
                          IEEE=a.dtype == torch.float32, **_launch(a))
    return out


def triton_linear_forward(x: torch.Tensor, packed: torch.Tensor, lut, nr: int, block) -> torch.Tensor:
    """``Y (n_tok, nr * bh) = X Wᵀ``; ``lut`` = (cols, blocks, counts) per block row (``BlockIndex.row_lut``)."""
    _check(x, block)
    return _lut_product(x, packed, lut, nr, block[1], block[0], True)


def triton_grad_input(dy: torch.Tensor, packed: torch.Tensor, lut, nc: int, block) -> torch.Tensor:
    """``dX (n_tok, nc * bw) = dY W``; ``lut`` = (rows, blocks, counts) per block column (``BlockIndex.col_lut``)."""
    _check(dy, block)
    return _lut_product(dy, packed, lut, nc, block[0], block[1], False)


def triton_grad_weight_blocks(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                              block) -> torch.Tensor:
    """The sampled product: ``(nnz, bh, bw)`` fp32 gradients of the active blocks only."""
    _check(x, block)
    bh, bw = block
    out = torch.empty(rows.numel(), bh, bw, device=x.device, dtype=torch.float32)
    if rows.numel():
        _bsl_dw_kernel[(rows.numel(),)](dy, x, out, rows, cols, x.shape[0], dy.stride(0), x.stride(0),
                                        BH=bh, BW=bw, BLOCK_M=_BLOCK_M, IEEE=x.dtype == torch.float32, **_launch(x))
    return out
