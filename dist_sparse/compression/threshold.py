"""``threshold``: send every eligible coordinate whose magnitude reaches a threshold estimated from a sample.

This is Deep Gradient Compression's selection (Lin, Han, Mao, Wang & Dally, ICLR 2018, "Implementation details"):
instead of an exact top-k over the whole tensor, take a random sample of its (eligible) coordinates, find the
top-``density`` magnitude threshold on the sample, and send every coordinate at or above it. The number sent is
about ``density * n`` but varies per rank and step (the exchange handles variable lengths). The sample is
``max(256, 1%)`` of the eligible coordinates, drawn with the counter-based generator (reproducible on resume).
"""

import math

import torch

from dist_sparse.compression.base import Compressor, register
from dist_sparse.masks import random as counter_random

SAMPLE_FRACTION = 0.01
MIN_SAMPLE = 256


@register
class Threshold(Compressor):
    name = "threshold"
    fixed_count = False

    def threshold(self, values, eligible, density, *, step, stream) -> float | None:
        """The estimated magnitude threshold (None when nothing is eligible)."""
        scores = values.abs()
        candidates = scores if eligible is None else scores[eligible]
        n = candidates.numel()
        if n == 0:
            return None
        s = min(n, max(MIN_SAMPLE, math.ceil(SAMPLE_FRACTION * n)))
        if s < n:
            r = counter_random.uniform(self.seed, step * 1_000_003 + stream, 0, n, device=values.device)
            candidates = candidates[torch.topk(r, s).indices]
        k = max(1, math.ceil(density * s - 1e-9))
        return float(torch.topk(candidates, k).values[-1])

    def select(self, values, eligible, density, *, step, stream, k=None):
        # k is ignored: the count follows from the threshold (fixed_count is False)
        tau = self.threshold(values, eligible, density, step=step, stream=stream)
        if tau is None:
            return torch.zeros(0, dtype=torch.int64, device=values.device)
        scores = self._masked(values.abs(), eligible)
        # an all-zero tensor has threshold 0: send nothing rather than every zero
        return torch.nonzero(scores >= tau if tau > 0 else scores > 0).reshape(-1)
