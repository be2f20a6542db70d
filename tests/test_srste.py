"""SR-STE (Zhou et al. 2021) through the sparsifier in one process: S(W) recomputed from the dense masters before
each step's forward, the straight-through gradient kept, lambda_W * (1 - S) * W added on pruned weights only."""

import pytest
import torch

from dist_sparse.config import SparsityConfig, from_dict
from dist_sparse.errors import ConfigError
from dist_sparse.methods import build_method
from dist_sparse.oneshot.nm import nm_mask_from_scores
from dist_sparse.sparsifier import Sparsifier
from tests.fakes import TensorView


def test_srste_forward_mask_follows_the_dense_weights_and_decays_pruned_ones():
    g = torch.Generator().manual_seed(0)
    weight, grad = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    view = TensorView("layer.weight", weight, grad)
    cfg = SparsityConfig(method="sr_ste", pattern="2:4", sparsity=0.5, srste_decay=0.25)
    sp = Sparsifier(build_method(cfg, {"layer.weight": (8, 16)}, total_steps=10, seed=0), [view])
    sp.initialize()
    # S(W): the 2 largest |w| of every 4 consecutive input weights (nn.Linear layout), by hand
    assert torch.equal(sp.mask("layer.weight"), nm_mask_from_scores(weight.abs(), 2, 4).view(-1))
    assert bool((weight != 0).all())  # the masters stay dense
    weight[:, :4] = torch.tensor([0.0, 0.1, 5.0, 6.0])  # move the largest |w| of every row's first group
    sp.before_forward(sp.schedule.plan(0))
    mask = sp.mask("layer.weight")
    assert torch.equal(mask, nm_mask_from_scores(weight.abs(), 2, 4).view(-1))
    assert mask.view(8, 16)[:, :4].tolist() == [[False, False, True, True]] * 8
    updates = sp.updates_done
    sp.before_forward(sp.schedule.plan(0))  # a second micro-batch of the same step: no second decision
    assert sp.updates_done == updates
    before_w, before_g = weight.clone().view(-1), grad.clone().view(-1)
    plan = sp.schedule.plan(0)
    assert not plan.mask_update and not plan.skip_optimizer_step  # not a scheduled update: the optimizer steps
    sp.before_step(plan)
    # straight-through: pruned positions keep their gradient, plus lambda_W * w on them only
    assert torch.equal(grad.view(-1), before_g + 0.25 * (~mask).float() * before_w)
    sp.after_optimizer_step(plan)
    assert torch.equal(weight.view(-1), before_w)  # nothing zeroed after the step


def test_srste_config_needs_nm_and_refuses_compact_state_and_compression():
    with pytest.raises(ConfigError, match="sparsity.pattern"):
        from_dict({"sparsity": {"method": "sr_ste", "sparsity": 0.5}})
    with pytest.raises(ConfigError, match="sparsity.srste_decay"):
        from_dict({"sparsity": {"method": "sr_ste", "pattern": "2:4", "srste_decay": -1}})
    ds = {"zero_optimization": {"stage": 2}}
    with pytest.raises(ConfigError, match="sparsity.compact_state"):
        from_dict({"deepspeed": ds, "sparsity": {"method": "sr_ste", "pattern": "2:4", "compact_state": True}})
    with pytest.raises(ConfigError, match="compression.method"):
        from_dict({"deepspeed": ds, "sparsity": {"method": "sr_ste", "pattern": "2:4"},
                   "compression": {"method": "topk"}})
    assert from_dict({"sparsity": {"method": "sr_ste", "pattern": "2:4"}}).sparsity.srste_decay == 2e-4
