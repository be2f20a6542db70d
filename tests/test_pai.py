"""Pruning at initialization (SNIP, GraSP, SynFlow): scores against hand-written references in one process, GraSP's
sign, SynFlow's conservation (a layer scaled up and the next down leaves the scores unchanged) and schedule; SNIP
(and ``freeze.select: saliency``) on ZeRO-3 partitions against the ZeRO 0-2 scorer on 2 ranks."""

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from dist_sparse.config import SparsityConfig, from_dict
from dist_sparse.errors import ConfigError
from dist_sparse.masks.select import LocalSelector
from dist_sparse.methods import LayerSlice, build_method
from dist_sparse.methods.pai import RangeScores
from tests.distributed_utils import run_torchrun


class Quadratic(nn.Module):
    """L(W) = 1/2 sum((C * W)^2) + sum(B * W) with C, B fixed by the batch: g = C^2 W + B, H = diag(C^2)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(4, 8, generator=g))

    def coefficients(self, x):
        c = x.float().mean() / 10 + torch.arange(32, dtype=torch.float32).reshape(4, 8) / 32
        b = 2 * torch.cos(torch.arange(32, dtype=torch.float32)).reshape(4, 8) * x.float().std()
        return c, b

    def forward(self, input_ids, labels):
        c, b = self.coefficients(input_ids)
        return SimpleNamespace(loss=0.5 * ((c * self.weight) ** 2).sum() + (b * self.weight).sum())


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 9, (2, 5), generator=g) for _ in range(3)]


def method(name, sparsity=0.75, **kw):
    cfg = SparsityConfig(method=name, sparsity=sparsity, distribution="global", **kw)
    return build_method(cfg, {"weight": (4, 8)}, total_steps=10, seed=0)


def masks_from(m, shapes):
    slices = [LayerSlice(n, i, s, int(torch.tensor(s).prod()), 0, torch.ones(int(torch.tensor(s).prod()),
                         dtype=torch.bool), None, None) for i, (n, s) in enumerate(sorted(shapes.items()))]
    return m.initial_masks(slices, LocalSelector())


def test_snip_scores_are_the_connection_sensitivity_over_the_batches():
    model, m = Quadratic(), method("snip", init_batches=3)
    scores = m.score(model, ["weight"], batches())["weight"]
    w = model.weight.detach()
    g = sum(model.coefficients(x)[0] ** 2 * w + model.coefficients(x)[1] for x in batches()) / 3
    assert torch.allclose(scores, (g * w).abs(), rtol=1e-6)
    m.init_scores = {"weight": RangeScores.whole(scores)}
    (mask,) = masks_from(m, {"weight": (4, 8)})
    assert int(mask.sum()) == 8 and scores.reshape(-1)[mask].min() >= scores.reshape(-1)[~mask].max()


def test_grasp_keeps_the_lowest_minus_w_hg_and_accepts_negative_scores():
    model, m = Quadratic(), method("grasp", init_batches=3)
    keep_scores = m.score(model, ["weight"], batches())["weight"]
    w = model.weight.detach()
    cs = [model.coefficients(x) for x in batches()]
    g = sum(c ** 2 * w + b for c, b in cs) / 3
    hg = sum(c ** 2 * g for c, _ in cs) / 3  # H = diag(C^2) for each batch
    grasp_s = -w * hg  # the paper's score: the highest are removed
    assert torch.allclose(keep_scores, -grasp_s, rtol=1e-5)
    assert (keep_scores < 0).any() and (keep_scores > 0).any()
    m.init_scores = {"weight": RangeScores.whole(keep_scores)}
    (mask,) = masks_from(m, {"weight": (4, 8)})
    s = grasp_s.reshape(-1)
    assert int(mask.sum()) == 8 and s[mask].max() <= s[~mask].min()  # removed: the 24 highest S


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=48, n_positions=16, n_embd=32, n_layer=2, n_head=2))


NAMES = ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
         "transformer.h.0.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight"]


def test_synflow_scores_are_conserved_under_rescaling_a_linear_path():
    model, m = tiny_gpt2(), method("synflow")
    ones = {n: torch.ones_like(p, dtype=torch.float64) for n, p in model.named_parameters() if n in NAMES}
    before = m.synflow_scores(model, NAMES, ones)
    assert all(bool(torch.isfinite(s).all()) and bool((s > 0).any()) for s in before.values())
    with torch.no_grad():  # value projection (columns 2d..3d of the Conv1D) x 8, the output projection / 8
        attn = model.transformer.h[0].attn
        attn.c_attn.weight[:, 64:] *= 8.0
        attn.c_attn.bias[64:] *= 8.0
        attn.c_proj.weight /= 8.0
    after = m.synflow_scores(model, NAMES, ones)
    for n in NAMES:
        assert torch.allclose(after[n], before[n], rtol=1e-5, atol=1e-30), n
    # a different network (the output projection alone scaled) does change them: the check can fail
    with torch.no_grad():
        attn.c_proj.weight *= 3.0
    assert not torch.allclose(m.synflow_scores(model, NAMES, ones)[NAMES[0]], before[NAMES[0]], rtol=1e-3)


def test_synflow_iterates_the_exponential_schedule_to_the_target():
    model = tiny_gpt2()
    cfg = SparsityConfig(method="synflow", sparsity=0.9, distribution="global", init_rounds=4)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n in NAMES}
    m = build_method(cfg, shapes, total_steps=10, seed=0)
    seen = []
    original = m.synflow_scores

    def recording(model, names, masks):
        seen.append(sum(float(masks[n].sum()) for n in names) / sum(masks[n].numel() for n in names))
        return original(model, names, masks)

    m.synflow_scores = recording
    m.init_scores = {n: RangeScores.whole(t) for n, t in m.score(model, NAMES, []).items()}
    assert len(seen) == 4
    for k, density in enumerate(seen):  # round k scores the network pruned to 0.1^(k/4)
        assert density == pytest.approx(0.1 ** (k / 4), abs=1e-3)
    masks = masks_from(m, shapes)
    assert sum(int(x.sum()) for x in masks) == round(0.1 * sum(x.numel() for x in masks))


def test_pai_config_defaults_and_refusals():
    cfg = from_dict({"sparsity": {"method": "snip"}})
    assert cfg.sparsity.distribution == "global" and cfg.sparsity.init_batches == 1
    assert from_dict({"sparsity": {"method": "synflow"}}).sparsity.init_rounds == 100
    assert from_dict({"sparsity": {"method": "grasp", "distribution": "erk"}}).sparsity.distribution == "erk"
    for bad in ({"init_batches": 0}, {"init_rounds": 0}):
        with pytest.raises(ConfigError, match=f"sparsity.{next(iter(bad))}"):
            from_dict({"sparsity": {"method": "snip", **bad}})
    zero3 = {"deepspeed": {"zero_optimization": {"stage": 3}}}
    assert from_dict({"sparsity": {"method": "snip"}, **zero3}).sparsity.method == "snip"  # scores the shards
    for name, why in (("grasp", "double backward"), ("synflow", "float64 |θ| copy")):
        with pytest.raises(ConfigError) as err:
            from_dict({"sparsity": {"method": name}, **zero3})
        assert err.value.key == "sparsity.method"
        message = str(err.value)
        assert f"'{name}' cannot score at ZeRO stage 3" in message and why in message, message
        assert "sparsity.init_masks" in message and "ZeRO stage 2" in message, message
        from_dict({"sparsity": {"method": name}, "deepspeed": {"zero_optimization": {"stage": 2}}})


def test_scores_of_a_range_are_read_at_their_offset():
    """ZeRO-3 hands each rank the scores of its partition: a slice reads them at its offset; a slice outside the
    range is an error, not a silent wrong read."""
    part = RangeScores(8, torch.arange(8, 16, dtype=torch.float32))
    assert torch.equal(part.read("w", 10, 4), torch.tensor([10.0, 11, 12, 13]))
    for start, length in ((6, 4), (12, 5)):
        with pytest.raises(RuntimeError, match="cover"):
            part.read("w", start, length)
    m = method("snip", sparsity=0.75)  # 8 of the tensor's 32 kept, all from this slice (its scores are the highest)
    m.init_scores = {"weight": RangeScores(12, torch.arange(20, dtype=torch.float32))}
    sl = LayerSlice("weight", 0, (4, 8), 32, 16, torch.ones(16, dtype=torch.bool), None, None)
    (mask,) = m.initial_masks([sl], LocalSelector())
    assert torch.equal(mask, torch.arange(16) >= 8)  # positions 24..31, scores 12..19


@pytest.mark.slow
def test_snip_at_zero3_scores_the_partitions_like_the_zero2_scorer(tmp_path):
    """2 ranks, ZeRO-3 (tests/workers/pai_zero3_worker.py): partition scores within the worker's bound of the whole-
    tensor scorer's (its BOUND: a few fp32 roundings of the summed |g|, times |w|), masks and frozen positions
    equal to the reference selection (or differing only within that bound of the threshold), and the first training
    step bit-equal to that of an engine given the same masks that never scored."""
    out = tmp_path / "report.json"
    run_torchrun("pai_zero3_worker.py", 2, out)
    per_rank = json.loads(out.read_text())
    assert len(per_rank) == 2
    for rank, r in enumerate(per_rank):
        assert r["scores"]["covered"] > 0 and r["scores"]["worst"] <= 2.0 ** -20, (rank, r["scores"])
        for what in ("masks", "freeze"):
            assert r[what]["outside_band"] == 0, (rank, what, r[what])
        assert r["masks"]["kept"][0] == r["masks"]["kept"][1] and r["freeze"]["frozen"][0] == r["freeze"]["frozen"][1]
        assert r["given_masks_equal"] and r["freeze"]["masks_equal_snip"], rank
        assert r["first_step"]["grad_params"] > 0
        for what in ("loss", "grads", "masters"):
            assert r["first_step"][what], f"rank {rank}: the first step's {what} differ after scoring at ZeRO-3"
    # the partitions cover every sparsified weight once
    assert sum(r["scores"]["covered"] for r in per_rank) == per_rank[0]["scores"]["total"]
