"""The block index of a block-sparse weight: which ``(bh, bw)`` blocks are active, and how they are packed.

Format (the one packed-weight format of the block-sparse operator): the weight as ``nn.Linear`` stores it,
``(out, in)``, is cut into ``nr = ceil(out / bh)`` block rows and ``nc = ceil(in / bw)`` block columns (edge blocks of
irregular shapes are padded with zeros). The active blocks, in row-major order (``rows``, ``cols``: int64
``(nnz,)``), are packed into one contiguous ``(nnz, bh, bw)`` tensor; block ``b`` holds
``W[rows[b]*bh : +bh, cols[b]*bw : +bw]``. GPT-2's ``Conv1D`` stores ``Wᵀ`` (``(in, out)``); packing reads it through
a transposed view, so the packed blocks are the same for both layouts.

Besides the lists, the index keeps per-row and per-column lookup tables (for the Triton kernels) and the CPU plan's
*groups*: block rows with the same number of active blocks are one batched matmul (no padding, no merging).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["BlockIndex", "Groups"]


@dataclass
class Groups:
    """One orientation of the layout, grouped for batched matmuls: for every count ``k`` of active blocks,
    ``(out_idx (n_k,), in_idx (n_k * k,), blk (n_k * k,), k)``; ``empty`` lists output blocks with nothing active.

    Forward and sampled dW use the row orientation (out = block rows, in = block columns), dX the column one.
    """

    items: list
    empty: torch.Tensor
    # group order: group g's outputs fill slots [starts[g], starts[g] + n_k) of a (tokens, n_slots, b_out) buffer,
    # slot n_slots - 1 stays zero; ``inverse[o]`` is output block o's slot (empty outputs point at the zero slot)
    starts: list = field(default_factory=list)
    inverse: torch.Tensor | None = None

    @property
    def n_slots(self) -> int:
        return (self.starts[-1] + self.items[-1][0].numel() if self.items else 0) + 1


def _groups(layout: torch.Tensor, block_ids: torch.Tensor) -> Groups:
    """Groups of the rows of ``layout`` (n_out, n_in); ``block_ids[i, j]`` is the packed index of block (i, j)."""
    counts = layout.sum(1)
    items = []
    for k in torch.unique(counts).tolist():
        if k == 0:
            continue
        out_idx = (counts == k).nonzero().flatten()
        sub = layout[out_idx]  # row-major nonzero: ascending in-index inside each row
        in_idx = sub.nonzero(as_tuple=True)[1]
        blk = block_ids[out_idx][sub]
        items.append((out_idx, in_idx, blk, int(k)))
    starts, inverse, pos = [], torch.full((layout.shape[0],), -1, dtype=torch.int64), 0
    for out_idx, *_ in items:
        starts.append(pos)
        inverse[out_idx] = torch.arange(pos, pos + out_idx.numel())
        pos += out_idx.numel()
    inverse[inverse < 0] = pos  # the zero slot
    return Groups(items, (counts == 0).nonzero().flatten(), starts, inverse)


def _lut(layout: torch.Tensor, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``layout``: active in-indices first (ascending), their packed ids, their count (int32)."""
    counts = layout.sum(1, dtype=torch.int32)
    width = max(int(counts.max().item()) if counts.numel() else 0, 1)
    order = torch.argsort((~layout).to(torch.int8), dim=1, stable=True)[:, :width]
    blk = torch.gather(block_ids, 1, order).clamp_min(0)
    return order.to(torch.int32).contiguous(), blk.to(torch.int32).contiguous(), counts.contiguous()


