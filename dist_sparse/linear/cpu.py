"""Block-sparse linear products on CPU: vectorised PyTorch over the active blocks only.

Plan. Tokens are cut into tiles of ``_TILE`` rows; a tile of X (``_TILE x in`` floats, ~1 MiB at in=1024) stays in a
core's L2 while every block of the weight is applied to it. Reading X block by block over all tokens instead streams
every active block's slice of X from memory again (measured: 3-4x slower than the matmuls themselves). Inside a
tile, block rows are grouped by their number ``k`` of active blocks (``BlockIndex.row_groups``): one group is one
batched matmul ``(n_k, tile, k*bw) @ (n_k, k*bw, bh)`` over the X blocks gathered with ``index_select``, and its
results are copied into their block rows of Y. Grouping by count needs neither padding slots nor a merge of partial
rows (attention's chunking needs both: its rows are much longer), and a random or RigL layout has only ~10 distinct
counts, so a tile costs a few dozen ops.

dX is the same product on the transposed layout (``col_groups``: block columns grouped by count, the weight blocks
stacked along their rows), and the sampled dW walks the same column groups in the same pass, reusing dX's gather of
dY: ``dW_col += dY_gatheredᵀ @ X[:, col]``.

Tiles are independent for Y and dX (disjoint token ranges) and add up for dW (one fp32 accumulator per worker,
summed once at the end), so ``torch.get_num_threads()`` single-threaded workers share them, as the attention path
does (``dist_sparse.attention.cpu._run_groups``: no per-op thread barriers, which stall on a busy machine).

Every product computes in fp32 (bf16 inputs are widened tile by tile) and returns the input dtype; dW blocks are
returned in fp32.
"""

from __future__ import annotations

import torch

from dist_sparse.attention.cpu import _run_groups

from .index import BlockIndex, Groups

__all__ = ["cpu_grad_input", "cpu_grad_weight_blocks", "cpu_linear_forward"]

# Tokens per tile. 256 keeps X's tile (1 MiB at in=1024, fp32), the gathered blocks and one group's result in L2;
# measured on the 1024 -> 4096 MLP: 128 costs ~5% more (per-op overhead), 512 ~40% more (cache misses).
_TILE = 256


def _tiles(n_tok: int) -> list[slice]:
    return [slice(s, min(s + _TILE, n_tok)) for s in range(0, n_tok, _TILE)]


def _group_weights_fwd(packed: torch.Tensor, groups: Groups, block) -> list:
    """Per row group, the weight operand ``(n_k, k*bw, bh)``: the row's blocks stacked along the input, transposed."""
    bh, bw = block
    return [packed.index_select(0, blk).view(-1, k, bh, bw).permute(0, 1, 3, 2).reshape(-1, k * bw, bh)
            for _, _, blk, k in groups.items]


def _group_weights_dx(packed: torch.Tensor, groups: Groups, block) -> list:
    """Per column group, ``(n_k, k*bh, bw)``: the column's blocks stacked along the output."""
    bh, bw = block
    return [packed.index_select(0, blk).view(-1, k * bh, bw) for _, _, blk, k in groups.items]


class _Scratch:
    """Per-worker scratch buffers, kept across calls. A fresh gather or matmul result of a few MiB per op is a new
    ``mmap`` whose pages fault in on first touch; measured, that cost as much as the matmuls. Every temporary of the
    tile loops is a view into one of these instead (``out=`` variants of ``index_select`` and ``bmm``)."""

    def __init__(self):
        self.bufs: dict = {}

    def get(self, worker: int, slot: int, shape) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        buf = self.bufs.get((worker, slot))
        if buf is None or buf.numel() < n:
            buf = self.bufs[(worker, slot)] = torch.empty(max(n, 1))
        return buf[:n].view(*shape)


_SCRATCH = _Scratch()


def _grouped_product(src: torch.Tensor, dst: torch.Tensor, groups: Groups, weights: list, b_in: int,
                     b_out: int) -> None:
    """``dst (n_tok, n_out * b_out) = src (n_tok, n_in * b_in)`` through the grouped blocks, tile by tile.

    Each group's batched matmul writes straight into its slots of a group-ordered buffer (a strided ``out=``, no
    copy), and one ``index_select`` per tile puts the slots back in output order (empty outputs read a zero slot).
    Scattering each group's result into place instead (``index_copy_``) ran at a quarter of the gather's speed and
    was the largest cost of the forward (measured)."""
    n_tok = src.shape[0]
    src_b = src.view(n_tok, -1, b_in)
    dst_b = dst.view(n_tok, -1, b_out)
    n_slots = groups.n_slots

    def tile(t: slice, worker: int) -> None:
        s = src_b[t]
        if s.dtype != torch.float32:
            s = s.float()
        rows = s.shape[0]
        slots = _SCRATCH.get(worker, 1, (rows, n_slots, b_out))
        slots[:, n_slots - 1].zero_()
        for (out_idx, in_idx, _, k), w, start in zip(groups.items, weights, groups.starts):
            n_k = out_idx.numel()
            g = _SCRATCH.get(worker, 0, (rows, n_k * k, b_in))
            torch.index_select(s, 1, in_idx, out=g)
            # (rows, n_k*k, b_in) -> (n_k, rows, k*b_in): a strided view, which the batched GEMM reads as is
            torch.bmm(g.view(rows, n_k, k * b_in).transpose(0, 1), w,
                      out=slots[:, start:start + n_k].transpose(0, 1))
        torch.index_select(slots, 1, groups.inverse, out=dst_b[t])

    _run_groups(_tiles(n_tok), tile)


