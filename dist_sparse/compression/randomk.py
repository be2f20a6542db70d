"""``randomk``: send k = ceil(density * n) coordinates drawn uniformly at random (without replacement) among the
eligible ones.

Random-k is the unbiased-selection baseline of Stich, Cordonnier & Jaggi (2018), "Sparsified SGD with memory"
(with error feedback, nothing is lost: unsent coordinates wait in the residual). The draw is a counter-based hash
of (seed, step, tensor/rank stream, index) (:mod:`dist_sparse.masks.random`), so a resumed run draws the same
coordinates as an uninterrupted one; each rank draws independently.
"""

from dist_sparse.compression.base import Compressor, register
from dist_sparse.masks import random as counter_random


@register
class RandomK(Compressor):
    name = "randomk"

    def scores(self, values, *, step, stream):
        # the k largest of i.i.d. uniform scores are a uniform random k-subset of the eligible coordinates
        return counter_random.uniform(self.seed, step * 1_000_003 + stream, 0, values.numel(), device=values.device)
