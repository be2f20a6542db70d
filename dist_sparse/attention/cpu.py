"""Block-sparse attention on CPU: vectorised PyTorch that computes only the active blocks.

Plan. Each query-block row ``(batch, head, i)`` has a variable number of active key blocks. Padding every row to the
longest one would be wasteful as soon as a layout has a global row (it is active everywhere), so rows are cut into
*chunks* of at most ``R`` key blocks. One chunk is one matrix product ``(block, D) @ (D, R*block)``, and all chunks
run as a single batched matmul over key/value blocks gathered with ``index_select``. Rows split over several chunks
are merged with the log-sum-exp rule (as in flash-decoding's split-K). ``R`` is picked per layout to balance padded
slots against per-chunk overhead.

The backward pass is a custom ``autograd.Function`` that recomputes probabilities from the saved log-sum-exp (like
FlashAttention) instead of letting autograd keep every gathered block and softmax alive. Work is split into groups of
chunks so the temporary score tensors stay around ``_GROUP_ELEMS`` floats whatever the sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.block_sparse_attn import effective_layout

__all__ = ["cpu_block_sparse_attention"]

# Score elements (floats) per group of chunks: ~32 MiB of fp32 keeps the working set near the caches of a laptop CPU
# while leaving batched matmuls big enough to run at full speed.
_GROUP_ELEMS = 8 * 2**20
# Cost of one chunk beyond its key blocks, in key-block units (gather, merge bookkeeping, small-matmul overhead).
_CHUNK_OVERHEAD = 1.0


@dataclass
class _Plan:
    q_rows: torch.Tensor  # (n_chunks,) index into query blocks viewed as (B*H*nb, block, D)
    kv_blocks: torch.Tensor  # (n_chunks, R) index into key/value blocks viewed as (B*Hk*nb, block, D)
    slot_cols: torch.Tensor  # (n_chunks, R) key-block column j of each slot (for masks)
    slot_valid: torch.Tensor  # (n_chunks, R) False for padding slots
    width: int  # R
    n_rows: int  # B*H*nb
    merge: bool  # some row spans several chunks


def _chunk_width(counts: torch.Tensor) -> int:
    """The R minimising padded slots plus per-chunk overhead over the non-empty rows."""
    counts = counts[counts > 0].to(torch.float64)
    if counts.numel() == 0:
        return 1
    top = int(counts.max().item())
    widths = torch.arange(1, top + 1, dtype=torch.float64)
    chunks = torch.ceil(counts[None, :] / widths[:, None]).sum(1)
    cost = chunks * (widths + _CHUNK_OVERHEAD)
    return int(widths[int(torch.argmin(cost))].item())


def _build_plan(eff: torch.Tensor, batch: int, heads: int, kv_heads: int) -> _Plan:
    nb = eff.shape[-1]
    eff = eff.expand(heads, nb, nb)
    counts = eff.sum(-1).reshape(-1)  # per (h, i) row
    width = _chunk_width(counts)
    chunks_per_row = (counts + width - 1) // width
    chunk_start = torch.cumsum(chunks_per_row, 0) - chunks_per_row
    n_chunks = int(chunks_per_row.sum().item())

    h_idx, i_idx, j_idx = eff.nonzero(as_tuple=True)  # row-major: ascending j inside a row
    row = h_idx * nb + i_idx
    row_first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(row.numel()) - row_first[row]
    chunk = chunk_start[row] + rank // width
    slot = rank % width

    cols = torch.zeros(n_chunks, width, dtype=torch.long)
    valid = torch.zeros(n_chunks, width, dtype=torch.bool)
    cols[chunk, slot] = j_idx
    valid[chunk, slot] = True
    chunk_row = torch.repeat_interleave(torch.arange(heads * nb), chunks_per_row)  # (h*nb + i) per chunk
    chunk_head = chunk_row // nb

    # Replicate over the batch: query block (b, h, i) and key block (b, h // group, j).
    group = heads // kv_heads
    b = torch.arange(batch)[:, None]
    q_rows = (b * heads * nb + chunk_row[None, :]).reshape(-1)
    kv_base = (b * kv_heads + chunk_head[None, :] // group) * nb  # (B, n_chunks)
    kv_blocks = (kv_base[:, :, None] + cols[None]).reshape(-1, width)
    return _Plan(
        q_rows=q_rows,
        kv_blocks=kv_blocks,
        slot_cols=cols.repeat(batch, 1),
        slot_valid=valid.repeat(batch, 1),
        width=width,
        n_rows=batch * heads * nb,
        merge=bool((chunks_per_row > 1).any()),
    )


def _chunk_masks(plan: _Plan, block: int, nb: int, heads: int, causal: bool, seq_len: int,
                 attn_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Boolean "masked out" tensor (n_chunks, block, R*block), or None when every computed score counts."""
    n, width = plan.slot_cols.shape
    row_block = plan.q_rows % nb
    parts = []
    if not bool(plan.slot_valid.all()):
        parts.append((~plan.slot_valid)[:, None, :, None])
    if causal:
        # Only the diagonal block has keys after some queries (blocks above it are not in the plan).
        diag = (plan.slot_cols == row_block[:, None]) & plan.slot_valid
        if bool(diag.any()):
            upper = torch.ones(block, block, dtype=torch.bool).triu(1)
            parts.append(diag[:, None, :, None] & upper[None, :, None, :])
    if seq_len < nb * block:
        key_pos = plan.slot_cols[:, :, None] * block + torch.arange(block)  # (n, R, block)
        parts.append((key_pos >= seq_len)[:, None, :, :])
    if attn_mask is not None:
        parts.append(~_gather_mask_tiles(plan, attn_mask, block, nb, heads))
    if not parts:
        return None
    masked = parts[0]
    for p in parts[1:]:
        masked = masked | p
    return masked.expand(n, block, width, block).reshape(n, block, width * block)


