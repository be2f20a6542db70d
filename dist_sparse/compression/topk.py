"""``topk``: send the k = ceil(density * n) coordinates of largest magnitude of each tensor.

Top-k sparsification with error feedback is the method analysed by Stich, Cordonnier & Jaggi (2018), "Sparsified
SGD with memory", and the selection used by Deep Gradient Compression (Lin et al. 2018). Only coordinates the
weight mask keeps are candidates; ties among equal magnitudes are broken by torch.topk, so the choice is
deterministic for a given tensor.
"""

import torch

from dist_sparse.compression.base import Compressor, keep_count, register


@register
class TopK(Compressor):
    name = "topk"

    def select(self, values, eligible, density, *, step, stream):
        k = keep_count(self._n_eligible(values, eligible), density)
        if k == 0:
            return torch.zeros(0, dtype=torch.int64, device=values.device)
        if k == values.numel():
            return torch.arange(k, device=values.device)
        scores = self._scores(values, eligible)
        # ineligible coordinates score -1 and k <= number eligible, so they are never among the k largest
        return torch.sort(torch.topk(scores, k, sorted=False).indices).values
