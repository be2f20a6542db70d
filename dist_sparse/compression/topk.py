"""``topk``: send the k = ceil(density * n) coordinates of largest magnitude of each tensor.

Top-k sparsification with error feedback is the method analysed by Stich, Cordonnier & Jaggi (2018), "Sparsified
SGD with memory", and the selection used by Deep Gradient Compression (Lin et al. 2018). Only coordinates the
weight mask keeps are candidates (``n`` counts those); ties among equal magnitudes are broken by torch.topk.
"""

from dist_sparse.compression.base import Compressor, register


@register
class TopK(Compressor):
    name = "topk"

    def scores(self, values, *, step, stream):
        return values.abs()
