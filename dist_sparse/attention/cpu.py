"""Block-sparse attention on CPU: vectorised PyTorch that computes only the active blocks.

Plan. Each query-block row ``(batch, head, i)`` has a variable number of active key blocks. Padding every row to the
longest one would be wasteful as soon as a layout has a global row (active everywhere), so rows are cut into *chunks*
of at most ``R`` key blocks. One chunk is one matrix product ``(block, D) @ (D, R*block)``, and all chunks of a group
run as one batched matmul over blocks gathered with ``index_select``. Rows split over several chunks are merged with
the log-sum-exp rule (flash-decoding's split-K). ``R`` is picked per layout to balance padded slots against
per-chunk overhead.

The backward pass is a custom ``autograd.Function``, not autograd over every gathered block. It uses the forward's
probabilities of the active blocks (kept unnormalised, with one factor per query row and chunk) when they take at most
``_KEPT_PROBS_RATIO`` times the bytes of q, k, v and the output; beyond that it recomputes them from the saved
log-sum-exp, as FlashAttention does. It walks the same chunks: dQ is one result per chunk (merged like the forward),
dK and dV are one result per (chunk, slot) added into their key block with ``index_add_``. Done group by group, while
the group is in cache, that scatter costs a tenth of a matmul; done once over all chunks it cost more than all the
matmuls together (measured), hence the groups.

Work is split into groups of chunks so the temporary score tensors stay near ``_GROUP_ELEMS`` floats whatever the
sequence length. Scores are kept in base 2 (q scaled by ``scale * log2(e)``), so the softmax uses ``exp2``, about 4x
cheaper than ``exp`` on CPU. A layout's plan and masker are built once and kept (``_plan_and_masker``).
"""

from __future__ import annotations

import copy
import math
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from dist_sparse.cpu_memory import keep_freed_memory
from dist_sparse.kernels.block_sparse_attn import effective_layout

__all__ = ["cpu_block_sparse_attention"]

# Score elements (floats) per group of chunks: 2 MiB of fp32 scores, plus the gathered blocks, stay in a core's L2/L3
# while the group's matmuls, exp and scatters run over them. Measured at seq 4096: 4x larger groups cost ~20%, 16x
# larger ones about 2x; much smaller ones start paying per-op overhead.
_GROUP_ELEMS = 2**19
_LOG2E = 1.0 / math.log(2.0)
# Cost of one chunk beyond its R blocks, in block units (gather, merge bookkeeping, small-matmul overhead).
_CHUNK_OVERHEAD = 1.0
# The forward keeps its probabilities for the backward when they take at most this many times the bytes of q, k, v
# and the output (which the backward keeps anyway); beyond that it recomputes them from the log-sum-exp.
_KEPT_PROBS_RATIO = 4.0


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


