"""Each method's mask update on hand-checkable tensors (single process), jaxpruner-style invariants."""

import pytest
import torch

from dist_sparse.config import SparsityConfig, from_dict
from dist_sparse.errors import ConfigError
from dist_sparse.masks.select import LocalSelector
from dist_sparse.methods import METHODS, LayerSlice, RigL, build_method, method_names, register
from dist_sparse.methods.base import SparseMethod
from dist_sparse.schedules import ConstantFraction, CosineFraction, CubicSparsity, UpdateTimes
from dist_sparse.sparsifier import Sparsifier
from tests.fakes import TensorView


def one_layer(weight, grad, mask):
    return [LayerSlice("w", 0, (len(weight),), len(weight), 0, torch.tensor(mask), torch.tensor(weight),
                       torch.tensor(grad))]


def test_rigl_drops_smallest_weights_and_grows_largest_gradients():
    method = RigL({"w": 0.625}, False, UpdateTimes(1, 0, 100), seed=0, fraction=ConstantFraction(0.4, 100))
    weight = [0.1, -0.5, 0.0, 0.3, 0.0, 0.0, 0.05, 0.9]
    grad = [9.0, 0.0, 2.0, 0.0, 0.5, 3.0, 1.0, 0.0]
    mask = [True, True, False, True, False, False, True, True]  # 5 active: drop round(0.4 * 5) = 2
    (new,) = method.update(10, one_layer(weight, grad, mask), LocalSelector())
    # dropped: |0.05| (6) and |0.1| (0); grown: largest |grad| outside the kept set {1, 3, 7} -> 0 (9.0), 5 (3.0)
    assert new.tolist() == [True, True, False, True, False, True, False, True]


def test_set_preserves_count_and_grows_only_outside_kept():
    method = METHODS["set"]({"w": 0.3}, False, UpdateTimes(1, 0, 100), seed=1, fraction=ConstantFraction(0.5, 100))
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(200, generator=g)
    mask = torch.rand(200, generator=g) < 0.3
    sl = [LayerSlice("w", 0, (200,), 200, 0, mask, weight, None)]
    (new,) = method.update(5, sl, LocalSelector())
    assert int(new.sum()) == int(mask.sum())
    n_active = int(mask.sum())
    n_drop = round(0.5 * n_active)
    # the largest |w| among the old active survive the drop (a dropped one may be regrown at random)
    order = torch.argsort(weight.abs().masked_fill(~mask, -1), descending=True, stable=True)
    assert new[order[: n_active - n_drop]].all()
    assert int((new & ~mask).sum()) <= n_drop
    # different steps regrow differently (random growth), same step is deterministic
    (again,) = method.update(5, sl, LocalSelector())
    (other,) = method.update(6, sl, LocalSelector())
    assert torch.equal(new, again) and not torch.equal(new, other)


def test_magnitude_follows_cubic_schedule_and_never_regrows():
    method = METHODS["magnitude"]({"w": 0.2}, False, UpdateTimes(10, 0, 100), seed=0)
    weight = torch.arange(1, 101, dtype=torch.float32) * torch.tensor([1.0, -1.0]).repeat(50)
    mask = torch.ones(100, dtype=torch.bool)
    mask[-1] = False  # already pruned: must stay pruned although |w| is the largest
    sl = [LayerSlice("w", 0, (100,), 100, 0, mask, weight, None)]
    (half,) = method.update(50, sl, LocalSelector())
    expected_sparsity = 0.8 * (1 - (1 - 0.5) ** 3)
    assert int(half.sum()) == round(100 * (1 - expected_sparsity))
    assert not half[-1]
    (end,) = method.update(100, sl, LocalSelector())
    assert int(end.sum()) == 20 and end[79:99].all() and not end[:79].any()
    assert method.is_update_step(100) and method.is_update_step(10) and not method.is_update_step(15)


