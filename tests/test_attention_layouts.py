"""Block layouts (counts, symmetry, causality, seeding) and the `attention` config section."""

import pytest
import torch

from dist_sparse.attention import (
    AttentionConfig,
    bigbird_layout,
    build_layout,
    dense_layout,
    from_mask,
    global_layout,
    layout_density,
    local_layout,
    strided_layout,
    union,
)
from dist_sparse.errors import ConfigError

NB = 12


def _is_symmetric(layout):
    return torch.equal(layout, layout.transpose(-1, -2))


def _is_lower(layout):
    return torch.equal(layout, layout & torch.ones(layout.shape[-2:], dtype=torch.bool).tril())


@pytest.mark.parametrize("window", [0, 1, 3])
def test_local_counts_symmetry_and_causal(window):
    lay = local_layout(NB, window)
    assert lay.shape == (1, NB, NB) and lay.dtype == torch.bool
    assert _is_symmetric(lay)
    for i in range(NB):
        expected = min(i + window, NB - 1) - max(i - window, 0) + 1
        assert int(lay[0, i].sum()) == expected
    causal = local_layout(NB, window, causal=True)
    assert _is_lower(causal)
    assert torch.equal(causal[0].diagonal(), torch.ones(NB, dtype=torch.bool))
    assert [int(causal[0, i].sum()) for i in range(NB)] == [min(i, window) + 1 for i in range(NB)]


def test_global_rows_and_columns():
    lay = global_layout(NB, [0, -1])
    sel = {0, NB - 1}
    assert _is_symmetric(lay)
    for i in range(NB):
        row = int(lay[0, i].sum())
        assert row == (NB if i in sel else len(sel))
    causal = global_layout(NB, [0, -1], causal=True)
    assert _is_lower(causal)
    assert bool(causal[0, :, 0].all())  # everyone sees the first global block
    assert int(causal[0, NB - 1].sum()) == NB  # the last global block sees everything before it


