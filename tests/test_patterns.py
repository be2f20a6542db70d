"""Structured sparsity patterns (``sparsity.pattern``): N:M and block masks from every method, hand-checked in one
process, and equal bit for bit when the layers are cut across ranks at offsets that split N:M groups and blocks."""

import pytest
import torch

from dist_sparse.config import apply_overrides, from_dict, load
from dist_sparse.errors import ConfigError
from dist_sparse.masks.select import LocalSelector
from dist_sparse.methods import METHODS, LayerSlice, build_method
from dist_sparse.oneshot.nm import is_nm, nm_mask_from_scores
from dist_sparse.patterns import Block, parse_pattern
from dist_sparse.schedules import ConstantFraction, UpdateTimes
from tests.distributed_utils import run_spawned

# "a" is an nn.Linear (out 8, in 16), "b" a GPT-2 Conv1D stored (in 16, out 8), "c" an nn.Linear (12, 24)
SHAPES = {"a": (8, 16), "b": (16, 8), "c": (12, 24)}
TRANSPOSED = {"b"}


def method(name, spec, global_selection=False, density=0.25):
    pattern = parse_pattern(spec).bind(SHAPES, TRANSPOSED)
    d = pattern.fixed_density or density
    kwargs = {"fraction": ConstantFraction(0.3, 100)} if name in ("set", "rigl") else {}
    return METHODS[name]({n: d for n in SHAPES}, global_selection, UpdateTimes(2, 0, 10), seed=5, pattern=pattern,
                         **kwargs)


def full_tensors(seed):
    g = torch.Generator().manual_seed(seed)
    weights = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    grads = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    return weights, grads


def slices_of(masks, weights, grads, bounds=None):
    """One LayerSlice per layer: the whole tensor, or ``bounds[name] = (lo, hi)`` of its flattening."""
    out = []
    for i, name in enumerate(sorted(SHAPES)):
        n = weights[name].numel()
        lo, hi = bounds[name] if bounds else (0, n)
        out.append(LayerSlice(name, i, SHAPES[name], n, lo, masks[name].reshape(-1)[lo:hi].clone(),
                              weights[name].reshape(-1)[lo:hi].clone(), grads[name].reshape(-1)[lo:hi].clone()))
    return out


def out_in(name, t):
    return t.reshape(SHAPES[name]).t() if name in TRANSPOSED else t.reshape(SHAPES[name])


def test_nm_initial_masks_keep_n_of_every_m_input_weights_of_a_row():
    m = method("static", "2:4")
    ones = {n: torch.ones(s, dtype=torch.bool) for n, s in SHAPES.items()}
    w, g = full_tensors(0)
    sl = slices_of(ones, w, g)
    masks = m.initial_masks(sl, LocalSelector())
    for s, mask in zip(sl, masks):
        oriented = out_in(s.name, mask)
        # the hand reference: the 2 largest random scores of every 4 consecutive input columns
        scores = out_in(s.name, m.random_scores(s, stream=0))
        assert torch.equal(oriented, nm_mask_from_scores(scores, 2, 4)), s.name
        assert (oriented.reshape(oriented.shape[0], -1, 4).sum(-1) == 2).all()


@pytest.mark.parametrize("name", ["set", "rigl"])
def test_nm_drop_and_regrow_keep_exactly_n_per_group(name):
    m = method(name, "2:4")
    w, g = full_tensors(1)
    ones = {n: torch.ones(s, dtype=torch.bool) for n, s in SHAPES.items()}
    init = m.initial_masks(slices_of(ones, w, g), LocalSelector())
    old = {n: init[i].reshape(SHAPES[n]) for i, n in enumerate(sorted(SHAPES))}
    sl = slices_of(old, w, g)
    new = m.update(4, sl, LocalSelector())
    for s, mask in zip(sl, new):
        oriented = out_in(s.name, mask)
        assert (oriented.reshape(oriented.shape[0], -1, 4).sum(-1) == 2).all(), s.name
        grown = mask & ~s.mask
        assert grown.any() and int(grown.sum()) == int((s.mask & ~mask).sum())
        # the drop removed the layer's lowest |w| wherever they sit: its largest active - n_drop |w| all survive
        active = int(s.mask.sum())
        order = torch.argsort(s.weight.abs().masked_fill(~s.mask, -1), descending=True, stable=True)
        assert mask[order[: active - round(0.3 * active)]].all()
        if name == "rigl":  # regrowth inside each group by |grad|: a grown weight beats the group's other empties
            og, om, gr = (out_in(s.name, t).reshape(out_in(s.name, t).shape[0], -1, 4)
                          for t in (s.grad.abs(), mask, grown))
            empty = ~om
            for r, c in torch.nonzero(gr.any(-1)).tolist():
                if empty[r, c].any():
                    assert og[r, c][gr[r, c]].min() >= og[r, c][empty[r, c]].max()


