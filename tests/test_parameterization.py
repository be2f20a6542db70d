"""``sparsity.parameterization``: SμPar's per-layer initialization and learning rate (Dey et al. 2024), when it is
the default, the groups it gives the optimizer, and that the scaled learning rate exists only inside the step."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dist_sparse.config import SparsityConfig
from dist_sparse.errors import ConfigError
from dist_sparse.parameterization import layer_densities, param_groups, resolve, scaled_learning_rates
from tests.distributed_utils import run_spawned


def tiny():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=48, n_positions=16, n_embd=32, n_layer=2, n_head=2))


def sparsity(**kw):
    s = SparsityConfig(**{"method": "rigl", "sparsity": 0.9, "distribution": "erk", **kw})
    s.check("sparsity")
    return s


@pytest.mark.parametrize("kw, opt, pretrained, want", [
    ({}, "AdamW", False, "supar"),
    ({"method": "static"}, "Adam", False, "supar"),
    ({"method": "set", "pattern": "2:4", "sparsity": 0.5}, "AdamW", False, "supar"),
    ({}, "SGD", False, "standard"),  # μP's SGD rule leaves the learning rate: not the measured default
    ({}, "AdamW", True, "standard"),  # trained weights: nothing to reinitialise
    ({"method": "magnitude"}, "AdamW", False, "standard"),  # starts dense, densities move
    ({"method": "snip", "distribution": "global"}, "AdamW", False, "standard"),
    ({"distribution": "global"}, "AdamW", False, "standard"),
    ({"init_masks": __file__}, "AdamW", False, "standard"),  # any existing path: only its presence matters here
    ({"method": "none"}, "AdamW", False, "standard"),
    ({"parameterization": "standard"}, "AdamW", False, "standard"),
    ({"parameterization": "supar"}, "SGD", False, "supar"),  # explicit: the initialization part alone
])
def test_the_default_is_supar_exactly_where_it_applies(kw, opt, pretrained, want):
    assert resolve(sparsity(**kw), opt, pretrained) == want


@pytest.mark.parametrize("kw, pretrained, why", [
    ({"method": "magnitude"}, False, "starts dense"),
    ({"method": "sr_ste", "pattern": "2:4", "sparsity": 0.5}, False, "dense weights"),
    ({"distribution": "global"}, False, "global"),
    ({}, True, "model.pretrained"),
])
def test_an_explicit_supar_that_cannot_apply_is_refused_with_the_reason(kw, pretrained, why):
    with pytest.raises(ConfigError, match="sparsity.parameterization") as err:
        resolve(sparsity(parameterization="supar", **kw), "AdamW", pretrained)
    assert why in str(err.value)


def test_a_config_refuses_it_before_any_work():
    from dist_sparse.config import from_dict

    with pytest.raises(ConfigError, match="sparsity.parameterization"):
        from_dict({"sparsity": {"method": "magnitude", "parameterization": "supar"}})
    with pytest.raises(ConfigError, match="sparsity.parameterization"):
        from_dict({"sparsity": {"method": "rigl", "parameterization": "mup"}})


def test_supar_groups_carry_one_over_density_and_rescale_the_initial_weights():
    model, s = tiny(), sparsity()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    base = [{"params": [p for p in model.parameters() if p.dim() >= 2]},
            {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    groups = param_groups(model, s, "AdamW", base)
    dens = layer_densities(model, s)
    assert len(dens) == 8 and all(0 < d < 1 for d in dens.values())
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            seen.add(n)
            if n in dens:
                assert g["lr_scale"] == pytest.approx(1 / dens[n]) and "weight_decay" not in g
                assert torch.equal(p, before[n] * dens[n] ** -0.5), n
            else:
                assert "lr_scale" not in g and torch.equal(p, before[n]), n
    assert seen == set(names.values())  # every parameter exactly once, nothing lost
    assert any(g.get("weight_decay") == 0.0 for g in groups)  # the other options survive the split
    with pytest.raises(RuntimeError, match="already"):
        param_groups(model, s, "AdamW")  # twice would scale the weights twice


def test_standard_and_sgd_leave_the_groups_alone():
    model = tiny()
    before = [p.detach().clone() for p in model.parameters()]
    groups = param_groups(model, sparsity(parameterization="standard"), "AdamW")
    assert len(groups) == 1 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model = tiny()
    groups = param_groups(model, sparsity(parameterization="supar"), "SGD")
    assert len(groups) == 1 and "lr_scale" not in groups[0]  # SGD: the initialization only
    assert not torch.equal(model.transformer.h[0].mlp.c_fc.weight, before[[n for n, _ in model.named_parameters()]
                                                                            .index("transformer.h.0.mlp.c_fc.weight")])


def test_the_scaled_rate_lives_only_inside_the_step_so_schedulers_see_the_dense_rate():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
    ref_a, ref_b = torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr_scale": 10.0}], lr=1e-3, weight_decay=0.1)
    ref = torch.optim.AdamW([{"params": [ref_a]}, {"params": [ref_b], "lr": 1e-2}], lr=1e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda t: 1.0 / (1 + t))
    for _ in range(3):
        for p in (a, b, ref_a, ref_b):
            p.grad = torch.ones(5)
        with scaled_learning_rates(opt):
            assert opt.param_groups[1]["lr"] == pytest.approx(10 * opt.param_groups[0]["lr"])
            opt.step()
        ref.step()
        assert opt.param_groups[1]["lr"] == opt.param_groups[0]["lr"]  # back to the scheduler's value
        sched.step()
        ref_sched.step()
    assert torch.equal(a, ref_a)
    torch.testing.assert_close(b, ref_b, rtol=1e-6, atol=0)  # lr * 10 computed once vs stored: one rounding


def _supar_under_deepspeed(rank, world):
    """dist_sparse.initialize at ZeRO-2: DeepSpeed keeps the groups' lr_scale, the inner step sees base * scale,
    the engine reports SμPar, get_lr() stays the configured rate, pruned weights stay exactly 0; and RigL's
    default growth window."""
    import os

    import dist_sparse
    from tests.workers import tiny_gpt2, tiny_rigl_config, tiny_step

    os.environ["LOCAL_RANK"] = str(rank)  # one node: DeepSpeed asks for it
    model = tiny_gpt2()
    config = tiny_rigl_config(2)
    del config["sparsity"]["grow_grad_steps"]  # the workers fix it; here the default is under test
    engine, *_ = dist_sparse.initialize(model, config, total_steps=6)
    assert engine.parameterization == "supar"
    opt = engine.optimizer.optimizer  # ZeRO-2's inner torch optimizer
    scales = sorted({g.get("lr_scale", 1.0) for g in opt.param_groups})
    assert len(scales) > 1 and all(s >= 1.0 for s in scales), scales
    seen = []
    rule = engine.inner_step[0]

    def spy(*args, **kwargs):
        seen.append([(g["lr"], g.get("lr_scale", 1.0)) for g in opt.param_groups])
        return rule(*args, **kwargs)

    engine.inner_step[0] = spy
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):
        tiny_step(engine, g)
    assert seen and all(lr == pytest.approx(0.01 * s) for step in seen for lr, s in step)
    assert engine.get_lr() == [0.01] * len(opt.param_groups)
    # RigL's unset growth window: the whole update interval, free here (masked-dense DeepSpeed reduces the dense
    # gradient every step), and under gradient compression (the exchange keeps the window in a local sum)
    assert engine.sparsifier.method.grow_grad_steps == config["sparsity"]["update_interval"] == 2
    config["compression"] = {"method": "topk", "density": 0.1}
    compressed, *_ = dist_sparse.initialize(tiny_gpt2(), config, total_steps=6)
    assert compressed.sparsifier.method.grow_grad_steps == 2 and compressed.compression.window_sums == {}
    assert compressed.sparsifier.window_upstream is not None
    masks = engine.sparsifier.full_masks()
    for name, mask in masks.items():
        w = dict(engine.module.named_parameters())[name]
        assert bool((w.detach().reshape(-1)[~mask.reshape(-1)] == 0).all()), name


def test_supar_through_deepspeed_zero2_on_two_ranks():
    run_spawned(_supar_under_deepspeed, 2)
