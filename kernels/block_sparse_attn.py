"""Block-sparse attention in Triton: forward and backward kernels, one autograd Function, a dense reference.

The layout is a boolean ``(heads or 1, n_blocks, n_blocks)`` block mask: query block ``i`` of head ``h`` attends
key block ``j`` only where ``layout[h, i, j]`` is True. The kernels follow the Triton fused-attention tutorial
(online softmax, recomputation in the backward pass) but loop over a per-row list of *active* key blocks, so the work
is proportional to the number of active blocks, not to ``seq**2``:

* ``_bsa_fwd_kernel``: one program per (query tile, batch*head); walks the active key blocks of its row.
* ``_bsa_bwd_dkdv_kernel``: one program per (key tile, batch*head); walks the active *query* blocks of its column
  (the transposed layout), accumulating dK and dV without atomics.
* ``_bsa_bwd_dq_kernel``: one program per (query tile, batch*head); walks the same list as the forward pass.

Grouped-query attention (fewer k/v heads than q heads) reads k/v head ``h // group``; the dK/dV kernel writes one
partial per *query* head and the group sum happens in PyTorch, again to avoid atomics.

This module imports without CUDA and without Triton (``HAS_TRITON`` tells which); with ``TRITON_INTERPRET=1`` set
before it is imported, the kernels run on CPU tensors through Triton's interpreter, which is how the tests check them
on machines without a GPU.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the CPU path and the reference below still work
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "effective_layout",
    "expand_layout_to_tokens",
    "masked_attention",
    "reference_block_sparse_attention",
    "triton_block_sparse_attention",
    "triton_interpreting",
]


# ----------------------------------------------------------------------------------------------------------------------
# Layout helpers shared by every implementation
# ----------------------------------------------------------------------------------------------------------------------


def effective_layout(layout: torch.Tensor, causal: bool) -> torch.Tensor:
    """The block mask an implementation must visit: ``layout`` as bool, restricted to ``j <= i`` when causal.

    Blocks above the diagonal hold only future keys, so under causal masking they are skipped entirely rather than
    computed and thrown away.
    """
    eff = layout.to(torch.bool)
    if causal:
        n = eff.shape[-1]
        eff = eff & torch.ones(n, n, dtype=torch.bool, device=eff.device).tril()
    return eff


def expand_layout_to_tokens(layout: torch.Tensor, block_size: int, seq_len: int) -> torch.Tensor:
    """Token-level mask ``(heads or 1, seq_len, seq_len)`` of a block layout (the last partial block is cut)."""
    tok = layout.to(torch.bool).repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)
    return tok[..., :seq_len, :seq_len]


# ----------------------------------------------------------------------------------------------------------------------
# Plain reference: dense scores + mask. Slow and memory hungry on purpose; the tests measure the kernels against it.
# ----------------------------------------------------------------------------------------------------------------------


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """Dense attention where ``allowed`` (bool, broadcastable to the scores) says which keys each query may see.

    Computes in fp32; grouped-query k/v are repeated. Rows with no allowed key give zeros: a softmax over an all
    -inf row is NaN, while subtracting a finite max and dividing by a clamped sum yields the zeros the kernels produce.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    weights = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.matmul(weights, vf).to(q.dtype)