def test_strided_fixed_pattern():
    stride, summary = 4, 1
    lay = strided_layout(NB, stride, summary)[0]
    for i in range(NB):
        for j in range(NB):
            same_chunk = i // stride == j // stride
            is_summary = j % stride == stride - 1
            assert bool(lay[i, j]) == (same_chunk or is_summary), (i, j)
    # Each row: its chunk (4 blocks) + the summary blocks of the other chunks (2).
    assert lay.sum(-1).tolist() == [stride + NB // stride - 1] * NB
    assert not _is_symmetric(lay[None])  # summaries are read by all, but do not read all
    assert _is_lower(strided_layout(NB, stride, 2, causal=True))


def test_bigbird_components_counts_and_seed():
    window, num_global, num_random = 1, 1, 2
    lay = bigbird_layout(NB, window, num_global, num_random, seed=3, num_heads=4)
    assert lay.shape == (4, NB, NB)
    base = local_layout(NB, window) | global_layout(NB, [0])
    assert bool((lay | base == lay).all()), "window and global blocks must all be present"
    extra = (lay & ~base).sum(-1)
    # Non-global rows get exactly num_random extra blocks; the global row is already full.
    assert extra[:, 0].tolist() == [0] * 4
    assert bool((extra[:, 1:] == num_random).all())
    assert torch.equal(lay, bigbird_layout(NB, window, num_global, num_random, seed=3, num_heads=4))
    assert not torch.equal(lay, bigbird_layout(NB, window, num_global, num_random, seed=4, num_heads=4))
    assert not torch.equal(lay[0], lay[1]), "heads draw their own random blocks"


def test_bigbird_causal_spends_random_blocks_on_the_past():
    lay = bigbird_layout(NB, 1, 1, 2, seed=0, causal=True)
    assert _is_lower(lay)
    base = local_layout(NB, 1, causal=True) | global_layout(NB, [0], causal=True)
    extra = (lay & ~base)[0].sum(-1)
    # Row i has i + 1 past blocks, of which min(i, 1) + 1 local and block 0 global.
    available = [max(0, (i + 1) - len({0, i, max(i - 1, 0)})) for i in range(NB)]
    assert extra.tolist() == [min(2, a) for a in available]


def test_from_mask_block_reduction_and_padding():
    seq, bs = 10, 4  # 3 blocks, the last one partial
    mask = torch.zeros(seq, seq, dtype=torch.bool)
    mask[0, 9] = True  # block (0, 2)
    mask[5, 5] = True  # block (1, 1)
    lay = from_mask(mask, bs)
    expected = torch.zeros(1, 3, 3, dtype=torch.bool)
    expected[0, 0, 2] = expected[0, 1, 1] = True
    assert torch.equal(lay, expected)
    per_head = from_mask(torch.stack([mask, ~mask]), bs)
    assert per_head.shape == (2, 3, 3) and bool(per_head[1].all())
    with pytest.raises(ValueError, match="mask"):
        from_mask(torch.ones(3, 4, dtype=torch.bool), 2)


def test_union_broadcasts_heads_and_checks_shapes():
    per_head = bigbird_layout(NB, 0, 0, 1, num_heads=3)
    u = union(local_layout(NB, 0), per_head)
    assert u.shape == (3, NB, NB)
    assert bool(u[:, torch.arange(NB), torch.arange(NB)].all())
    with pytest.raises(ValueError, match="same number of blocks"):
        union(local_layout(NB, 1), local_layout(NB + 1, 1))


def test_density_and_dense():
    assert layout_density(dense_layout(NB)) == 1.0
    assert layout_density(dense_layout(4, causal=True)) == pytest.approx(10 / 16)
    assert layout_density(local_layout(NB, 0)) == pytest.approx(1 / NB)


def test_build_layout_matches_builders():
    specs = [{"type": "local", "window": 1}, {"type": "global", "blocks": [0]}, {"type": "strided", "stride": 3},
             {"type": "bigbird", "window": 0, "num_global": 1, "num_random": 1, "seed": 7}]
    got = build_layout(specs, NB, num_heads=2, causal=True)
    want = union(local_layout(NB, 1, causal=True), global_layout(NB, [0], causal=True),
                 strided_layout(NB, 3, causal=True), bigbird_layout(NB, 0, 1, 1, seed=7, num_heads=2, causal=True))
    assert torch.equal(got, want)
    # Global indices beyond a short sequence are dropped instead of failing.
    assert torch.equal(build_layout([{"type": "global", "blocks": [0, 50]}], 4), global_layout(4, [0]))


@pytest.mark.parametrize("call, match", [
    (lambda: local_layout(NB, -1), "window"),
    (lambda: strided_layout(NB, 2, 3), "summary"),
    (lambda: global_layout(NB, [NB]), "blocks"),
    (lambda: bigbird_layout(NB, num_global=NB + 1), "num_global"),
    (lambda: build_layout([{"type": "spiral"}], NB), "unknown layout type"),
])
def test_layout_argument_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# ---------------------------------------------------------------------------------------------------------------------
# AttentionConfig
# ---------------------------------------------------------------------------------------------------------------------


def test_config_defaults_and_round_trip():
    cfg = AttentionConfig.from_dict({})
    assert cfg.implementation == "sdpa" and cfg.block_size == 64 and cfg.kernel == "auto"
    assert cfg.keep_probabilities == "auto"
    raw = {"implementation": "block_sparse", "block_size": 32, "seed": 5, "kernel": "cpu", "keep_probabilities": False,
           "layout": [{"type": "bigbird", "window": 2, "num_random": 3}, {"type": "strided", "stride": 4}]}
    cfg = AttentionConfig.from_dict(raw)
    assert cfg.to_dict() == raw
    assert AttentionConfig.from_dict(cfg.to_dict()) == cfg
    single = AttentionConfig.from_dict({"layout": {"type": "local", "window": 1}})
    assert single.layout == [{"type": "local", "window": 1}]


@pytest.mark.parametrize("raw, key", [
    ({"implementaton": "sdpa"}, "attention.implementaton"),
    ({"implementation": "flash"}, "attention.implementation"),
    ({"block_size": "64"}, "attention.block_size"),
    ({"block_size": 48}, "attention.block_size"),
    ({"block_size": True}, "attention.block_size"),
    ({"seed": -1}, "attention.seed"),
    ({"kernel": "gpu"}, "attention.kernel"),
    ({"keep_probabilities": "yes"}, "attention.keep_probabilities"),
    ({"keep_probabilities": 1}, "attention.keep_probabilities"),
    ({"layout": []}, "attention.layout"),
    ({"layout": ["local"]}, "attention.layout[0]"),
    ({"layout": [{"type": "spiral"}]}, "attention.layout[0].type"),
    ({"layout": [{"type": "local"}]}, "attention.layout[0].window"),
    ({"layout": [{"type": "local", "window": 1.5}]}, "attention.layout[0].window"),
    ({"layout": [{"type": "local", "window": 1, "size": 2}]}, "attention.layout[0].size"),
    ({"layout": [{"type": "global", "blocks": 0}]}, "attention.layout[0].blocks"),
    ({"layout": [{"type": "dense"}, {"type": "strided", "stride": 2, "summary": 3}]}, "attention.layout[1].summary"),
    ({"layout": [{"type": "bigbird", "num_random": -2}]}, "attention.layout[0].num_random"),
])
def test_config_errors_name_the_key(raw, key):
    with pytest.raises(ConfigError) as err:
        AttentionConfig.from_dict(raw)
    assert err.value.key == key


def test_config_custom_path_and_non_mapping():
    with pytest.raises(ConfigError) as err:
        AttentionConfig.from_dict({"block_size": 0}, path="model.attention")
    assert err.value.key == "model.attention.block_size"
    with pytest.raises(ConfigError) as err:
        AttentionConfig.from_dict(["block_sparse"])
    assert err.value.key == "attention"