@dataclass
class BlockIndex:
    """Which blocks of an ``(out, in)`` weight are active. Build it with :meth:`from_layout` / :meth:`from_mask`."""

    shape: tuple[int, int]  # (out, in)
    block: tuple[int, int]  # (bh, bw)
    layout: torch.Tensor  # bool (nr, nc), on the CPU
    rows: torch.Tensor  # int64 (nnz,), row-major
    cols: torch.Tensor
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_layout(cls, layout: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> BlockIndex:
        bh, bw = (int(b) for b in block)
        out, inp = (int(s) for s in shape)
        nr, nc = -(-out // bh), -(-inp // bw)
        layout = layout.detach().to("cpu", torch.bool)
        if tuple(layout.shape) != (nr, nc):
            raise ValueError(f"layout must have shape ({nr}, {nc}) for a ({out}, {inp}) weight in {bh}x{bw} blocks, "
                             f"got {tuple(layout.shape)}")
        rows, cols = layout.nonzero(as_tuple=True)
        return cls((out, inp), (bh, bw), layout.contiguous(), rows, cols)

    @classmethod
    def from_mask(cls, mask: torch.Tensor, block: tuple[int, int]) -> BlockIndex:
        """Blocks of an element mask ``(out, in)``: a block is active if any of its entries is (so the operator's
        output equals the masked dense product for any mask; for block-structured masks nothing is wasted)."""
        bh, bw = (int(b) for b in block)
        out, inp = mask.shape
        nr, nc = -(-out // bh), -(-inp // bw)
        m = torch.nn.functional.pad(mask.detach().to("cpu", torch.bool), (0, nc * bw - inp, 0, nr * bh - out))
        return cls.from_layout(m.view(nr, bh, nc, bw).any(3).any(1), (bh, bw), (out, inp))

    # -- sizes ---------------------------------------------------------------------------------------------------
    @property
    def nr(self) -> int:
        return self.layout.shape[0]

    @property
    def nc(self) -> int:
        return self.layout.shape[1]

    @property
    def nnz(self) -> int:
        return self.rows.numel()

    @property
    def density(self) -> float:
        """Active blocks / all blocks: the fraction of the dense product's multiply-adds the kernels do."""
        return self.nnz / max(1, self.nr * self.nc)

    @property
    def padded(self) -> bool:
        return self.shape != (self.nr * self.block[0], self.nc * self.block[1])

    # -- plans (built once per index, cached; per device for the lookup tables) ---------------------------------
    def _ids(self) -> torch.Tensor:
        ids = torch.full((self.nr, self.nc), -1, dtype=torch.int64)
        ids[self.rows, self.cols] = torch.arange(self.nnz)
        return ids

    def row_groups(self) -> Groups:
        if "row_groups" not in self._cache:
            self._cache["row_groups"] = _groups(self.layout, self._ids())
        return self._cache["row_groups"]

    def col_groups(self) -> Groups:
        if "col_groups" not in self._cache:
            self._cache["col_groups"] = _groups(self.layout.t(), self._ids().t())
        return self._cache["col_groups"]

    def row_lut(self, device) -> tuple:
        key = ("row_lut", str(device))
        if key not in self._cache:
            self._cache[key] = tuple(t.to(device) for t in _lut(self.layout, self._ids()))
        return self._cache[key]

    def col_lut(self, device) -> tuple:
        key = ("col_lut", str(device))
        if key not in self._cache:
            self._cache[key] = tuple(t.to(device) for t in _lut(self.layout.t().contiguous(), self._ids().t()))
        return self._cache[key]

    def device_lists(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("lists", str(device))
        if key not in self._cache:
            self._cache[key] = (self.rows.to(device, torch.int32), self.cols.to(device, torch.int32))
        return self._cache[key]

    # -- packing -------------------------------------------------------------------------------------------------
    def _blocked(self, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
        """``weight`` as an ``(nr, bh, nc, bw)`` view of ``(out, in)`` (padded with zeros when irregular)."""
        w = weight.t() if transposed else weight
        if tuple(w.shape) != self.shape:
            want = self.shape[::-1] if transposed else self.shape
            raise ValueError(f"weight has shape {tuple(weight.shape)}, the block index was built for {want}")
        bh, bw = self.block
        if self.padded:
            w = torch.nn.functional.pad(w, (0, self.nc * bw - self.shape[1], 0, self.nr * bh - self.shape[0]))
        return w.view(self.nr, bh, self.nc, bw)

    def pack(self, weight: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """The active blocks of ``weight`` as a contiguous ``(nnz, bh, bw)`` tensor (a gather: nnz * bh * bw
        values, the density's share of the weight)."""
        rows, cols = self.rows.to(weight.device), self.cols.to(weight.device)
        return self._blocked(weight, transposed)[rows, :, cols].contiguous()

    def unpack(self, blocks: torch.Tensor, transposed: bool = False, dtype=None) -> torch.Tensor:
        """A dense weight-shaped tensor (``(in, out)`` when ``transposed``) holding ``blocks`` at the active
        positions and zeros elsewhere: the sampled gradient in the shape DeepSpeed reduces."""
        bh, bw = self.block
        dtype = dtype or blocks.dtype
        rows, cols = self.rows.to(blocks.device), self.cols.to(blocks.device)
        if transposed:
            full = torch.zeros(self.nc, bw, self.nr, bh, device=blocks.device, dtype=dtype)
            full[cols, :, rows] = blocks.transpose(1, 2).to(dtype)
            full = full.view(self.nc * bw, self.nr * bh)
            return full[: self.shape[1], : self.shape[0]].contiguous() if self.padded else full
        full = torch.zeros(self.nr, bh, self.nc, bw, device=blocks.device, dtype=dtype)
        full[rows, :, cols] = blocks.to(dtype)
        full = full.view(self.nr * bh, self.nc * bw)
        return full[: self.shape[0], : self.shape[1]].contiguous() if self.padded else full
