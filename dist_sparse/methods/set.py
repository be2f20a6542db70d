"""``set``: Sparse Evolutionary Training (Mocanu et al., 2018, Nature Communications).

Starts from a random sparse mask. Every ``update_interval`` steps (until ``end_step``) each layer drops the
fraction ``drop_fraction(t)`` of its active weights with the smallest magnitude and regrows as many connections at
random among the inactive positions; the layer's number of active weights is preserved. Regrown weights start at 0
with fresh optimizer state. As in the RigL reference implementation, the update step replaces the optimizer step.

Under ``sparsity.pattern: N:M`` the drop removes the layer's lowest-|w| active weights wherever they sit and the
regrowth refills every group of M to exactly N (the survivors count against their group); under ``block:HxW``
whole blocks are dropped (lowest block norm) and regrown, and the drop count is rounded to whole blocks.
"""

import torch

from dist_sparse.methods.base import SparseMethod


class SET(SparseMethod):
    name = "set"
    replaces_optimizer_step = True

    def __init__(self, *args, fraction=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fraction = fraction  # schedules.ConstantFraction / CosineFraction

    def drop_scores(self, s) -> torch.Tensor:
        return s.weight.abs()

    def grow_scores(self, s, step: int) -> torch.Tensor:
        return self.random_scores(s, stream=step)

    def update(self, step, slices, select):
        frac = self.fraction(step)
        active = self.global_counts(slices, [int(s.mask.sum()) for s in slices], select)
        unit = self.pattern.granule  # whole blocks under a block pattern (1 otherwise)
        n_drop = {g: unit * int(round(frac * a / unit)) for g, a in active.items()}
        keep = {g: active[g] - n_drop[g] for g in active}
        drop_scores = [self.drop_scores(s) for s in slices]
        kept = self.select(slices, drop_scores, [s.mask for s in slices], keep, select)
        grow_scores = [self.grow_scores(s, step) for s in slices]
        # under N:M the survivors count against their cell, so regrowth refills every cell to exactly N
        grown = self.select(slices, grow_scores, [~k for k in kept], n_drop, select, held=kept)
        return [k | g for k, g in zip(kept, grown)]
