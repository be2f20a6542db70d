"""Sparsity patterns: how a method's scores become masks (``sparsity.pattern``).

A method decides *what* to keep (scores, eligibility, how many per selection group); the pattern decides the
*shape* of what may be kept. Every pattern selects through the selector (``dist_sparse.masks.select``), so a
pattern's masks are the same whether a tensor lives in one process or is sharded over ranks.

- :class:`Unstructured` (``unstructured``): the ``k`` highest-scoring eligible weights of each group, anywhere.
- :class:`NM` (``"N:M"``, e.g. ``"2:4"``): at most N kept in every *cell* of M consecutive input weights of one
  output row (the sparse tensor cores' 2:4 layout). The density is fixed at N/M.
- :class:`Block` (``"block:HxW"``): kept weights come in whole blocks of H output rows x W input columns; a block
  is scored by the L2 norm of its weights' scores (|w| -> the block's Frobenius norm).

Orientation: cells are defined on the (out, in) matrix of a layer. ``nn.Linear`` stores (out, in); GPT-2's
``Conv1D`` stores (in, out), so for the layers named in ``transposed`` (see :meth:`SparsityPattern.bind`) an N:M
cell runs down a stored column and a block is W stored rows x H stored columns (as ``oneshot/nm.py`` does).

Sharding: ZeRO cuts the *flattened* stored tensor at arbitrary offsets, so a cell (an N:M group, a block) may
straddle two ranks' ranges. Structured patterns therefore exchange, once per selection, the elements of the
"bands" (runs of stored rows that hold whole cells) their range only partly covers; every rank then sees each cell
touching its range complete and decides it exactly as one process would. The exchange is small: at most two bands
per rank and layer (a band is one stored row for N:M on ``nn.Linear``, M rows for ``Conv1D``, H or W rows for
blocks).

The API other code may rely on (block-sparse kernels, exports, checks):

- :func:`parse_pattern` ``("2:4" | "block:16x16" | "unstructured") -> SparsityPattern`` (a ConfigError naming the
  key otherwise); ``pattern.spec`` is the canonical text again.
- ``pattern.block_shape``: ``(H, W)`` for :class:`Block` (rows x cols of the (out, in) matrix), ``None`` otherwise;
  ``pattern.nm``: ``(N, M)`` for :class:`NM`, ``None`` otherwise; ``pattern.fixed_density``: N/M or None;
  ``pattern.granule``: weights per selection unit (H*W for blocks, else 1).
- ``pattern.oriented(mask_or_weight, transposed)``: the (out, in) view of a stored 2-D tensor;
  ``pattern.conforms(full_mask, transposed)``: whether a whole stored mask has the pattern's structure;
  ``Block.block_mask(full_mask, transposed)``: the (out/H, in/W) bool layout of kept blocks.

Structured patterns beyond these subclass :class:`SparsityPattern` and are registered with :func:`register`.
"""

import re

import torch

from dist_sparse.errors import ConfigError
from dist_sparse.masks.select import Piece, score_keys


class SparsityPattern:
    """Turns per-slice scores into masks. ``select`` receives the method (for its selection groups), this rank's
    slices, one score tensor and one eligibility tensor (None: all eligible) per slice, the number of weights to
    keep per group and, optionally, ``held``: per slice the weights already kept by an earlier selection of the
    same decision (SET/RigL's survivors when they regrow), which count against a structured cell's capacity. It
    returns one bool mask per slice (only newly selected weights; the caller unions with ``held``)."""

    name = "base"
    fixed_density: float | None = None  # N:M fixes every layer's density at N/M; None: the distribution decides
    granule = 1  # weights per selection unit: a method's counts are rounded to multiples of it (a block's H*W)
    block_shape: tuple | None = None  # (H, W) of Block; None for other patterns
    nm: tuple | None = None  # (N, M) of NM; None for other patterns
    spec = "base"

    def __init__(self):
        self.transposed: frozenset = frozenset()

    def bind(self, shapes: dict, transposed=(), key: str = "sparsity.pattern") -> "SparsityPattern":
        """Fix the layers this pattern decides on: ``shapes`` name -> stored shape, ``transposed`` the names stored
        (in, out) (GPT-2 ``Conv1D``). Checks every layer fits the pattern (a ConfigError naming ``key``)."""
        self.transposed = frozenset(transposed)
        return self

    def oriented(self, t: torch.Tensor, transposed: bool) -> torch.Tensor:
        """The (out, in) view of a stored 2-D tensor (``transposed``: stored (in, out), GPT-2's ``Conv1D``)."""
        return t.t() if transposed else t

    def conforms(self, mask: torch.Tensor, transposed: bool = False) -> bool:
        """Whether the whole stored mask ``mask`` has this pattern's structure."""
        return True

    def select(self, method, slices: list, scores: list, eligible: list, keep: dict, selector, held=None) -> list:
        raise NotImplementedError


