"""``randomk``: send k = ceil(density * n) coordinates drawn uniformly at random (without replacement) among the
eligible ones.

Random-k is the unbiased-selection baseline of Stich, Cordonnier & Jaggi (2018), "Sparsified SGD with memory"
(with error feedback, nothing is lost: unsent coordinates wait in the residual). The draw is a counter-based hash
of (seed, step, tensor/rank stream, index) (:mod:`dist_sparse.masks.random`), so a resumed run draws the same
coordinates as an uninterrupted one; each rank draws independently.
"""

import torch

from dist_sparse.compression.base import Compressor, keep_count, register
from dist_sparse.masks import random as counter_random


@register
class RandomK(Compressor):
    name = "randomk"

    def select(self, values, eligible, density, *, step, stream):
        k = keep_count(self._n_eligible(values, eligible), density)
        if k == 0:
            return torch.zeros(0, dtype=torch.int64, device=values.device)
        scores = counter_random.uniform(self.seed, step * 1_000_003 + stream, 0, values.numel(), device=values.device)
        if eligible is not None:
            scores = scores.masked_fill(~eligible, -1.0)
        # ineligible coordinates score -1 and k <= number eligible, so they are never among the k largest
        return torch.sort(torch.topk(scores, k, sorted=False).indices).values
