"""Block-sparse attention on CPU: vectorised PyTorch that computes only the active blocks.

Plan. Each query-block row ``(batch, head, i)`` has a variable number of active key blocks. Padding every row to the
longest one would be wasteful as soon as a layout has a global row (active everywhere), so rows are cut into *chunks*
of at most ``R`` key blocks. One chunk is one matrix product ``(block, D) @ (D, R*block)``, and all chunks of a group
run as one batched matmul over blocks gathered with ``index_select``. Rows split over several chunks are merged with
the log-sum-exp rule (flash-decoding's split-K). ``R`` is picked per layout to balance padded slots against
per-chunk overhead.

The backward pass is a custom ``autograd.Function`` that recomputes probabilities from the saved log-sum-exp (as
FlashAttention does) instead of letting autograd keep every gathered block alive. It runs twice over the blocks, like
the Triton kernels: once by query-block rows (dQ) and once by key-block columns with the transposed layout (dK, dV).
Each pass then produces one ``(block, D)`` result per chunk, which is cheap to merge, where a single pass would have to
scatter-add one result per (chunk, slot) into dK/dV; measured, that scatter cost more than all the matmuls together.

Work is split into groups of chunks so the temporary score tensors stay near ``_GROUP_ELEMS`` floats whatever the
sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.block_sparse_attn import effective_layout

__all__ = ["cpu_block_sparse_attention"]

# Score elements (floats) per group of chunks: ~32 MiB of fp32 bounds peak memory at long sequences while keeping
# the batched matmuls large enough to run at full speed.
_GROUP_ELEMS = 2**19
# Cost of one chunk beyond its R blocks, in block units (gather, merge bookkeeping, small-matmul overhead).
_CHUNK_OVERHEAD = 1.0


@dataclass
class _Plan:
    """Chunks over one orientation of the layout: "own" blocks (the rows of the pass) and "slot" blocks (R each)."""

    own_blocks: torch.Tensor  # (n,) gather index of each chunk's own block
    own_pos: torch.Tensor  # (n,) layout index (i for rows, j for columns) of that block
    slot_blocks: torch.Tensor  # (n, R) gather index of the slot blocks (padding slots: any valid block)
    slot_pos: torch.Tensor  # (n, R) layout index of the slot blocks
    slot_valid: torch.Tensor  # (n, R) False for padding slots
    out_rows: torch.Tensor  # (n,) output row (b, h, own_pos) of each chunk, non-decreasing
    lengths: torch.Tensor  # (n_rows,) chunks per output row (0 for rows with nothing active)
    batch_head: torch.Tensor  # (n,) b * heads + h (query head) of each chunk, for the dense mask
    width: int
    n_rows: int

    one_to_one: bool = False  # exactly one chunk per output row: per-chunk results are already per-row results
    single: torch.Tensor | None = None  # chunks that are alone on their row
    split: torch.Tensor | None = None  # chunks of rows split over several chunks

    def __post_init__(self):
        self.one_to_one = bool((self.lengths == 1).all())
        alone = self.lengths[self.out_rows] == 1
        self.single = alone.nonzero().flatten()
        self.split = (~alone).nonzero().flatten()


def _chunk_width(counts: torch.Tensor) -> int:
    """The R minimising padded slots plus per-chunk overhead over the non-empty rows."""
    counts = counts[counts > 0]
    if counts.numel() == 0:
        return 1
    widths = torch.arange(1, int(counts.max().item()) + 1)
    chunks = ((counts[None, :] + widths[:, None] - 1) // widths[:, None]).sum(1)
    return int(widths[int(torch.argmin(chunks * (widths + _CHUNK_OVERHEAD)))].item())


def _build_plan(eff: torch.Tensor, batch: int, heads: int, own_group: int, slot_group: int) -> _Plan:
    """Chunks for ``eff`` (Hl, nb, nb) read as rows -> slots. Blocks of tensors with ``heads // g`` heads are
    indexed ``(b * (heads // g) + h // g) * nb + block`` with g = ``own_group`` / ``slot_group`` (GQA sharing)."""
    nb = eff.shape[-1]
    eff = eff.expand(heads, nb, nb)
    counts = eff.sum(-1).reshape(-1)  # per (h, own) row
    width = _chunk_width(counts)
    chunks_per_row = (counts + width - 1) // width
    chunk_start = torch.cumsum(chunks_per_row, 0) - chunks_per_row
    n_chunks = int(chunks_per_row.sum().item())

    h_idx, i_idx, j_idx = eff.nonzero(as_tuple=True)  # row-major: ascending slot inside a row
    row = h_idx * nb + i_idx
    rank = torch.arange(row.numel()) - (torch.cumsum(counts, 0) - counts)[row]
    chunk, slot = chunk_start[row] + rank // width, rank % width
    slot_pos = torch.zeros(n_chunks, width, dtype=torch.long)
    slot_valid = torch.zeros(n_chunks, width, dtype=torch.bool)
    slot_pos[chunk, slot] = j_idx
    slot_valid[chunk, slot] = True
    chunk_row = torch.repeat_interleave(torch.arange(heads * nb), chunks_per_row)  # h * nb + own
    chunk_head, own_pos = chunk_row // nb, chunk_row % nb

    b = torch.arange(batch)[:, None]
    own_heads, slot_heads = heads // own_group, heads // slot_group
    own_blocks = ((b * own_heads + chunk_head // own_group) * nb + own_pos).reshape(-1)
    slot_base = (b * slot_heads + chunk_head // slot_group) * nb  # (B, n)
    return _Plan(
        own_blocks=own_blocks,
        own_pos=own_pos.repeat(batch),
        slot_blocks=(slot_base[:, :, None] + slot_pos[None]).reshape(-1, width),
        slot_pos=slot_pos.repeat(batch, 1),
        slot_valid=slot_valid.repeat(batch, 1),
        out_rows=(b * heads * nb + chunk_row[None, :]).reshape(-1),
        lengths=chunks_per_row.repeat(batch),
        batch_head=(b * heads + chunk_head[None, :]).reshape(-1),
        width=width,
        n_rows=batch * heads * nb,
    )


def _chunk_masks(plan: _Plan, transposed: bool, block: int, nb: int, heads: int, causal: bool, seq_len: int,
                 attn_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Boolean "masked out" tensor shaped like the pass's scores: (n, block, R*block), rows = own-block tokens.

    Built as (n, R, query token, key token) with broadcasting, then laid out for a row pass (queries own) or a column
    pass (keys own). None when every computed score counts.
    """
    n, width = plan.slot_pos.shape
    q_pos = plan.slot_pos if transposed else plan.own_pos[:, None].expand(n, width)
    k_pos = plan.own_pos[:, None].expand(n, width) if transposed else plan.slot_pos
    parts = []
    if not bool(plan.slot_valid.all()):
        parts.append((~plan.slot_valid)[:, :, None, None])
    if causal:
        # Only diagonal blocks hold keys after some of their queries (blocks above are not in the plan).
        diag = (q_pos == k_pos) & plan.slot_valid
        if bool(diag.any()):
            later = torch.ones(block, block, dtype=torch.bool).triu(1)  # [query tok, key tok]: key after query
            parts.append(diag[:, :, None, None] & later)
    if seq_len < nb * block:
        parts.append((k_pos[:, :, None] * block + torch.arange(block) >= seq_len)[:, :, None, :])
    if attn_mask is not None:
        parts.append(~_gather_mask_tiles(plan, attn_mask, q_pos, k_pos, block, nb, heads))
    if not parts:
        return None
    masked = parts[0]
    for p in parts[1:]:
        masked = masked | p
    masked = masked.expand(n, width, block, block)
    masked = masked.permute(0, 3, 1, 2) if transposed else masked.permute(0, 2, 1, 3)
    return masked.reshape(n, block, width * block)


def _gather_mask_tiles(plan: _Plan, attn_mask: torch.Tensor, q_pos, k_pos, block: int, nb: int,
                       heads: int) -> torch.Tensor:
    """The (query, key) tiles of a dense (B|1, H|1, L_pad, L_pad) mask under each chunk slot: (n, R, block, block)."""
    mb, mh = attn_mask.shape[:2]
    tiles = attn_mask.reshape(mb, mh, nb, block, nb, block).permute(0, 1, 2, 4, 3, 5)  # (mb, mh, i, j, r, c)
    b_idx = (plan.batch_head // heads) if mb > 1 else torch.zeros_like(plan.batch_head)
    h_idx = (plan.batch_head % heads) if mh > 1 else torch.zeros_like(plan.batch_head)
    return tiles[b_idx[:, None], h_idx[:, None], q_pos, k_pos]


def _groups(n_chunks: int, per_chunk: int):
    step = max(1, _GROUP_ELEMS // max(per_chunk, 1))
    for start in range(0, n_chunks, step):
        yield slice(start, min(start + step, n_chunks))


def _per_row(values: torch.Tensor, plan: _Plan, reduce: str = "sum") -> torch.Tensor:
    """Reduce per-chunk values onto output rows (rows with no chunk get 0, or -inf for "max").

    Most rows own a single chunk and are copied into place; only chunks of split rows go through a (slower)
    scatter-reduction, which is why the plan keeps the two sets apart.
    """
    if plan.one_to_one:
        return values  # one chunk per row, in row order
    fill = float("-inf") if reduce == "max" else 0.0
    out = values.new_full((plan.n_rows, *values.shape[1:]), fill)
    out.index_copy_(0, plan.out_rows[plan.single], values.index_select(0, plan.single))
    if plan.split.numel():
        rows = plan.out_rows[plan.split]
        part = values.index_select(0, plan.split)
        if reduce == "sum":
            out.index_add_(0, rows, part)
        else:
            flat = part.reshape(part.shape[0], -1)
            out.view(plan.n_rows, -1).scatter_reduce_(0, rows[:, None].expand_as(flat), flat, "amax")
    return out


class _BlockSparseCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rows: _Plan, cols: _Plan, masks, block: int, scale: float):
        batch, heads, seq_pad, dim = q.shape
        qb = (q * scale).reshape(-1, block, dim)  # pre-scaled: saves a pass over the scores
        kb = k.reshape(-1, block, dim)
        vb = v.reshape(-1, block, dim)
        n, width = rows.slot_blocks.shape
        m_all = torch.empty(n, block)
        l_all = torch.empty(n, block)
        o_all = torch.empty(n, block, dim)
        row_mask = masks[0]
        for g in _groups(n, block * width * block):
            kv_idx = rows.slot_blocks[g].reshape(-1)
            s = torch.bmm(qb.index_select(0, rows.own_blocks[g]),
                          kb.index_select(0, kv_idx).view(-1, width * block, dim).transpose(1, 2))
            if row_mask is not None:
                s.masked_fill_(row_mask[g], float("-inf"))
            m = s.amax(-1)
            m.masked_fill_(m == float("-inf"), 0.0)  # all-masked chunk rows: exp(-inf - 0) = 0, not NaN
            s.sub_(m[..., None]).exp_()
            torch.sum(s, -1, out=l_all[g])
            m_all[g] = m
            torch.bmm(s, vb.index_select(0, kv_idx).view(-1, width * block, dim), out=o_all[g])

        if not rows.split.numel():
            row_max, row_l, row_o = _per_row(m_all, rows), _per_row(l_all, rows), _per_row(o_all, rows)
        else:
            # Rows spread over chunks: rescale every chunk to its row's max and add (log-sum-exp merge). Chunks whose
            # row part is fully masked have l == 0; their max must not raise the row max.
            m_eff = m_all.masked_fill(l_all == 0, float("-inf"))
            row_max = _per_row(m_eff, rows, "max")
            row_max.masked_fill_(row_max == float("-inf"), 0.0)
            factor = torch.exp(m_eff - row_max.index_select(0, rows.out_rows))
            row_l = _per_row(l_all * factor, rows)
            row_o = _per_row(o_all * factor[..., None], rows)
        empty = row_l == 0
        out = row_o / row_l.masked_fill(empty, 1.0)[..., None]
        # +inf log-sum-exp for rows with no allowed key: recomputed probabilities are then exactly 0.
        lse = (row_max + torch.log(row_l.masked_fill(empty, 1.0))).masked_fill_(empty, float("inf"))
        out = out.view(batch, heads, seq_pad, dim)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plans, ctx.masks, ctx.block, ctx.scale = (rows, cols), masks, block, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        (rows, cols), (row_mask, col_mask), block, scale = ctx.plans, ctx.masks, ctx.block, ctx.scale
        batch, heads, seq_pad, dim = q.shape
        kv_heads = k.shape[1]
        qb = (q * scale).reshape(-1, block, dim)
        kb = k.reshape(-1, block, dim)
        vb = v.reshape(-1, block, dim)
        dob = dout.contiguous().reshape(-1, block, dim)
        delta = (dout * out).sum(-1).reshape(-1, block)  # rowsum(dO * O), the softmax-backward correction

        # dQ by query-block rows: dS = P * (dO V^T - delta), dQ = scale * dS K.
        n, width = rows.slot_blocks.shape
        dq_all = torch.empty(n, block, dim)
        for g in _groups(n, block * width * block):
            own = rows.own_blocks[g]
            kv_idx = rows.slot_blocks[g].reshape(-1)
            kg = kb.index_select(0, kv_idx).view(-1, width * block, dim)
            p = torch.bmm(qb.index_select(0, own), kg.transpose(1, 2))
            if row_mask is not None:
                p.masked_fill_(row_mask[g], float("-inf"))
            p.sub_(lse.index_select(0, own)[..., None]).exp_()
            ds = torch.bmm(dob.index_select(0, own), vb.index_select(0, kv_idx).view(-1, width * block, dim)
                           .transpose(1, 2))
            ds.sub_(delta.index_select(0, own)[..., None]).mul_(p)
            torch.bmm(ds, kg, out=dq_all[g])
        dq = _per_row(dq_all, rows).view_as(q) * scale

        # dK, dV by key-block columns (transposed layout), one result per query head, summed over GQA groups.
        n, width = cols.slot_blocks.shape
        dk_all = torch.empty(n, block, dim)
        dv_all = torch.empty(n, block, dim)
        for g in _groups(n, block * width * block):
            own = cols.own_blocks[g]
            q_idx = cols.slot_blocks[g].reshape(-1)
            qg = qb.index_select(0, q_idx).view(-1, width * block, dim)
            dog = dob.index_select(0, q_idx).view(-1, width * block, dim)
            pt = torch.bmm(kb.index_select(0, own), qg.transpose(1, 2))
            if col_mask is not None:
                pt.masked_fill_(col_mask[g], float("-inf"))
            pt.sub_(lse.index_select(0, q_idx).view(-1, 1, width * block)).exp_()
            torch.bmm(pt, dog, out=dv_all[g])
            dst = torch.bmm(vb.index_select(0, own), dog.transpose(1, 2))
            dst.sub_(delta.index_select(0, q_idx).view(-1, 1, width * block)).mul_(pt)
            torch.bmm(dst, qg, out=dk_all[g])  # qg is pre-scaled, so this is already scale * dS^T Q
        group = heads // kv_heads
        dk = _per_row(dk_all, cols).view(batch, kv_heads, group, seq_pad, dim).sum(2)
        dv = _per_row(dv_all, cols).view(batch, kv_heads, group, seq_pad, dim).sum(2)
        return dq, dk, dv, None, None, None, None, None


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
    kv_heads = k.shape[1]
    scale = dim**-0.5 if scale is None else float(scale)
    dtype = q.dtype
    nb = -(-seq // block_size)
    seq_pad = nb * block_size
    if seq_pad != seq:
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, seq_pad - seq)) for t in (q, k, v))
    if attn_mask is not None:
        attn_mask = attn_mask.to(torch.bool)
        if seq_pad != seq:
            attn_mask = torch.nn.functional.pad(attn_mask, (0, seq_pad - seq, 0, seq_pad - seq))
    q, k, v = (t.float().contiguous() for t in (q, k, v))
    eff = effective_layout(layout.cpu(), causal)
    group = heads // kv_heads
    rows = _build_plan(eff, batch, heads, own_group=1, slot_group=group)
    masks = [_chunk_masks(rows, False, block_size, nb, heads, causal, seq, attn_mask), None]
    cols = None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        cols = _build_plan(eff.transpose(-1, -2), batch, heads, own_group=group, slot_group=1)
        masks[1] = _chunk_masks(cols, True, block_size, nb, heads, causal, seq, attn_mask)
    out = _BlockSparseCPU.apply(q, k, v, rows, cols, tuple(masks), block_size, scale)
    return out[:, :, :seq].to(dtype)