def test_schedules():
    cos = CosineFraction(0.3, 1000)
    assert cos(0) == pytest.approx(0.3) and cos(500) == pytest.approx(0.15) and cos(1000) == 0.0
    cubic = CubicSparsity(final=0.9, initial=0.0, start=100, end=200)
    assert cubic(100) == 0.0 and cubic(200) == 0.9 and cubic(150) == pytest.approx(0.9 * (1 - 0.125))
    times = UpdateTimes(100, 0, 750)
    assert [t for t in range(1000) if times.is_update(t)] == [100, 200, 300, 400, 500, 600, 700]


def test_drop_fraction_schedule_default_is_constant_for_set_and_rigl():
    for name in ("set", "rigl"):
        method = build_method(SparsityConfig(method=name, update_interval=10, end_step=100),
                              {"w": (8, 16)}, total_steps=None, seed=0)
        assert isinstance(method.fraction, ConstantFraction) and method.fraction(90) == pytest.approx(0.3)
    paper = build_method(SparsityConfig(method="rigl", update_interval=10, end_step=100,
                                        drop_fraction_schedule="cosine"), {"w": (8, 16)}, total_steps=None, seed=0)
    assert isinstance(paper.fraction, CosineFraction) and paper.fraction(50) == pytest.approx(0.15)
    # null meant "cosine for rigl" before the default changed: refused with the key named, not reinterpreted
    for bad in (None, "linear"):
        with pytest.raises(ConfigError, match="drop_fraction_schedule"):
            from_dict({"sparsity": {"method": "rigl", "drop_fraction_schedule": bad}})


def test_method_registry_and_config_agree():
    assert set(method_names()) == {"none", "static", "magnitude", "set", "rigl", "sr_ste", "snip", "grasp", "synflow"}
    from dist_sparse import config

    assert set(config.method_names()) == set(method_names())

    class Mine(SparseMethod):
        name = "mine"

    register(Mine)
    try:
        with pytest.raises(ValueError):
            register(Mine)
    finally:
        METHODS.pop("mine")


def make_sparsifier(method_name, sparsity=0.75, start=0, length=None, **kw):
    torch.manual_seed(0)
    weight = torch.randn(8, 16)
    grad = torch.randn(8, 16)
    state = {"exp_avg": torch.randn(8, 16), "exp_avg_sq": torch.rand(8, 16)}
    view = TensorView("layer.weight", weight, grad, state, start=start, length=length)
    cfg = SparsityConfig(method=method_name, sparsity=sparsity, distribution="uniform", update_interval=5,
                         end_step=50, drop_fraction=0.5, **kw)
    method = build_method(cfg, {"layer.weight": (8, 16)}, total_steps=None, seed=0)
    return Sparsifier(method, [view]), view, weight, grad, state


@pytest.mark.parametrize("name", ["set", "rigl"])
def test_update_invariants_count_regrown_zero_moments_reset(name):
    sp, view, weight, grad, state = make_sparsifier(name)
    sp.initialize()
    old_mask = sp.mask("layer.weight").clone()
    assert int(old_mask.sum()) == 32  # 25% of 128
    assert (weight.view(-1)[~old_mask] == 0).all()
    weight.view(-1)[old_mask] += 0.01  # make sure no surviving weight is exactly 0
    before_w, before_state = weight.clone(), {k: v.clone() for k, v in state.items()}
    sp.before_step(5)
    new = sp.mask("layer.weight")
    born, survived = new & ~old_mask, new & old_mask
    assert int(new.sum()) == int(old_mask.sum())  # count preserved
    assert born.any()
    assert (weight.view(-1)[born] == 0).all()  # regrown weights start at 0
    assert (weight.view(-1)[~new] == 0).all()  # dropped weights are 0
    for k in state:
        assert (state[k].view(-1)[born] == 0).all()  # moments of regrown weights reset
        assert torch.equal(state[k].view(-1)[survived], before_state[k].view(-1)[survived])  # others kept
    assert torch.equal(weight.view(-1)[survived], before_w.view(-1)[survived])
    assert (grad.view(-1)[~new] == 0).all()  # pruned gradients zeroed before the optimizer
    assert sp.skip_optimizer_step  # RigL/SET: the update replaces the optimizer step
    assert sp.last_update["grown"] == int(born.sum()) and sp.last_update["pruned"] == int((old_mask & ~new).sum())


