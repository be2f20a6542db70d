"""``magnitude``: gradual magnitude pruning (Zhu & Gupta, 2017, "To prune, or not to prune").

Training starts dense. Every ``update_interval`` steps between ``start_step`` and ``end_step`` the smallest-|w|
active weights of each layer are pruned so that layer l reaches sparsity ``s_l * r(t)``, where ``s_l`` is its final
target (from the distribution) and ``r(t) = 1 - (1 - p)^3`` the cubic ramp (p = progress through the window).
Pruned weights never return. Drop score: |w|.
"""

import torch

from dist_sparse.methods.base import SparseMethod
from dist_sparse.schedules import CubicSparsity


class Magnitude(SparseMethod):
    name = "magnitude"
    dense_start = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # the ramp r(t) goes 0 -> 1 over the pruning window; scaled by each layer's final sparsity
        self.ramp = CubicSparsity(final=1.0, initial=0.0, start=self.times.start, end=self.times.end)

    def is_update_step(self, step: int) -> bool:
        # also prune exactly at the end of the window, so the final sparsity is reached
        return self.times.is_update(step) or step == self.times.end

    def drop_scores(self, s) -> torch.Tensor:
        return s.weight.abs()

    def update(self, step, slices, select):
        r = self.ramp(step)
        densities = {name: 1.0 - (1.0 - d) * r for name, d in self.densities.items()}
        keep = self.target_keep(slices, densities)
        active = self.global_counts(slices, [int(s.mask.sum()) for s in slices], select)
        keep = {g: min(k, active[g]) for g, k in keep.items()}  # never regrow
        scores = [self.drop_scores(s) for s in slices]
        return self.select_survivors(slices, scores, keep, select)  # frozen weights are never pruned