def reference_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    block_size: int,
    causal: bool = False,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense masked attention with the same semantics as the kernels; rows with no allowed key give zeros."""
    seq = q.shape[2]
    allowed = expand_layout_to_tokens(layout.to(q.device), block_size, seq).unsqueeze(0)  # (1, H|1, L, L)
    if causal:
        allowed = allowed & torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        allowed = allowed & attn_mask.to(torch.bool)
    return masked_attention(q, k, v, allowed, scale)


# ----------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _tile_allowed(offs_m, offs_n, seq_len, mask_base, stride_mm, stride_mn, CAUSAL: tl.constexpr,
                      HAS_MASK: tl.constexpr, KEY_MAJOR: tl.constexpr):
        # Token-level validity inside an active block: padding keys past seq_len, the causal triangle (only bites on
        # diagonal blocks; the layout already excludes blocks above it) and the optional dense user mask. KEY_MAJOR
        # builds the (key, query) tile directly, for the dK/dV kernel, instead of transposing a boolean tile.
        if KEY_MAJOR:
            rows = offs_n[:, None]
            cols = offs_m[None, :]
            allowed = rows < seq_len
            if CAUSAL:
                allowed = allowed & (cols >= rows)
            if HAS_MASK:
                mvals = tl.load(mask_base + cols * stride_mm + rows * stride_mn)
                allowed = allowed & (mvals != 0)
        else:
            allowed = offs_n[None, :] < seq_len
            if CAUSAL:
                allowed = allowed & (offs_m[:, None] >= offs_n[None, :])
            if HAS_MASK:
                mvals = tl.load(mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn)
                allowed = allowed & (mvals != 0)
        return allowed

    @triton.jit
    def _bsa_fwd_kernel(
        Q, K, V, Out, Lse, LutCols, LutCount, Mask,
        qk_scale,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_om, stride_od,
        stride_mb, stride_mh, stride_mm, stride_mn,
        stride_lh, stride_lm, stride_ch,
        H, GROUP, seq_len, seq_pad,
        BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // GROUP
        row_block = (pid_m * BLOCK_M) // BLOCK
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)

        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd)
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
        mask_base = Mask + b * stride_mb + h * stride_mh
        # stride_lh / stride_ch are 0 when one layout is shared by all heads.
        lut_row = LutCols + h * stride_lh + row_block * stride_lm
        count = tl.load(LutCount + h * stride_ch + row_block)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for idx in range(0, count):
            col_block = tl.load(lut_row + idx)
            for sub in tl.static_range(BLOCK // BLOCK_N):
                offs_n = col_block * BLOCK + sub * BLOCK_N + tl.arange(0, BLOCK_N)
                kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd)
                if IEEE:
                    qk = tl.dot(q, kt, input_precision="ieee")
                else:
                    qk = tl.dot(q, kt)
                qk = qk * qk_scale  # qk_scale folds in log2(e): exp2 below is the natural-base softmax
                allowed = _tile_allowed(offs_m, offs_n, seq_len, mask_base, stride_mm, stride_mn, CAUSAL, HAS_MASK,
                                        False)
                qk = tl.where(allowed, qk, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                # A row with nothing allowed yet keeps max -inf; using 0 there keeps exp2 from producing NaN.
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.math.exp2(qk - m_safe[:, None])
                alpha = tl.math.exp2(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd)
                if IEEE:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
                else:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m_i = m_new

        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        # +inf log-sum-exp for empty rows makes every recomputed probability exp2(s - lse) exactly 0 backwards.
        lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
        tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                 out.to(Out.dtype.element_ty))
        tl.store(Lse + bh * seq_pad + offs_m, lse)

    @triton.jit
    def _bsa_bwd_dkdv_kernel(
        Q, K, V, DO, Lse, Delta, DK, DV, LutRows, LutCount, Mask,
        qk_scale, sm_scale,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_mb, stride_mh, stride_mm, stride_mn,
        stride_lh, stride_lm, stride_ch,
        H, GROUP, seq_len, seq_pad,
        BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
    ):
        # Q, DO and the partial DK/DV buffers share the (B, H, L_pad, D) contiguous layout of Q's strides.
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // GROUP
        col_block = (pid_n * BLOCK_N) // BLOCK
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)

        k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd)
        v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd)
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_qb + h * stride_qh
        mask_base = Mask + b * stride_mb + h * stride_mh
        lut_col = LutRows + h * stride_lh + col_block * stride_lm
        count = tl.load(LutCount + h * stride_ch + col_block)

        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        for idx in range(0, count):
            row_block = tl.load(lut_col + idx)
            for sub in tl.static_range(BLOCK // BLOCK_M):
                offs_m = row_block * BLOCK + sub * BLOCK_M + tl.arange(0, BLOCK_M)
                qt = tl.load(q_base + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd)
                do = tl.load(do_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd)
                lse = tl.load(Lse + bh * seq_pad + offs_m)
                delta = tl.load(Delta + bh * seq_pad + offs_m)
                if IEEE:
                    qkt = tl.dot(k, qt, input_precision="ieee")
                else:
                    qkt = tl.dot(k, qt)
                allowed_t = _tile_allowed(offs_m, offs_n, seq_len, mask_base, stride_mm, stride_mn, CAUSAL, HAS_MASK,
                                          True)
                pt = tl.math.exp2(qkt * qk_scale - lse[None, :])
                pt = tl.where(allowed_t, pt, 0.0)
                if IEEE:
                    dv += tl.dot(pt.to(do.dtype), do, input_precision="ieee")
                    dpt = tl.dot(v, tl.trans(do), input_precision="ieee")
                else:
                    dv += tl.dot(pt.to(do.dtype), do)
                    dpt = tl.dot(v, tl.trans(do))
                dst = pt * (dpt - delta[None, :])
                if IEEE:
                    dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision="ieee")
                else:
                    dk += tl.dot(dst.to(qt.dtype), tl.trans(qt))

        out_off = b * stride_qb + h * stride_qh + offs_n[:, None] * stride_qm + offs_d[None, :] * stride_qd
        tl.store(DK + out_off, dk * sm_scale)
        tl.store(DV + out_off, dv)

    @triton.jit
    def _bsa_bwd_dq_kernel(
        Q, K, V, DO, Lse, Delta, DQ, LutCols, LutCount, Mask,
        qk_scale, sm_scale,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_mb, stride_mh, stride_mm, stride_mn,
        stride_lh, stride_lm, stride_ch,
        H, GROUP, seq_len, seq_pad,
        BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // GROUP
        row_block = (pid_m * BLOCK_M) // BLOCK
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)

        q_off = b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
        q = tl.load(Q + q_off)
        do = tl.load(DO + q_off)
        lse = tl.load(Lse + bh * seq_pad + offs_m)
        delta = tl.load(Delta + bh * seq_pad + offs_m)
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
        mask_base = Mask + b * stride_mb + h * stride_mh
        lut_row = LutCols + h * stride_lh + row_block * stride_lm
        count = tl.load(LutCount + h * stride_ch + row_block)

        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for idx in range(0, count):
            col_block = tl.load(lut_row + idx)
            for sub in tl.static_range(BLOCK // BLOCK_N):
                offs_n = col_block * BLOCK + sub * BLOCK_N + tl.arange(0, BLOCK_N)
                kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd)
                vt = tl.load(v_base + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd)
                if IEEE:
                    qk = tl.dot(q, kt, input_precision="ieee")
                    dp = tl.dot(do, vt, input_precision="ieee")
                else:
                    qk = tl.dot(q, kt)
                    dp = tl.dot(do, vt)
                allowed = _tile_allowed(offs_m, offs_n, seq_len, mask_base, stride_mm, stride_mn, CAUSAL, HAS_MASK,
                                        False)
                p = tl.math.exp2(qk * qk_scale - lse[:, None])
                p = tl.where(allowed, p, 0.0)
                ds = p * (dp - delta[:, None])
                if IEEE:
                    dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision="ieee")
                else:
                    dq += tl.dot(ds.to(kt.dtype), tl.trans(kt))

        tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty))


# ----------------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------------

_LOG2E = 1.4426950408889634


def triton_interpreting() -> bool:
    """True when the kernels above were built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_bsa_fwd_kernel, InterpretedFunction)