def test_rigl_grows_at_largest_dense_gradient_through_sparsifier():
    sp, view, weight, grad, state = make_sparsifier("rigl")
    sp.initialize()
    old = sp.mask("layer.weight").clone()
    dense_grad = grad.clone().view(-1)
    sp.before_step(5)
    new = sp.mask("layer.weight")
    born = new & ~old
    candidates_not_grown = ~new & ~old
    assert dense_grad[born].abs().min() >= dense_grad[candidates_not_grown].abs().max()


def test_magnitude_starts_dense_and_prunes_after_the_step():
    sp, view, weight, grad, state = make_sparsifier("magnitude", sparsity=0.5)
    sp.initialize()
    assert bool(sp.mask("layer.weight").all())
    sp.before_step(50)
    assert sp.achieved_sparsity() == 0.5
    assert not sp.skip_optimizer_step  # gradual pruning does not replace the optimizer step


def test_static_never_updates_and_masks_after_optimizer_step():
    sp, view, weight, grad, state = make_sparsifier("static")
    sp.initialize()
    m = sp.mask("layer.weight").clone()
    sp.before_step(5)
    assert torch.equal(sp.mask("layer.weight"), m) and sp.last_update is None
    weight.add_(1.0)  # an optimizer that revives pruned weights ...
    sp.after_optimizer_step()
    assert (weight.view(-1)[~m] == 0).all() and (weight.view(-1)[m] != 0).all()  # ... is undone


def test_init_masks_must_cover_every_parameter():
    sp, *_ = make_sparsifier("static")
    with pytest.raises(KeyError, match="layer.weight"):
        sp.initialize({"other": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="elements"):
        sp.initialize({"layer.weight": torch.ones(3, dtype=torch.bool)})


def test_rigl_grow_grad_steps_scores_growth_on_the_mean_gradient_of_the_window():
    """grow_grad_steps=3: growth at step 5 uses the mean dense gradient of steps 3, 4 and 5, and gives the same mask
    as the paper's single-step RigL handed that mean gradient directly."""
    grads = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    sp, view, weight, grad, state = make_sparsifier("rigl", grow_grad_steps=3)
    ref, ref_view, ref_weight, ref_grad, _ = make_sparsifier("rigl")
    sp.initialize()
    ref.initialize()
    for step in (1, 2):  # outside the window: nothing accumulated
        grad.copy_(torch.randn(8, 16))
        sp.before_step(step)
    assert sp.grad_sum_steps == 0
    for step, g in zip((3, 4), grads[:2]):
        grad.copy_(g)
        sp.before_step(step)
        assert not sp.skip_optimizer_step and sp.grad_sum_steps == step - 2
    grad.copy_(grads[2])
    ref_grad.copy_((grads[0] + grads[1] + grads[2]) / 3)
    sp.before_step(5)
    ref.before_step(5)
    assert torch.equal(sp.mask("layer.weight"), ref.mask("layer.weight"))
    assert sp.grad_sum_steps == 0 and not sp.grad_sums  # the window's buffers are freed after the update
    single, *_ = make_sparsifier("rigl")
    single.initialize()
    single.views[0].g.copy_(grads[2].view(-1))
    single.before_step(5)
    assert not torch.equal(single.mask("layer.weight"), sp.mask("layer.weight"))  # the window changed the choice


def test_grow_grad_steps_is_validated():
    with pytest.raises(ConfigError, match="sparsity.grow_grad_steps"):
        from_dict({"sparsity": {"method": "rigl", "grow_grad_steps": 0}})
    with pytest.raises(ConfigError, match="sparsity.grow_grad_steps"):
        from_dict({"sparsity": {"method": "rigl", "update_interval": 10, "grow_grad_steps": 20}})