def _build_plan(eff: torch.Tensor, batch: int, heads: int, kv_heads: int) -> _Plan:
    """Chunks for ``eff`` (Hl, nb, nb): own blocks are query blocks ``(b * heads + h) * nb + i``, slots are key/value
    blocks ``(b * kv_heads + h // group) * nb + j`` (grouped-query heads share k/v)."""
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
    slot_base = (b * kv_heads + chunk_head // (heads // kv_heads)) * nb  # (B, n)
    return _Plan(
        own_blocks=(b * heads * nb + chunk_row[None, :]).reshape(-1),
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


class _Masker:
    """Sets masked scores of one pass to -inf, group by group, touching only the tiles that need it.

    Scores of a chunk are laid out (query token, slot * block + key token). Three sources of masking:

    * padding slots: a row's blocks fill its chunks in order, so they are the trailing slots of a chunk;
    * diagonal tiles under causal attention (key after query) and tiles of the last, partial block (padded keys):
      precomputed (block, block) tiles, scattered onto the few (chunk, slot) pairs concerned;
    * the dense ``attn_mask``: gathered per group, only when one is given.

    A full-size boolean mask would cost a quarter of the scores' memory traffic on every pass; most chunks need none
    of it.
    """

    def __init__(self, plan: _Plan, block: int, nb: int, heads: int, causal: bool, seq_len: int,
                 attn_mask: torch.Tensor | None):
        n, width = plan.slot_pos.shape
        self.q_pos, self.k_pos = plan.own_pos[:, None].expand(n, width), plan.slot_pos
        self.plan, self.block, self.nb, self.heads = plan, block, nb, heads
        self.attn_mask = attn_mask
        self.n_valid = plan.slot_valid.sum(1)
        self.partial = bool((self.n_valid < width).any())

        diag = (self.q_pos == self.k_pos) & plan.slot_valid if causal else torch.zeros_like(plan.slot_valid)
        tail = (self.k_pos == nb - 1) & plan.slot_valid if seq_len < nb * block else torch.zeros_like(diag)
        self.pair_chunk, self.pair_slot = (diag | tail).nonzero(as_tuple=True)  # sorted by chunk
        # one tile per kind of pair (0: diagonal, 1: last partial block, 2: both), shared by every pair of that kind:
        # a tile per pair cost (pairs, block, block) booleans to build on every call
        d, t = diag[self.pair_chunk, self.pair_slot], tail[self.pair_chunk, self.pair_slot]
        self.pair_kind = torch.where(d & t, 2, torch.where(d, 0, 1))
        tok = torch.arange(block)
        later = tok[None, :] > tok[:, None]  # [query tok, key tok]: key after query
        padded = (tok + (nb - 1) * block >= seq_len)[None, :].expand(block, block)  # [query tok, key tok]
        self.kind_tiles = (later, padded, later | padded)
        self.active = self.partial or self.pair_chunk.numel() > 0 or attn_mask is not None
        self._ops: dict = {}  # (group start, stop) -> masking operations, see _group_ops

    def with_dense_mask(self, attn_mask: torch.Tensor) -> _Masker:
        """This masker plus a dense mask, sharing everything else (the tiles, the kept per-group operations): the
        dense mask changes call by call, the plan's own masking does not."""
        other = copy.copy(self)
        other.attn_mask, other.active = attn_mask, True
        return other

    def _group_ops(self, g: slice) -> list:
        """What to mask in group ``g``, worked out on its first pass and kept (the forward, the backward and every
        later call of a kept plan see the same groups): per row set of padding slots, and per kind of tile its chunks
        and slots; a set of chunks that is one contiguous range becomes a slice, so its masking is an in-place fill of
        a view instead of a gather and a scatter."""
        ops = self._ops.get((g.start, g.stop))
        if ops is not None:
            return ops
        ops, width, block = [], self.plan.width, self.block
        if self.partial:
            n_valid = self.n_valid[g]
            for v in torch.unique(n_valid[n_valid < width]).tolist():
                ops.append(("pad", _as_index((n_valid == v).nonzero().flatten()), v * block))
        lo, hi = torch.searchsorted(self.pair_chunk, torch.tensor([g.start, g.stop])).tolist()
        if hi > lo:
            c, sl, kind = self.pair_chunk[lo:hi] - g.start, self.pair_slot[lo:hi], self.pair_kind[lo:hi]
            for kd in torch.unique(kind).tolist():
                sel = (kind == kd).nonzero().flatten()
                ck, sk = c[sel], sl[sel]
                chunks = _as_index(ck)
                if isinstance(chunks, slice) and bool((sk == sk[0]).all()):  # a sliding window's diagonal, say
                    ops.append(("slot", chunks, int(sk[0]), self.kind_tiles[kd]))
                else:
                    ops.append(("pairs", ck, sk, self.kind_tiles[kd]))
        self._ops[(g.start, g.stop)] = ops
        return ops

    def __call__(self, s: torch.Tensor, g: slice) -> None:
        n_g, block = s.shape[0], self.block
        width = self.plan.width
        s4 = s.view(n_g, block, width, block)
        for op in self._group_ops(g):
            if op[0] == "pad":
                _, chunks, col = op
                if isinstance(chunks, slice):
                    s[chunks, :, col:].fill_(float("-inf"))
                else:
                    s[chunks, :, col:] = float("-inf")
            elif op[0] == "slot":  # a range of chunks, one slot: a view, filled in place
                _, chunks, slot, tile = op
                s4[chunks, :, slot, :].masked_fill_(tile, float("-inf"))
            else:
                _, chunks, slots, tile = op
                s4[chunks, :, slots, :] = s4[chunks, :, slots, :].masked_fill_(tile, float("-inf"))
        if self.attn_mask is not None:
            tiles = _gather_mask_tiles(self.plan, g, self.attn_mask, self.q_pos[g], self.k_pos[g], block, self.nb,
                                       self.heads)  # (n_g, R, query tok, key tok)
            s.masked_fill_(~tiles.permute(0, 2, 1, 3).reshape(n_g, block, width * block), float("-inf"))


def _as_index(idx: torch.Tensor) -> torch.Tensor | slice:
    """``idx`` (ascending) as a slice when it is one contiguous range, else unchanged."""
    first, last = int(idx[0]), int(idx[-1])
    return slice(first, last + 1) if last - first + 1 == idx.numel() else idx


def _own_index(idx: torch.Tensor) -> torch.Tensor | slice:
    """A group's own blocks (non-decreasing; a row split over chunks repeats its block) as a slice when they are one
    range without repeats, else unchanged."""
    if idx.numel() > 1 and not bool((idx[1:] - idx[:-1] == 1).all()):
        return idx
    return slice(int(idx[0]), int(idx[-1]) + 1)


def _rows_of(t: torch.Tensor, idx: torch.Tensor | slice) -> torch.Tensor:
    """``t``'s rows ``idx``: a view when ``idx`` is one range (a group of query-block rows with one chunk each, as
    under a sliding window), else a gather. A view is read only: callers scale into a new tensor, never in place."""
    if isinstance(idx, slice):
        return t[idx]
    return t.index_select(0, idx)


def _gather_mask_tiles(plan: _Plan, g: slice, attn_mask: torch.Tensor, q_pos, k_pos, block: int, nb: int,
                       heads: int) -> torch.Tensor:
    """The (query, key) tiles of a dense (B|1, H|1, L_pad, L_pad) mask under each slot of chunks ``g``."""
    mb, mh = attn_mask.shape[:2]
    tiles = attn_mask.reshape(mb, mh, nb, block, nb, block).permute(0, 1, 2, 4, 3, 5)  # (mb, mh, i, j, r, c)
    bh = plan.batch_head[g]
    b_idx = (bh // heads) if mb > 1 else torch.zeros_like(bh)
    h_idx = (bh % heads) if mh > 1 else torch.zeros_like(bh)
    return tiles[b_idx[:, None], h_idx[:, None], q_pos, k_pos]


def _groups(n_chunks: int, per_chunk: int) -> list[slice]:
    """Groups of about ``_GROUP_ELEMS`` score elements, as many as a multiple of the worker count and of equal size
    (to one chunk), so that every worker gets the same work: 29 groups over 2 workers left one idle for a fifteenth
    of the pass. A fixed split, not a shared queue, so that each worker's dK/dV sums the same chunks in the same order
    on every call (bit-reproducible gradients)."""
    count = -(-n_chunks // max(1, _GROUP_ELEMS // max(per_chunk, 1)))
    workers = torch.get_num_threads()
    if workers > 1 and count > 1:
        count = min(n_chunks, -(-count // workers) * workers)
    bounds = [n_chunks * i // count for i in range(count + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(count)]


class _Workers:
    """One pool of worker threads for the process, kept across calls.

    A pool made per call started new threads every time: each one got a fresh stack and malloc arena, whose pages
    fault in again on first touch (measured: ~10k page faults per attention fwd+bwd, a fifth of its time). The pool
    is remade after a ``fork`` (a DataLoader worker, say), whose child inherits the pool object but none of its
    threads."""

    def __init__(self):
        self.pool: ThreadPoolExecutor | None = None
        self.size = 0
        self.pid = 0
        self.lock = threading.Lock()

    def get(self, workers: int) -> ThreadPoolExecutor:
        with self.lock:
            if self.pool is None or self.pid != os.getpid() or self.size < workers:
                if self.pool is not None and self.pid == os.getpid():
                    self.pool.shutdown(wait=True)
                self.pool = ThreadPoolExecutor(workers, thread_name_prefix="dist_sparse_cpu")
                self.size, self.pid = workers, os.getpid()
            return self.pool


_WORKERS = _Workers()


def _run_groups(groups: list[slice], body) -> None:
    """Call ``body(group, worker)`` for every group, spreading groups over ``torch.get_num_threads()`` workers.

    Each group is ~15 small ops. Run one after another with intra-op threading, every op is a parallel region whose
    barrier waits for all threads; on a shared machine one descheduled thread stalls every op (measured: 2 threads
    were 6x slower than 1 while other jobs ran). Instead each worker runs whole groups single-threaded, and workers
    only meet once at the end. Torch ops release the GIL, so Python threads run them in parallel.
    """
    workers = min(torch.get_num_threads(), len(groups))
    if workers <= 1:
        for g in groups:
            body(g, 0)
        return
    threads = torch.get_num_threads()
    grad_mode = torch.is_grad_enabled()  # thread-local: pool threads would run with autograd recording

    def work(w: int) -> None:
        torch.set_num_threads(1)
        with torch.set_grad_enabled(grad_mode):
            for g in groups[w::workers]:
                body(g, w)

    try:
        list(_WORKERS.get(workers).map(work, range(workers)))
    finally:
        torch.set_num_threads(threads)  # some backends keep one global thread count: give the caller its own back


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
    """Forward and backward over the plan's chunks, group by group in the workers.

    Everything that scales, divides or reduces a group's own rows (the softmax scale, the normalisation, the
    softmax-backward correction) runs in the worker on the group's gathered blocks while they are in cache: done once
    over the whole (B, H, L, D) tensors on the calling thread, those passes cost about a tenth of the attention
    (measured at seq 4096, causal)."""

    @staticmethod
    def forward(ctx, q, k, v, rows: _Plan, row_mask, block: int, scale: float, keep: bool):
        batch, heads, seq_pad, dim = q.shape
        qb = q.reshape(-1, block, dim)
        kb = k.reshape(-1, block, dim)
        vb = v.reshape(-1, block, dim)
        n, width = rows.slot_blocks.shape
        # scaled by scale * log2(e): the scores come out in base 2, so exp2 replaces exp (4x cheaper on CPU, measured)
        q_scale = scale * _LOG2E
        alone = not rows.split.numel()  # every chunk alone on its row: its result is the row's, finished in the worker
        m_all = None if alone else torch.empty(n, block)
        l_all = None if alone else torch.empty(n, block)
        lse_all = torch.empty(n, block) if alone else None
        o_all = torch.empty(n, block, dim)
        s_all = torch.empty(n, block, width * block) if keep else None
        c_all = torch.empty(n, block) if keep else None

        def group_forward(g: slice, _worker: int) -> None:
            kv_idx = rows.slot_blocks[g].reshape(-1)
            s = torch.bmm(_rows_of(qb, _own_index(rows.own_blocks[g])) * q_scale,
                          kb.index_select(0, kv_idx).view(-1, width * block, dim).transpose(1, 2),
                          **({} if s_all is None else {"out": s_all[g]}))
            if row_mask is not None:
                row_mask(s, g)
            m = s.amax(-1)
            if row_mask is not None:
                m.masked_fill_(m == float("-inf"), 0.0)  # all-masked chunk rows: exp(-inf - 0) = 0, not NaN
            s.sub_(m[..., None]).exp2_()
            den = s.sum(-1)
            o = o_all[g]
            torch.bmm(s, vb.index_select(0, kv_idx).view(-1, width * block, dim), out=o)
            if not alone:
                m_all[g], l_all[g] = m, den
                return
            # the row's output and its log-sum-exp in base 2; +inf for rows with no allowed key (only under a mask):
            # recomputed probabilities are then exactly 0
            empty = (den == 0) if row_mask is not None else None
            if empty is not None:
                den.masked_fill_(empty, 1.0)
            o.div_(den[..., None])
            if c_all is not None:
                torch.reciprocal(den, out=c_all[g])
            torch.add(m, torch.log2(den), out=lse_all[g])
            if empty is not None:
                lse_all[g].masked_fill_(empty, float("inf"))

        _run_groups(_groups(n, block * width * block), group_forward)

        if alone:  # rows with no chunk: output 0; their log-sum-exp is never read (no chunk recomputes them)
            out, lse = _per_row(o_all, rows), _per_row(lse_all, rows)
        else:
            # Rows spread over chunks: rescale every chunk to its row's max and add (log-sum-exp merge). Chunks whose
            # row part is fully masked have l == 0; their max must not raise the row max.
            m_eff = m_all.masked_fill(l_all == 0, float("-inf"))
            row_max = _per_row(m_eff, rows, "max")
            row_max.masked_fill_(row_max == float("-inf"), 0.0)
            factor = torch.exp2(m_eff - row_max.index_select(0, rows.out_rows))
            row_l = _per_row(l_all * factor, rows)
            row_o = _per_row(o_all * factor[..., None], rows)
            empty = row_l == 0
            out = row_o / row_l.masked_fill(empty, 1.0)[..., None]
            if keep:
                torch.div(factor, row_l.masked_fill(empty, 1.0).index_select(0, rows.out_rows), out=c_all)
            lse = (row_max + torch.log2(row_l.masked_fill(empty, 1.0))).masked_fill_(empty, float("inf"))
        out = out.view(batch, heads, seq_pad, dim)
        ctx.save_for_backward(q, k, v, out, lse, *((s_all, c_all) if keep else ()))
        ctx.plan, ctx.row_mask, ctx.block, ctx.scale = rows, row_mask, block, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, *kept = ctx.saved_tensors
        s_all, c_all = kept if kept else (None, None)
        rows, row_mask, block, scale = ctx.plan, ctx.row_mask, ctx.block, ctx.scale
        dim = k.shape[-1]
        qb = q.reshape(-1, block, dim)
        kb = k.reshape(-1, block, dim)
        vb = v.reshape(-1, block, dim)
        ob = out.reshape(-1, block, dim)
        dob = dout.contiguous().reshape(-1, block, dim)
        n, width = rows.slot_blocks.shape
        groups = _groups(n, block * width * block)
        # One dK/dV accumulator per worker: index_add_ from two threads into one tensor would race.
        n_acc = max(1, min(torch.get_num_threads(), len(groups)))
        dkb = [torch.zeros_like(kb) for _ in range(n_acc)]
        dvb = [torch.zeros_like(vb) for _ in range(n_acc)]
        dq_all = torch.empty(n, block, dim)

        def group_backward(g: slice, worker: int) -> None:
            own = _own_index(rows.own_blocks[g])
            kv_idx = rows.slot_blocks[g].reshape(-1)
            qs = _rows_of(qb, own) * scale  # scale * Q: dK = dS^T (scale * Q)
            dog = _rows_of(dob, own)
            delta = (dog * _rows_of(ob, own)).sum(-1)  # rowsum(dO * O), the softmax-backward correction
            kg = kb.index_select(0, kv_idx).view(-1, width * block, dim)
            if s_all is None:
                p = torch.bmm(qs * _LOG2E, kg.transpose(1, 2))
                if row_mask is not None:
                    row_mask(p, g)
                p.sub_(_rows_of(lse, own)[..., None]).exp2_()
            else:
                # P = S * c: the forward's unnormalised exponentials times their row's factor; c goes onto dO and
                # delta, small (block, D) and (block,) tensors, instead of onto P
                p, c = s_all[g], c_all[g]
                dog = dog * c[..., None]
                delta.mul_(c)
            # Padding slots point at a real block but carry p = dS = 0: they add zeros there.
            dvb[worker].index_add_(0, kv_idx, torch.bmm(p.transpose(1, 2), dog).view(-1, block, dim))
            ds = torch.bmm(dog, vb.index_select(0, kv_idx).view(-1, width * block, dim).transpose(1, 2))
            ds.sub_(delta[..., None]).mul_(p)  # dS = P * (dO V^T - delta)
            torch.bmm(ds, kg, out=dq_all[g]).mul_(scale)
            dkb[worker].index_add_(0, kv_idx, torch.bmm(ds.transpose(1, 2), qs).view(-1, block, dim))

        _run_groups(groups, group_backward)
        dq = _per_row(dq_all, rows).view_as(out)
        for acc in (dkb, dvb):  # the workers' accumulators, added in place into the first
            for other in acc[1:]:
                acc[0].add_(other)
        return dq, dkb[0].view_as(k), dvb[0].view_as(v), None, None, None, None, None


# Plans (and their maskers when no dense mask is given) of recent layouts: a model calls the kernel with the same
# layout and shapes in every layer and step, and building a causal plan costs ~7 ms (seq 4096, 8 heads, measured),
# a few percent of the attention itself. Keyed by the layout's contents, so a changed layout gets a new plan.
_PLANS: OrderedDict = OrderedDict()
_PLANS_KEPT = 8
_PLANS_LOCK = threading.Lock()


def _plan_and_masker(eff: torch.Tensor, batch: int, heads: int, kv_heads: int, block: int, causal: bool, seq: int,
                     attn_mask: torch.Tensor | None) -> tuple[_Plan, _Masker]:
    nb = eff.shape[-1]
    key = (tuple(eff.shape), eff.contiguous().numpy().tobytes(), batch, heads, kv_heads, block, causal, seq)
    with _PLANS_LOCK:
        hit = _PLANS.get(key)
        if hit is not None:
            _PLANS.move_to_end(key)
    if hit is None:
        plan = _build_plan(eff, batch, heads, kv_heads)
        hit = (plan, _Masker(plan, block, nb, heads, causal, seq, None))  # the dense mask is added per call
        with _PLANS_LOCK:
            _PLANS[key] = hit
            while len(_PLANS) > _PLANS_KEPT:
                _PLANS.popitem(last=False)
    plan, masker = hit
    return plan, masker if attn_mask is None else masker.with_dense_mask(attn_mask)


def cpu_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    block_size: int,
    causal: bool = False,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    keep_probabilities: bool | str = "auto",
) -> torch.Tensor:
    """Block-sparse attention on CPU tensors. Inputs must already be validated (see ``block_sparse_attention``).

    Pads the sequence to a multiple of ``block_size`` (padded keys are masked); computes in fp32 whatever the input
    dtype (CPU half-precision matmuls are slow and lose accuracy) and returns the input dtype.
    """
    keep_freed_memory()
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
    rows, mask = _plan_and_masker(effective_layout(layout.cpu(), causal), batch, heads, kv_heads, block_size,
                                  causal, seq, attn_mask)
    # Keeping the probabilities saves the backward a third of its work (a batched matmul, the masking and the exp2 of
    # every score: 8-25% of fwd+bwd, measured), at the price of storing the active blocks' probabilities, like
    # eager attention does for the whole matrix (and DeepSpeed's sparse attention did for its blocks). Only under
    # autograd, and only when they are at most _KEPT_PROBS_RATIO times the tensors the backward keeps anyway.
    prob_elems = rows.slot_blocks.numel() * block_size * block_size
    keep = (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)) and keep_probabilities is not False
            and (keep_probabilities is True or prob_elems <= _KEPT_PROBS_RATIO * 2 * (q.numel() + k.numel())))
    out = _BlockSparseCPU.apply(q, k, v, rows, mask if mask.active else None, block_size, scale, keep)
    return out[:, :, :seq].to(dtype)