class Unstructured(SparsityPattern):
    """Any weight may be kept: the exact top-k of each selection group (a layer, or every layer for ``global``)."""

    name = spec = "unstructured"

    def select(self, method, slices, scores, eligible, keep, selector, held=None):
        pieces = [Piece(sc, el, method.group_of(s), s.order, s.start) for s, sc, el in zip(slices, scores, eligible)]
        return selector.topk(pieces, keep)


class _CellPattern(SparsityPattern):
    """A pattern whose decisions are made per *cell* (an N:M group, a block): cells are ``cell_shape(transposed)``
    = (rows, cols) tiles of the stored matrix, numbered row-major over the tile grid."""

    cell_size = 1

    def cell_shape(self, transposed: bool) -> tuple:
        raise NotImplementedError

    def _check_layer(self, name: str, shape: tuple, key: str) -> None:
        if len(shape) != 2:
            raise ConfigError(key, f"{self.spec} needs 2-D weight matrices; {name} has shape {tuple(shape)} "
                                   "(exclude it with sparsity.exclude)")
        rows, cols = self.cell_shape(name in self.transposed)
        if shape[0] % rows or shape[1] % cols:
            out_in = (shape[1], shape[0]) if name in self.transposed else tuple(shape)
            raise ConfigError(key, f"layer {name} (out, in) = {out_in} is not divisible into {self.spec} cells")

    def bind(self, shapes, transposed=(), key="sparsity.pattern"):
        super().bind(shapes, transposed, key)
        for name, shape in shapes.items():
            self._check_layer(name, tuple(shape), key)
        return self

    def _cells_of(self, s, index: torch.Tensor) -> torch.Tensor:
        rows, cols = self.cell_shape(s.name in self.transposed)
        width = s.shape[1]
        return (index // width // rows) * (width // cols) + (index % width) // cols

    def _band(self, s) -> int:
        """Elements of one band: the stored rows that hold whole cells."""
        return self.cell_shape(s.name in self.transposed)[0] * s.shape[1]

    def _bands(self, s) -> tuple:
        """``(lo, hi, grid)``: the whole bands ``[lo, hi)`` (flat indices) that a slice's range touches and their tile
        grid ``(bands, cell rows, cells across, cell cols)``."""
        band, n = self._band(s), s.mask.numel()
        lo, hi = s.start // band * band, -(-(s.start + n) // band) * band
        c_rows, c_cols = self.cell_shape(s.name in self.transposed)
        return lo, hi, ((hi - lo) // band, c_rows, s.shape[1] // c_cols, c_cols)

    def scatter_local(self, slices: list, table: list, flags: list) -> list:
        """Per slice, a bool mask of its range from per-cell ``flags`` ([cells, cell_size], laid out like
        :meth:`cell_table`'s cells): the cell grouping undone, this rank's range kept."""
        out = []
        for s, f in zip(slices, flags):
            n = s.mask.numel()
            if not n:
                out.append(torch.zeros(0, dtype=torch.bool, device=s.mask.device))
                continue
            lo, _, (bands, c_rows, across, c_cols) = self._bands(s)
            flat = f.reshape(bands, across, c_rows, c_cols).transpose(1, 2).reshape(-1)
            out.append(flat[s.start - lo: s.start - lo + n].to(s.mask.device))
        return out

    def cell_table(self, slices: list, columns: list, selector) -> list:
        """For each slice, every cell touching its range, complete: ``(index, values, local)`` where ``index``
        (int64, [cells, cell_size]) are global flat indices, ascending inside each cell, ``values`` the matching
        rows of the slice's int64 ``columns[i]`` ([cells, cell_size, columns]) and ``local`` whether the element is
        in this rank's range. The elements of bands a range covers only partly are exchanged (one all-gather for
        all slices); every rank touching such a band sends its part, so the band arrives whole."""
        edge_rows = []
        for s, cols in zip(slices, columns):
            n, band = s.mask.numel(), self._band(s)
            pos = torch.arange(n, dtype=torch.int64)
            index = pos + s.start
            edge = torch.zeros(n, dtype=torch.bool)
            if n and s.start % band:  # the head of the range is inside a band
                edge |= pos < band - s.start % band
            if n and (s.start + n) % band:  # so is the tail
                edge |= pos >= n - (s.start + n) % band
            if edge.any():
                edge_rows.append(torch.stack([torch.full_like(index[edge], s.order), index[edge],
                                              *[c[edge] for c in cols]], dim=1))
        width = 2 + (len(columns[0]) if columns else 0)
        mine = torch.cat(edge_rows) if edge_rows else torch.zeros(0, width, dtype=torch.int64)
        everyone = torch.cat([p.reshape(-1, width) for p in selector.gather(mine.reshape(-1))])
        out = []
        n_cols = width - 2
        for s, cols in zip(slices, columns):
            n, size = s.mask.numel(), self.cell_size
            if not n:
                out.append((torch.zeros(0, size, dtype=torch.int64), torch.zeros(0, size, n_cols, dtype=torch.int64),
                            torch.zeros(0, size, dtype=torch.bool)))
                continue
            # the whole bands the range touches, [lo, hi): this rank's part, then the other ranks' parts of its
            # first and last band
            lo, hi, grid = self._bands(s)
            values = torch.zeros(hi - lo, n_cols, dtype=torch.int64)
            local = torch.zeros(hi - lo, dtype=torch.bool)
            filled = torch.zeros(hi - lo, dtype=torch.bool)
            own = slice(s.start - lo, s.start - lo + n)
            if cols:
                values[own] = torch.stack(cols, dim=1)
            local[own] = True
            filled[own] = True
            rows = everyone[everyone[:, 0] == s.order]
            foreign = rows[(rows[:, 1] >= lo) & (rows[:, 1] < hi) & ~local[(rows[:, 1] - lo).clamp(0, hi - lo - 1)]]
            values[foreign[:, 1] - lo] = foreign[:, 2:]
            filled[foreign[:, 1] - lo] = True
            if not bool(filled.all()):
                raise RuntimeError(f"{s.name}: elements of its edge bands did not arrive from the other ranks")
            # group by cell, ascending global index inside each cell: the band's (rows, width) tile grid read cell
            # by cell, a reshape rather than a sort (cells are numbered row-major over the grid)
            index = torch.arange(lo, hi, dtype=torch.int64)
            out.append(tuple(_by_cell(t, grid, size) for t in (index, values, local)))
        return out

    def conforms(self, mask, transposed=False):
        rows, cols = self.cell_shape(transposed)
        r, c = mask.shape
        if r % rows or c % cols:
            return False
        tiles = mask.reshape(r // rows, rows, c // cols, cols).transpose(1, 2).reshape(-1, rows * cols)
        return self._tiles_conform(tiles)

    def _tiles_conform(self, tiles: torch.Tensor) -> bool:
        raise NotImplementedError


def _by_cell(t: torch.Tensor, grid: tuple, size: int) -> torch.Tensor:
    """Rows of ``t`` laid out over whole bands, ``grid`` = (bands, cell rows, cells across, cell cols), regrouped
    cell by cell (row-major over the tile grid), each cell's elements in ascending flat order: [cells, size, ...]."""
    return t.reshape(*grid, *t.shape[1:]).transpose(1, 2).reshape(-1, size, *t.shape[1:])


class NM(_CellPattern):
    """``N:M``: at most N of every M consecutive input weights of one output row are kept; ``fixed_density`` N/M.

    ``select`` keeps ``keep[g]`` weights of selection group g by score under the cell capacity, the optimum of a
    partition matroid, chosen greedily and exactly: in each cell the ``N - held`` best eligible weights (score
    descending, then global index) are the *candidates*, and the group's ``keep`` best candidates are kept (an
    exact top-k across ranks). So a selection for the full N/M density (initial masks, SET/RigL regrowth after
    their drop) keeps exactly N per cell, and a smaller one (their drop) removes the lowest-scoring weights of the
    layer, whichever cells they sit in. When more than N/M is requested (gradual magnitude pruning on its way down
    from dense), every cell first keeps its N best and the rest is the unstructured top-k, so the schedule can end
    at exactly N:M."""

    name = "nm"

    def __init__(self, n: int, m: int):
        super().__init__()
        self.nm = (n, m)
        self.fixed_density = n / m
        self.cell_size = m
        self.spec = f"{n}:{m}"

    def cell_shape(self, transposed):
        m = self.nm[1]
        return (m, 1) if transposed else (1, m)

    def _tiles_conform(self, tiles):
        return bool((tiles.sum(-1) <= self.nm[0]).all())

    def select(self, method, slices, scores, eligible, keep, selector, held=None):
        n, m = self.nm
        held = held if held is not None else [torch.zeros_like(s.mask) for s in slices]
        keys = [score_keys(sc, el).cpu() for sc, el in zip(scores, eligible)]
        table = self.cell_table(slices, [[k, h.reshape(-1).to(torch.int64).cpu()] for k, h in zip(keys, held)],
                                selector)
        candidates = []
        for _, values, _ in table:
            key, held_cell = values[..., 0], values[..., 1]
            # rank inside the cell by (score desc, index asc): index is ascending, so a stable sort by -key
            order = torch.sort(-key, dim=1, stable=True).indices
            rank = torch.empty_like(order)
            rank.scatter_(1, order, torch.arange(m, dtype=torch.int64).expand_as(order).contiguous())
            need = (n - held_cell.sum(1, keepdim=True)).clamp(min=0)
            candidates.append((key >= 0) & (rank < need))
        candidate = self.scatter_local(slices, table, candidates)
        groups = sorted(keep)
        gi = {g: i for i, g in enumerate(groups)}
        counts = torch.zeros(2, len(groups), dtype=torch.int64)  # held, candidates: summed over ranks
        cells = torch.zeros(len(groups), dtype=torch.int64)
        for s, h, c in zip(slices, held, candidate):
            g = gi[method.group_of(s)]
            counts[0, g] += int(h.sum())
            counts[1, g] += int(c.sum())
            cells[g] += s.numel // m
        counts = selector.sum(counts.reshape(-1)).reshape(2, -1)
        # above N/M (gradual pruning from dense): every cell keeps its N best, the rest is unstructured top-k
        over = {g: keep[g] + int(counts[0, gi[g]]) > n * int(cells[gi[g]]) for g in groups}
        rest = {g: keep[g] - int(counts[1, gi[g]]) if over[g] else keep[g] for g in groups}
        pieces = []
        for s, sc, el, c in zip(slices, scores, eligible, candidate):
            g = method.group_of(s)
            c = c.to(sc.device)
            pool = ((el.reshape(-1) if el is not None else torch.ones_like(c)) & ~c) if over[g] else c
            pieces.append(Piece(sc, pool, g, s.order, s.start))
        chosen = selector.topk(pieces, rest)
        return [(ch | c.to(ch.device)) if over[method.group_of(s)] else ch
                for s, ch, c in zip(slices, chosen, candidate)]


class Block(_CellPattern):
    """``block:HxW``: kept weights form whole blocks of H output rows x W input columns of the (out, in) matrix.

    A block's score is the L2 norm of its weights' scores (for |w|, the block's Frobenius norm; for |grad|, the
    gradient block's; a method with signed scores, ``signed_scores = True`` like GraSP, gets their sum); a block
    is eligible when all its weights are (masks are block-constant, so a live block is wholly active). Counts are
    rounded to whole blocks (``granule`` = H*W) and the ``keep`` best blocks of each group are kept: an exact top-k
    across ranks over blocks, each scored by the rank holding its first element, ties broken by block number."""

    name = "block"

    def __init__(self, h: int, w: int):
        super().__init__()
        self.block_shape = (h, w)
        self.granule = self.cell_size = h * w
        self.spec = f"block:{h}x{w}"

    def cell_shape(self, transposed):
        h, w = self.block_shape
        return (w, h) if transposed else (h, w)

    def _tiles_conform(self, tiles):
        count = tiles.sum(-1)
        return bool(((count == 0) | (count == tiles.shape[1])).all())

    def block_mask(self, mask: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """The (out/H, in/W) layout of kept blocks of a whole, block-structured stored mask."""
        h, w = self.block_shape
        m = self.oriented(mask, transposed)
        r, c = m.shape
        return m.reshape(r // h, h, c // w, w).any(3).any(1)

    def select(self, method, slices, scores, eligible, keep, selector, held=None):
        if not slices:
            return []
        signed = getattr(method, "signed_scores", False)
        bits = [sc.detach().reshape(-1).float().cpu().contiguous().view(torch.int32).to(torch.int64)
                for sc in scores]
        elig = [(el.reshape(-1) if el is not None else torch.ones(s.mask.numel(), dtype=torch.bool)).cpu()
                .to(torch.int64) for s, el in zip(slices, eligible)]
        table = self.cell_table(slices, [[b, e] for b, e in zip(bits, elig)], selector)
        pieces, owned = [], []
        for s, (index, values, local) in zip(slices, table):
            score = values[..., 0].to(torch.int32).view(torch.float32).double()
            norm = (score.sum(1) if signed else score.square().sum(1).sqrt()).float()  # in ascending index order
            ok = values[..., 1].bool().all(1)
            mine = local[:, 0].clone()  # a block belongs to the rank holding its first element
            cells = self._cells_of(s, index[:, 0])
            first = int(cells[mine][0]) if bool(mine.any()) else 0
            pieces.append(Piece(norm[mine], ok[mine], method.group_of(s), s.order, first))
            owned.append(mine)
        chosen = selector.topk(pieces, {g: int(round(k / self.granule)) for g, k in keep.items()})
        # blocks straddling ranks: their owner tells the others whether they were chosen
        picked_all, shared = [], []
        for s, (index, _, local), mine, ch in zip(slices, table, owned, chosen):
            picked = torch.zeros(len(index), dtype=torch.bool)
            picked[mine] = ch.cpu()
            sel = picked & ~local.all(1)
            shared.append(torch.stack([torch.full_like(index[sel, 0], s.order), index[sel, 0]], dim=1))
            picked_all.append(picked)
        everyone = torch.cat([p.reshape(-1, 2) for p in selector.gather(torch.cat(shared).reshape(-1))])
        flags = []
        for s, (index, _, local), picked in zip(slices, table, picked_all):
            foreign = everyone[everyone[:, 0] == s.order, 1]
            picked = picked | torch.isin(index[:, 0], foreign)
            flags.append(picked[:, None].expand_as(local))
        return self.scatter_local(slices, table, flags)


PATTERNS: dict = {"unstructured": Unstructured, "nm": NM, "block": Block}

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_BLOCK = re.compile(r"^\s*block\s*:\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_pattern(text, key: str = "sparsity.pattern") -> SparsityPattern:
    """``"unstructured"``, ``"N:M"`` (0 < N < M) or ``"block:HxW"`` -> a pattern object (ConfigError naming
    ``key`` otherwise). A registered user pattern is named by its ``name`` (built without arguments)."""
    if not isinstance(text, str):
        raise ConfigError(key, f"expected a string like 'unstructured', '2:4' or 'block:16x16', got "
                               f"{type(text).__name__} {text!r} (YAML 1.1 reads a bare 2:4 as the base-60 integer "
                               f"124; dist-sparse's config loader reads it as text, other loaders need quotes)")
    if m := _NM.match(text):
        n, mm = int(m.group(1)), int(m.group(2))
        if not 0 < n < mm:
            raise ConfigError(key, f"N:M needs 0 < N < M, got {text!r}")
        return NM(n, mm)
    if m := _BLOCK.match(text):
        h, w = int(m.group(1)), int(m.group(2))
        if h < 1 or w < 1 or h * w < 2:
            raise ConfigError(key, f"block:HxW needs H, W >= 1 and H*W >= 2, got {text!r}")
        return Block(h, w)
    name = text.strip()
    if name in PATTERNS and name not in ("nm", "block"):
        return PATTERNS[name]()
    raise ConfigError(key, f"unknown pattern {text!r}; expected 'unstructured', 'N:M' (e.g. '2:4'), "
                           f"'block:HxW' (e.g. 'block:16x16') or a registered pattern ({', '.join(PATTERNS)})")


def register(cls) -> type:
    """Register a :class:`SparsityPattern` subclass under its ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, SparsityPattern)):
        raise TypeError("register() expects a SparsityPattern subclass")
    if cls.name in PATTERNS:
        raise ValueError(f"a sparsity pattern named {cls.name!r} is already registered")
    PATTERNS[cls.name] = cls
    return cls
