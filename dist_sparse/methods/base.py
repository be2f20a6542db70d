"""The method interface: a method decides masks; it never touches DeepSpeed, optimizers or ranks directly.

A method sees :class:`LayerSlice` objects: this rank's slice of each sparsified parameter (keyed by name, with its
offset in the flattened tensor), and a *selector* (see :mod:`dist_sparse.masks.select`) whose ``topk`` performs an
exact top-k over the slices of all ranks and whose ``sum`` adds integers over ranks. Because every decision goes
through the selector, a method's masks are identical whether the tensors live in one process (``LocalSelector``)
or are sharded over many ranks (``DistributedSelector``).

Subclasses override one hook each (as in jaxpruner): ``drop_scores`` (which active weights to remove),
``grow_scores`` (which inactive weights to add), or the schedule objects they are given. Beyond the two scores a
method can act at two more points of the step:

- before the forward: ``dense_weights = True`` trains dense weights through a masked forward (straight-through
  estimators): the sparsifier masks the model's weights before every forward, keeps the master weights dense and
  does not zero the gradients of pruned positions;
- after the gradient: ``grad_deltas`` (with ``adjusts_grads = True``) returns a term added to the reduced gradient
  of each slice before anything else reads it (a regulariser on pruned weights, say).

How scores become masks is the *pattern*'s job (:mod:`dist_sparse.patterns`; unstructured by default): a method
calls :meth:`SparseMethod.select`, never the selector's ``topk`` directly.
"""

from dataclasses import dataclass

import torch

from dist_sparse.distributions import keep_counts
from dist_sparse.masks import random as counter_random
from dist_sparse.masks.select import Piece
from dist_sparse.patterns import SparsityPattern, Unstructured


@dataclass
class LayerSlice:
    name: str
    order: int  # index of the parameter among the sparsified ones (fixed, name-sorted)
    shape: tuple
    numel: int  # elements of the full parameter
    start: int  # offset of this slice in the flattened parameter
    mask: torch.Tensor  # bool, this slice
    weight: torch.Tensor | None  # fp32 master weights of this slice
    grad: torch.Tensor | None  # dense gradient of this slice (reduced over data-parallel ranks)


class SparseMethod:
    """Base class. ``densities`` maps layer name -> target density; ``global_selection`` groups all layers."""

    name = "base"
    updates_masks = True  # False: the mask never changes after initialisation
    replaces_optimizer_step = False  # True: an update step changes connections instead of taking an optimizer step
    needs_dense_grad = False  # True: update steps need the gradient of pruned positions too
    dense_start = False  # True: start from a dense network (gradual pruning)
    dense_weights = False  # True: the optimizer steps dense weights, the forward sees them masked
    adjusts_grads = False  # True: grad_deltas is added to the reduced gradient every step

    def __init__(self, densities: dict, global_selection: bool, times, seed: int,
                 pattern: SparsityPattern | None = None):
        self.densities = densities
        self.global_selection = global_selection
        self.times = times  # schedules.UpdateTimes
        self.seed = seed
        self.pattern = pattern if pattern is not None else Unstructured()

    # -- helpers shared by all methods -------------------------------------------------------------------------
    def group_of(self, s: LayerSlice) -> int:
        return 0 if self.global_selection else s.order

    def global_counts(self, slices: list, values: list, select) -> dict:
        """Sum, over all ranks, of per-slice integer ``values``, per selection group.

        Every rank holds a (possibly empty) slice of every parameter, so the groups agree across ranks."""
        groups = sorted({self.group_of(s) for s in slices})
        index = {g: i for i, g in enumerate(groups)}
        t = torch.zeros(len(groups), dtype=torch.int64)
        for s, v in zip(slices, values):
            t[index[self.group_of(s)]] += int(v)
        t = select.sum(t)
        return {g: int(t[index[g]]) for g in groups}

    def target_keep(self, slices: list, densities: dict) -> dict:
        """Number of weights to keep per group, from per-layer densities."""
        if self.global_selection:
            numels = {s.name: s.numel for s in slices}
            total = sum(numels.values())
            density = next(iter(densities.values())) if densities else 1.0
            return {0: max(1, int(round(total * density)))}
        return {s.order: keep_counts({s.name: s.numel}, {s.name: densities[s.name]})[s.name] for s in slices}

    def pieces(self, slices: list, scores: list, eligible: list) -> list:
        return [Piece(sc, el, self.group_of(s), s.order, s.start) for s, sc, el in zip(slices, scores, eligible)]

    def select(self, slices: list, scores: list, eligible: list, keep: dict, select, held=None) -> list:
        """Masks keeping ``keep[group]`` weights by ``scores`` among the ``eligible`` ones, in this method's
        pattern (exact across ranks: ``select`` is the selector). ``held``: per slice, weights already kept by this
        decision, which count against a structured pattern's cells (SET/RigL's survivors when they regrow)."""
        return self.pattern.select(self, slices, scores, eligible, keep, select, held)

    def random_scores(self, s: LayerSlice, stream: int) -> torch.Tensor:
        return counter_random.uniform(self.seed, stream * 100_003 + s.order, s.start, s.mask.numel(),
                                      device=s.mask.device)

    # -- the two decisions -------------------------------------------------------------------------------------
    def initial_masks(self, slices: list, select) -> list:
        """Random masks with the target density per layer (or overall, for ``global``)."""
        if self.dense_start:
            return [torch.ones_like(s.mask) for s in slices]
        scores = [self.random_scores(s, stream=0) for s in slices]
        return self.select(slices, scores, [None] * len(slices), self.target_keep(slices, self.densities), select)

    def is_update_step(self, step: int) -> bool:
        return self.updates_masks and self.times.is_update(step)

    def grow_window(self) -> int:
        """How many steps, ending at an update, contribute the dense gradient the growth scores (1: the update
        step's own; only read when ``needs_dense_grad``)."""
        return 1

    def grad_deltas(self, step: int, slices: list) -> list:
        """Per slice (the whole range a rank stores), a tensor added to its reduced gradient, or None."""
        return [None] * len(slices)

    def update(self, step: int, slices: list, select) -> list:
        raise NotImplementedError(f"method {self.name!r} does not update masks")