def test_gradual_magnitude_under_nm_ends_exactly_nm():
    m = method("magnitude", "2:4")
    w, g = full_tensors(2)
    masks = {n: torch.ones(s, dtype=torch.bool) for n, s in SHAPES.items()}
    for step in (2, 4, 6, 8, 10):
        sl = slices_of(masks, w, g)
        new = m.update(step, sl, LocalSelector())
        masks = {s.name: mk.reshape(SHAPES[s.name]) for s, mk in zip(sl, new)}
    for name, mask in masks.items():
        oriented = out_in(name, mask)
        assert (oriented.reshape(oriented.shape[0], -1, 4).sum(-1) == 2).all(), name
        # at the end, each group keeps its 2 largest |w| (the ramp never dropped one of them earlier)
        assert torch.equal(oriented, nm_mask_from_scores(out_in(name, w[name].abs()), 2, 4)), name


def test_block_masks_are_whole_blocks_chosen_by_block_norm():
    m = method("rigl", "block:2x4", density=0.25)
    w, g = full_tensors(3)
    ones = {n: torch.ones(s, dtype=torch.bool) for n, s in SHAPES.items()}
    init = m.initial_masks(slices_of(ones, w, g), LocalSelector())
    pattern = m.pattern
    assert pattern.block_shape == (2, 4) and pattern.granule == 8
    old = {n: init[i].reshape(SHAPES[n]) for i, n in enumerate(sorted(SHAPES))}
    for name, mask in old.items():
        assert pattern.conforms(mask, name in TRANSPOSED), name
        assert int(mask.sum()) == 8 * round(mask.numel() * 0.25 / 8)
    sl = slices_of(old, w, g)
    new = m.update(4, sl, LocalSelector())
    for s, mask in zip(sl, new):
        t = s.name in TRANSPOSED
        mask = mask.reshape(s.shape)
        assert pattern.conforms(mask, t) and int(mask.sum()) == int(s.mask.sum()), s.name
        # survivors: the old blocks with the largest Frobenius norms, by hand
        kept_old = pattern.block_mask(old[s.name], t) & pattern.block_mask(mask, t)
        wb = out_in(s.name, s.weight)
        r, c = wb.shape
        norms = wb.reshape(r // 2, 2, c // 4, 4).square().sum((1, 3)).sqrt()
        old_blocks = pattern.block_mask(old[s.name], t)
        dropped = old_blocks & ~kept_old
        if dropped.any() and kept_old.any():
            assert norms[kept_old].min() >= norms[dropped].max()
    assert not pattern.conforms(torch.eye(8, 16, dtype=torch.bool))


def test_pattern_config_parses_2_4_from_yaml_and_set_and_refuses_bad_values(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("sparsity:\n  method: rigl\n  pattern: 2:4\n")  # YAML 1.1 alone would read 124
    assert load(f).sparsity.pattern == "2:4" and load(f).sparsity.sparsity == 0.5
    cfg = load(f, ["sparsity.pattern=block:16x16", "sparsity.sparsity=0.8"])
    assert cfg.sparsity.pattern == "block:16x16" and cfg.sparsity.sparsity == 0.8
    assert apply_overrides({}, ["sparsity.pattern=1:8"])["sparsity"]["pattern"] == "1:8"
    assert apply_overrides({}, ["train.steps=12"])["train"]["steps"] == 12
    bad = [({"pattern": "2:4", "sparsity": 0.9}, "sparsity.sparsity"), ({"pattern": "4:2"}, "sparsity.pattern"),
           ({"pattern": "block:4"}, "sparsity.pattern"), ({"pattern": 124}, "sparsity.pattern")]
    for raw, key in bad:
        with pytest.raises(ConfigError, match=key):
            from_dict({"sparsity": {"method": "rigl", **raw}})
    with pytest.raises(ConfigError, match="sparsity.pattern"):
        from_dict({"sparsity": {"pattern": "2:4"}})  # no method
    cfg = from_dict({"sparsity": {"method": "static", "pattern": "2:4"}})
    with pytest.raises(ConfigError, match="sparsity.pattern.*not divisible"):
        build_method(cfg.sparsity, {"x": (8, 6)}, 100, 0)  # 6 input features: not groups of 4
    with pytest.raises(ConfigError, match="sparsity.pattern.*not divisible"):  # Conv1D: in is the stored rows
        build_method(cfg.sparsity, {"x": (6, 8)}, 100, 0, transposed={"x"})
    assert isinstance(parse_pattern("block:2x4"), Block) and parse_pattern("unstructured").spec == "unstructured"


CASES = [("static", "2:4", False), ("set", "2:4", False), ("rigl", "2:4", True), ("magnitude", "2:4", False),
         ("static", "block:2x4", False), ("rigl", "block:2x4", False), ("set", "block:2x4", True),
         ("magnitude", "block:2x4", False), ("rigl", "1:3", False)]


def _sharded_equals_one_process(rank, world):
    shapes = dict(SHAPES)
    for name, spec, global_selection in CASES:
        if spec == "1:3":  # groups of 3: the layers' input dims must be multiples of 3
            SHAPES.clear()
            SHAPES.update({"a": (4, 12), "b": (12, 4), "c": (6, 24)})
        m = method(name, spec, global_selection, density=0.5 if name == "magnitude" else 0.25)
        w, g = full_tensors(7)
        gen = torch.Generator().manual_seed(11)  # the same cuts on every rank
        bounds, cut = {}, {}
        for n in sorted(SHAPES):
            numel = w[n].numel()
            # uneven cuts at odd offsets: they split N:M groups and blocks (1 mod 4, 3 mod 8, ...)
            edges = [0] + sorted(int(x) * 2 + 1 for x in torch.randint(1, numel // 2 - 1, (world - 1,),
                                                                        generator=gen)) + [numel]
            cut[n] = edges
            bounds[n] = (edges[rank], edges[rank + 1])
        ones = {n: torch.ones(s, dtype=torch.bool) for n, s in SHAPES.items()}
        from dist_sparse.masks.select import DistributedSelector

        dist = DistributedSelector()
        ref_init = m.initial_masks(slices_of(ones, w, g), LocalSelector())
        got = m.initial_masks(slices_of(ones, w, g, bounds), dist)
        for i, n in enumerate(sorted(SHAPES)):
            lo, hi = bounds[n]
            assert torch.equal(got[i], ref_init[i][lo:hi]), (name, spec, "initial", n, rank)
        masks = {n: ref_init[i].reshape(SHAPES[n]) for i, n in enumerate(sorted(SHAPES))}
        for step in (2, 4, 10) if m.updates_masks else ():
            ref = m.update(step, slices_of(masks, w, g), LocalSelector())
            got = m.update(step, slices_of(masks, w, g, bounds), dist)
            for i, n in enumerate(sorted(SHAPES)):
                lo, hi = bounds[n]
                assert torch.equal(got[i], ref[i][lo:hi]), (name, spec, step, n, rank)
            masks = {n: ref[i].reshape(SHAPES[n]) for i, n in enumerate(sorted(SHAPES))}
            if m.pattern.nm and name != "magnitude" or step == 10:
                for n, mk in masks.items():
                    assert m.pattern.conforms(mk, n in TRANSPOSED), (name, spec, step, n)
        SHAPES.clear()
        SHAPES.update(shapes)


@pytest.mark.parametrize("world", [2, 3])
def test_patterns_sharded_across_ranks_equal_one_process(world):
    run_spawned(_sharded_equals_one_process, world)


def test_conforms_checks_nm_like_oneshot():
    pattern = parse_pattern("2:4")
    mask = nm_mask_from_scores(torch.rand(4, 8), 2, 4)
    assert pattern.conforms(mask) and is_nm(mask, 2, 4)
    assert pattern.conforms(mask.t().contiguous(), transposed=True)
    assert not pattern.conforms(torch.ones(4, 8, dtype=torch.bool))