def cpu_linear_forward(x: torch.Tensor, packed: torch.Tensor, index: BlockIndex) -> torch.Tensor:
    """``Y (n_tok, nr * bh) = X (n_tok, nc * bw) Wᵀ`` over the active blocks (``packed``: fp32 ``(nnz, bh, bw)``)."""
    bh, bw = index.block
    groups = index.row_groups()
    y = torch.empty(x.shape[0], index.nr * bh)  # fp32; bf16 inputs get their result rounded once, at the end
    _grouped_product(x, y, groups, _group_weights_fwd(packed, groups, index.block), bw, bh)
    return y.to(x.dtype)


def cpu_grad_input(dy: torch.Tensor, packed: torch.Tensor, index: BlockIndex) -> torch.Tensor:
    """``dX (n_tok, nc * bw) = dY (n_tok, nr * bh) W`` over the active blocks."""
    bh, bw = index.block
    groups = index.col_groups()
    dx = torch.empty(dy.shape[0], index.nc * bw)
    _grouped_product(dy, dx, groups, _group_weights_dx(packed, groups, index.block), bh, bw)
    return dx.to(dy.dtype)


def cpu_grad_weight_blocks(dy: torch.Tensor, x: torch.Tensor, index: BlockIndex, packed: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The sampled product, fp32 ``(nnz, bh, bw)`` with block ``b`` = ``dY[:, rows[b]]ᵀ X[:, cols[b]]``, and with
    ``packed`` given also ``dX = dY W`` (else None): ``(dx, blocks)``.

    Both walk the column groups: per block column ``c`` with ``k`` active blocks, the ``k`` blocks of dY it pairs
    with are gathered once (``G``, ``(tile, k*bh)``) and serve dX (``G @ W_c``) and the column's dW blocks
    (``Gᵀ X[:, c]``: X's column blocks are gathered once each, not once per block row that uses them, as the row
    orientation would). Walking the row groups instead copies X's blocks ``nnz / nc`` times over; sharing dX's
    gather made the backward 1.1-1.2x faster on the benchmark MLP at 32x32 blocks (measured)."""
    bh, bw = index.block
    groups = index.col_groups()
    n_tok = x.shape[0]
    x_b = x.view(n_tok, -1, bw)
    dy_b = dy.view(n_tok, -1, bh)
    tiles = _tiles(n_tok)
    workers = max(1, min(torch.get_num_threads(), len(tiles)))
    acc = [[None] * len(groups.items) for _ in range(workers)]
    dx = None
    if packed is not None:
        dx = torch.empty(n_tok, index.nc * bw)
        dx_b = dx.view(n_tok, -1, bw)
        weights = _group_weights_dx(packed, groups, index.block)
        n_slots = groups.n_slots

    def tile(t: slice, worker: int) -> None:
        dys, xs = dy_b[t], x_b[t]
        if dys.dtype != torch.float32:
            dys, xs = dys.float(), xs.float()
        rows = dys.shape[0]
        if dx is not None:
            slots = _SCRATCH.get(worker, 1, (rows, n_slots, bw))
            slots[:, n_slots - 1].zero_()
        for gi, (out_idx, in_idx, _, k) in enumerate(groups.items):
            n_k = out_idx.numel()
            g = _SCRATCH.get(worker, 0, (rows, n_k * k, bh))
            torch.index_select(dys, 1, in_idx, out=g)
            g = g.view(rows, n_k, k * bh)
            if dx is not None:
                start = groups.starts[gi]
                torch.bmm(g.transpose(0, 1), weights[gi], out=slots[:, start:start + n_k].transpose(0, 1))
            xc = _SCRATCH.get(worker, 2, (rows, n_k, bw))
            torch.index_select(xs, 1, out_idx, out=xc)
            gt, xc = g.permute(1, 2, 0), xc.transpose(0, 1)  # (n_k, k*bh, rows), (n_k, rows, bw)
            a = acc[worker][gi]
            if a is None:
                acc[worker][gi] = torch.bmm(gt, xc)
            else:
                a.baddbmm_(gt, xc)
        if dx is not None:
            torch.index_select(slots, 1, groups.inverse, out=dx_b[t])

    _run_groups(tiles, tile)
    out = torch.zeros(index.nnz, bh, bw)
    for gi, (_, _, blk, _) in enumerate(groups.items):
        parts = [a[gi] for a in acc if a[gi] is not None]
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        # (n_k, k*bh, bw) -> (n_k*k, bh, bw): the column's blocks in the group's block order
        out.index_copy_(0, blk, total.view(-1, bh, bw))
    return (None if dx is None else dx.to(dy.dtype)), out