def _gather_mask_tiles(plan: _Plan, attn_mask: torch.Tensor, block: int, nb: int, heads: int) -> torch.Tensor:
    """The (block, block) tiles of a dense (B|1, H|1, L_pad, L_pad) mask that each chunk slot covers."""
    mb, mh = attn_mask.shape[:2]
    tiles = attn_mask.reshape(mb, mh, nb, block, nb, block).permute(0, 1, 2, 4, 3, 5)  # (mb, mh, i, j, r, c)
    bh = plan.q_rows // nb
    b_idx = (bh // heads) if mb > 1 else torch.zeros_like(bh)
    h_idx = (bh % heads) if mh > 1 else torch.zeros_like(bh)
    i_idx = plan.q_rows % nb
    got = tiles[b_idx[:, None], h_idx[:, None], i_idx[:, None], plan.slot_cols]  # (n, R, block, block)
    return got.permute(0, 2, 1, 3)  # (n, block, R, block)


def _groups(n_chunks: int, per_chunk: int):
    step = max(1, _GROUP_ELEMS // max(per_chunk, 1))
    for start in range(0, n_chunks, step):
        yield slice(start, min(start + step, n_chunks))


class _BlockSparseCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan, masked, block: int, scale: float):
        batch, heads, seq_pad, dim = q.shape
        qb = (q * scale).reshape(-1, block, dim)  # pre-scaled: saves a pass over the scores
        kb = k.reshape(-1, block, dim)
        vb = v.reshape(-1, block, dim)
        n, width = plan.kv_blocks.shape
        m_all = torch.empty(n, block)
        l_all = torch.empty(n, block)
        o_all = torch.empty(n, block, dim)
        for g in _groups(n, block * width * block):
            kv_idx = plan.kv_blocks[g].reshape(-1)
            qg = qb.index_select(0, plan.q_rows[g])
            kg = kb.index_select(0, kv_idx).view(-1, width * block, dim)
            vg = vb.index_select(0, kv_idx).view(-1, width * block, dim)
            s = torch.bmm(qg, kg.transpose(1, 2))
            if masked is not None:
                s.masked_fill_(masked[g], float("-inf"))
            m = s.amax(-1)
            m = m.masked_fill_(m == float("-inf"), 0.0)  # all-masked chunk rows: exp(-inf - 0) = 0, not NaN
            s.sub_(m[..., None]).exp_()
            l_all[g] = s.sum(-1)
            m_all[g] = m
            torch.bmm(s, vg, out=o_all[g])

        if plan.merge:
            # Rows spread over chunks: rescale every chunk to the row max and add (log-sum-exp merge).
            rows = plan.q_rows
            # Chunks whose row is fully masked carry l == 0; their max must not raise the row max.
            m_eff = m_all.masked_fill(l_all == 0, float("-inf"))
            row_max = torch.full((plan.n_rows, block), float("-inf")).scatter_reduce_(
                0, rows[:, None].expand(-1, block), m_eff, "amax", include_self=True)
            row_max.masked_fill_(row_max == float("-inf"), 0.0)
            factor = torch.exp(m_eff - row_max[rows])
            row_l = torch.zeros(plan.n_rows, block).index_add_(0, rows, l_all * factor)
            row_o = torch.zeros(plan.n_rows, block, dim).index_add_(0, rows, o_all * factor[..., None])
        else:
            # One chunk per non-empty row: scatter straight into place; empty rows keep l = 0.
            row_max = torch.zeros(plan.n_rows, block).index_copy_(0, plan.q_rows, m_all)
            row_l = torch.zeros(plan.n_rows, block).index_copy_(0, plan.q_rows, l_all)
            row_o = torch.zeros(plan.n_rows, block, dim).index_copy_(0, plan.q_rows, o_all)
        empty = row_l == 0
        out = row_o / row_l.masked_fill(empty, 1.0)[..., None]
        # +inf log-sum-exp for rows with no allowed key: recomputed probabilities are then exactly 0.
        lse = (row_max + torch.log(row_l.masked_fill(empty, 1.0))).masked_fill_(empty, float("inf"))
        out = out.view(batch, heads, seq_pad, dim)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.masked, ctx.block, ctx.scale = plan, masked, block, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        plan, masked, block, scale = ctx.plan, ctx.masked, ctx.block, ctx.scale
        dim = q.shape[-1]
        qb = (q * scale).reshape(-1, block, dim)
        kb = k.reshape(-1, block, dim)
        vb = v.reshape(-1, block, dim)
        dout = dout.contiguous()
        dob = dout.reshape(-1, block, dim)
        delta = (dout * out).sum(-1).reshape(-1, block)  # rowsum(dO * O), the softmax-backward correction
        dqb = torch.zeros_like(qb)
        dkb = torch.zeros_like(kb)
        dvb = torch.zeros_like(vb)
        n, width = plan.kv_blocks.shape
        for g in _groups(n, block * width * block):
            rows = plan.q_rows[g]
            kv_idx = plan.kv_blocks[g].reshape(-1)
            qg = qb.index_select(0, rows)
            dog = dob.index_select(0, rows)
            kg = kb.index_select(0, kv_idx).view(-1, width * block, dim)
            vg = vb.index_select(0, kv_idx).view(-1, width * block, dim)
            p = torch.bmm(qg, kg.transpose(1, 2))
            if masked is not None:
                p.masked_fill_(masked[g], float("-inf"))
            p.sub_(lse.index_select(0, rows)[..., None]).exp_()
            dvb.index_add_(0, kv_idx, torch.bmm(p.transpose(1, 2), dog).view(-1, block, dim))
            ds = torch.bmm(dog, vg.transpose(1, 2))
            ds.sub_(delta.index_select(0, rows)[..., None]).mul_(p)
            dqb.index_add_(0, rows, torch.bmm(ds, kg))
            # Padding slots point at a real block but carry p = ds = 0, so they add zeros there.
            dkb.index_add_(0, kv_idx, torch.bmm(ds.transpose(1, 2), qg).view(-1, block, dim))
        dq = (dqb * scale).view_as(q)
        return dq, dkb.view_as(k), dvb.view_as(v), None, None, None, None


def cpu_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    block_size: int,
    causal: bool = False,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse attention on CPU tensors. Inputs must already be validated (see ``block_sparse_attention``).

    Pads the sequence to a multiple of ``block_size`` (padded keys are masked); computes in fp32 whatever the input
    dtype (CPU half-precision matmuls are slow and lose accuracy) and returns the input dtype.
    """
    batch, heads, seq, dim = q.shape
    scale = dim**-0.5 if scale is None else float(scale)
    dtype = q.dtype
    nb = -(-seq // block_size)
    seq_pad = nb * block_size
    if seq_pad != seq:
        pad = (0, 0, 0, seq_pad - seq)
        q, k, v = (torch.nn.functional.pad(t, pad) for t in (q, k, v))
    if attn_mask is not None:
        attn_mask = attn_mask.to(torch.bool)
        if seq_pad != seq:
            attn_mask = torch.nn.functional.pad(attn_mask, (0, seq_pad - seq, 0, seq_pad - seq))
    q, k, v = (t.float().contiguous() for t in (q, k, v))
    eff = effective_layout(layout.cpu(), causal)
    plan = _build_plan(eff, batch, heads, k.shape[1])
    masked = _chunk_masks(plan, block_size, nb, heads, causal, seq, attn_mask)
    out = _BlockSparseCPU.apply(q, k, v, plan, masked, block_size, scale)
    return out[:, :, :seq].to(dtype)