def _block_lut(eff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layout row, the active column indices first (ascending) and their count: ``(Hl, nb, max) , (Hl, nb)``."""
    counts = eff.sum(dim=-1, dtype=torch.int32)
    width = max(int(counts.max().item()), 1)
    # A stable sort of "inactive" flags moves the active columns to the front in ascending order.
    order = torch.argsort((~eff).to(torch.int8), dim=-1, stable=True)[..., :width]
    return order.to(torch.int32).contiguous(), counts.contiguous()


def _tile_sizes(block_size: int, head_dim: int) -> tuple[int, int]:
    tile = min(block_size, 64 if head_dim <= 64 else 32)
    return tile, tile


def _launch_config(q: torch.Tensor) -> dict:
    # The interpreter ignores these; on a GPU they are the tutorial's defaults for 64-wide tiles.
    return {"num_warps": 4, "num_stages": 2} if q.is_cuda else {}


class _BlockSparseAttnTriton(torch.autograd.Function):
    """Autograd wrapper. Inputs arrive padded: seq a multiple of block_size, head_dim a power of two >= 16."""

    @staticmethod
    def forward(ctx, q, k, v, eff, block_size, causal, scale, seq_len, mask):
        batch, heads, seq_pad, head_dim = q.shape
        group = heads // k.shape[1]
        lut_cols, lut_count = _block_lut(eff)
        out = torch.empty_like(q)
        lse = torch.empty(batch * heads, seq_pad, device=q.device, dtype=torch.float32)
        block_m, block_n = _tile_sizes(block_size, head_dim)
        mask_arg, mask_strides = _mask_args(mask, q)
        grid = (seq_pad // block_m, batch * heads)
        _bsa_fwd_kernel[grid](
            q, k, v, out, lse, lut_cols, lut_count, mask_arg,
            scale * _LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mask_strides,
            *_lut_strides(lut_cols, lut_count),
            heads, group, seq_len, seq_pad,
            BLOCK=block_size, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim,
            CAUSAL=causal, HAS_MASK=mask is not None, IEEE=q.dtype == torch.float32,
            **_launch_config(q),
        )
        ctx.save_for_backward(q, k, v, out, lse, eff, mask_arg)
        ctx.has_mask = mask is not None
        ctx.block_size, ctx.causal, ctx.scale, ctx.seq_len = block_size, causal, scale, seq_len
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, eff, mask_arg = ctx.saved_tensors
        batch, heads, seq_pad, head_dim = q.shape
        kv_heads = k.shape[1]
        group = heads // kv_heads
        block_m, block_n = _tile_sizes(ctx.block_size, head_dim)
        # Every kernel indexes Q, dO and the gradient buffers with Q's strides, so make them all contiguous.
        q = q.contiguous()
        dout = dout.contiguous()
        delta = (out.float() * dout.float()).sum(-1).reshape(batch * heads, seq_pad).contiguous()
        mask_strides = _mask_args(mask_arg if ctx.has_mask else None, q)[1]
        common = dict(
            BLOCK=ctx.block_size, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim,
            CAUSAL=ctx.causal, HAS_MASK=ctx.has_mask, IEEE=q.dtype == torch.float32, **_launch_config(q),
        )
        qk_scale = ctx.scale * _LOG2E

        lut_rows, row_count = _block_lut(eff.transpose(-1, -2))
        dk_part = torch.empty(batch, heads, seq_pad, head_dim, device=q.device, dtype=torch.float32)
        dv_part = torch.empty_like(dk_part)
        _bsa_bwd_dkdv_kernel[(seq_pad // block_n, batch * heads)](
            q, k, v, dout, lse, delta, dk_part, dv_part, lut_rows, row_count, mask_arg,
            qk_scale, ctx.scale,
            *q.stride(), *k.stride(), *v.stride(), *mask_strides, *_lut_strides(lut_rows, row_count),
            heads, group, ctx.seq_len, seq_pad, **common,
        )
        # Query heads of one group share a k/v head: their partial gradients add up.
        dk = dk_part.view(batch, kv_heads, group, seq_pad, head_dim).sum(2).to(k.dtype)
        dv = dv_part.view(batch, kv_heads, group, seq_pad, head_dim).sum(2).to(v.dtype)

        lut_cols, col_count = _block_lut(eff)
        dq = torch.empty_like(q)
        _bsa_bwd_dq_kernel[(seq_pad // block_m, batch * heads)](
            q, k, v, dout, lse, delta, dq, lut_cols, col_count, mask_arg,
            qk_scale, ctx.scale,
            *q.stride(), *k.stride(), *v.stride(), *mask_strides, *_lut_strides(lut_cols, col_count),
            heads, group, ctx.seq_len, seq_pad, **common,
        )
        return dq, dk, dv, None, None, None, None, None, None


def _lut_strides(lut: torch.Tensor, counts: torch.Tensor) -> tuple[int, int, int]:
    # A layout shared by all heads has one LUT: stride 0 over heads lets every head read it.
    shared = lut.shape[0] == 1
    return (0 if shared else lut.stride(0)), lut.stride(1), (0 if shared else counts.stride(0))


def _mask_args(mask: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """The dense mask as uint8 with broadcast (stride 0) batch/head dims, or a dummy pointer when there is none."""
    if mask is None:
        return torch.zeros(1, dtype=torch.uint8, device=q.device), (0, 0, 0, 0)
    m = mask if mask.dtype == torch.uint8 else mask.to(torch.uint8)
    strides = tuple(0 if m.shape[i] == 1 else m.stride(i) for i in range(4))
    return m, strides


def _next_pow2(x: int) -> int:
    return 1 << max(4, math.ceil(math.log2(x)))


def triton_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    block_size: int,
    causal: bool = False,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the Triton kernels. Inputs must already be validated (see ``dist_sparse.attention.block_sparse_attention``).

    Pads the sequence to a multiple of ``block_size`` (padded keys are masked in the kernel via ``seq_len``) and the
    head dim to a power of two (zero columns change neither scores nor the kept output columns).
    """
    if not HAS_TRITON:
        raise RuntimeError("the Triton implementation needs the `triton` package (pip install dist_sparse[triton])")
    if not q.is_cuda and not triton_interpreting():
        raise RuntimeError(
            "the Triton implementation needs CUDA tensors, or TRITON_INTERPRET=1 set before kernels.block_sparse_attn "
            "is imported (CPU interpreter, for testing only)"
        )
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16 for the Triton kernels, got {block_size}")
    seq, head_dim = q.shape[2], q.shape[3]
    scale = head_dim**-0.5 if scale is None else float(scale)
    seq_pad = -(-seq // block_size) * block_size
    dim_pad = _next_pow2(head_dim)
    pad = (0, dim_pad - head_dim, 0, seq_pad - seq)
    if any(pad):
        q, k, v = (torch.nn.functional.pad(t, pad) for t in (q, k, v))
    mask = None
    if attn_mask is not None:
        mask = attn_mask.to(torch.uint8)
        if seq_pad != seq:
            mask = torch.nn.functional.pad(mask, (0, seq_pad - seq, 0, seq_pad - seq))
    eff = effective_layout(layout.to(q.device), causal).contiguous()
    out = _BlockSparseAttnTriton.apply(q.contiguous(), k.contiguous(), v.contiguous(), eff, block_size, causal, scale,
                                       seq, mask)
    return out[:, :, :seq, :head_dim]
