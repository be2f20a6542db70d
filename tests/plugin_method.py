"""A user plugin, as a config's ``plugins: [tests.plugin_method]`` imports it: registers a method, a distribution
and a compressor under new names (tests/test_engine_components.py)."""

import torch

from dist_sparse import distributions
from dist_sparse.compression.base import COMPRESSORS
from dist_sparse.compression.base import register as register_compressor
from dist_sparse.compression.topk import TopK
from dist_sparse.methods import METHODS, SparseMethod, register

NAME = "plugin_magnitude_once"


class MagnitudeOnce(SparseMethod):
    """Keeps each layer's largest |w| at initialisation and never changes the mask (a toy user method)."""

    name = NAME
    updates_masks = False

    def initial_masks(self, slices, select):
        scores = [s.weight.abs() if s.weight is not None else torch.zeros_like(s.mask, dtype=torch.float32)
                  for s in slices]
        return self.select(slices, scores, [None] * len(slices), self.target_keep(slices, self.densities), select)


class StraightThroughDecay(SparseMethod):
    """Trains dense weights through a masked forward (``dense_weights``) and adds ``decay * w`` to the gradient of
    pruned weights (``grad_deltas``): the two extra hooks a straight-through method uses."""

    name = "plugin_straight_through"
    updates_masks = False
    dense_weights = True
    adjusts_grads = True
    decay = 0.5

    def grad_deltas(self, step, slices):
        return [None if s.weight is None else (~s.mask).float() * s.weight * self.decay for s in slices]


class TopKAgain(TopK):
    name = "plugin_topk"


def plugin_half(shapes, sparsity, power_scale=1.0):
    """Every layer at half the target density's sparsity (a toy distribution)."""
    return {n: 1.0 - sparsity / 2 for n in shapes}


if NAME not in METHODS:  # the module may be imported again under another name (pytest's rootdir import)
    register(MagnitudeOnce)
    register(StraightThroughDecay)
    register_compressor(TopKAgain)
    distributions.register("plugin_half", plugin_half)
assert "plugin_topk" in COMPRESSORS
