"""Bit-packing, mask files, exact top-k (single process), layer-wise distributions, counter-based randomness."""

import math

import pytest
import torch

from dist_sparse.distributions import keep_counts, layer_densities
from dist_sparse.errors import CheckpointError
from dist_sparse.masks import load_masks, pack_bits, packed_nbytes, save_masks, unpack_bits
from dist_sparse.masks import random as counter_random
from dist_sparse.masks.select import LocalSelector, Piece, topk_reference, topk_select


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1000, 4097])
def test_bit_packing_round_trip(n):
    g = torch.Generator().manual_seed(n)
    mask = torch.rand(n, generator=g) < 0.3
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n) == math.ceil(n / 8)
    assert torch.equal(unpack_bits(packed, n), mask)


def test_bit_packing_is_lsb_first_and_rejects_bad_input():
    assert pack_bits(torch.tensor([True, False, False, False, False, False, False, False, True])).tolist() == [1, 1]
    with pytest.raises(TypeError):
        pack_bits(torch.ones(3))
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 20)


def test_unpack_bits_reads_every_byte_value_lsb_first():
    # the unpacking table against the definition, bit by bit, for all 256 byte values (and a partial last byte)
    values = torch.arange(256, dtype=torch.uint8)
    want = torch.tensor([[(b >> i) & 1 == 1 for i in range(8)] for b in range(256)]).reshape(-1)
    got = unpack_bits(values, 256 * 8)
    assert got.dtype == torch.bool and torch.equal(got, want)
    assert torch.equal(unpack_bits(values, 256 * 8 - 5), want[:-5])
    assert unpack_bits(torch.zeros(0, dtype=torch.uint8), 0).numel() == 0


def test_mask_file_round_trip_and_errors(tmp_path):
    masks = {"a.weight": torch.rand(5, 7) > 0.5, "b.weight": torch.rand(3) > 0.5}
    path = save_masks(tmp_path, masks)
    assert path.name == "sparsity_masks.safetensors"
    back = load_masks(tmp_path)
    assert set(back) == set(masks) and all(torch.equal(back[k], masks[k]) for k in masks)
    with pytest.raises(CheckpointError, match="not found"):
        load_masks(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_masks(bad)


def test_topk_ties_broken_by_lower_index():
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 0.0])
    sel = topk_reference(scores, None, 3)
    assert sel.tolist() == [False, True, True, False, True, False]
    sel = topk_reference(scores, None, 2)  # two of the three tied 3.0s: the lower indices
    assert sel.tolist() == [False, True, True, False, False, False]
    eligible = torch.tensor([True, False, True, True, True, True])
    assert topk_reference(scores, eligible, 2).tolist() == [False, False, True, False, True, False]


@pytest.mark.parametrize("seed", range(5))
def test_bisection_select_equals_sort_reference_in_one_process(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (300,), generator=g).float() / 4  # many ties
    eligible = torch.rand(300, generator=g) < 0.7
    k = int(eligible.sum()) // 3
    (sel,) = topk_select([Piece(scores, eligible, 0, 0, 0)], {0: k})
    assert torch.equal(sel, topk_reference(scores, eligible, k))
    assert int(sel.sum()) == k and not (sel & ~eligible).any()


def test_local_selector_splits_pieces_like_one_tensor():
    scores = torch.tensor([5.0, 1.0, 5.0, 2.0, 5.0, 0.5, 5.0])
    pieces = [Piece(scores[4:], None, 0, 0, 4), Piece(scores[:4], None, 0, 0, 0)]  # out of order on purpose
    out = LocalSelector().topk(pieces, {0: 3})
    assert torch.equal(torch.cat([out[1], out[0]]), topk_reference(scores, None, 3))


def test_select_rejects_nan_and_too_large_k():
    with pytest.raises(ValueError, match="finite"):
        topk_select([Piece(torch.tensor([1.0, float("nan")]), None, 0, 0, 0)], {0: 1})
    with pytest.raises(ValueError, match="eligible"):
        topk_select([Piece(torch.tensor([1.0, 2.0]), torch.tensor([True, False]), 0, 0, 0)], {0: 2})


SHAPES = {"attn.c_attn": (128, 384), "attn.c_proj": (128, 128), "mlp.c_fc": (128, 512), "mlp.c_proj": (512, 128),
          "tiny": (4, 8)}


@pytest.mark.parametrize("kind", ["uniform", "erk", "global"])
def test_distribution_targets_met_within_one_element(kind):
    numels = {n: math.prod(s) for n, s in SHAPES.items()}
    dens = layer_densities(SHAPES, 0.9, kind)
    keep = keep_counts(numels, dens)
    for n in SHAPES:
        assert abs(keep[n] - dens[n] * numels[n]) <= 1, n
        assert 0.0 < dens[n] <= 1.0
    total_target = 0.1 * sum(numels.values())
    assert abs(sum(dens[n] * numels[n] for n in SHAPES) - total_target) < 1e-6 * total_target
    if kind == "erk":
        # smaller / more rectangular layers get higher density; the tiny layer is made dense
        assert dens["tiny"] == 1.0
        assert dens["attn.c_proj"] > dens["mlp.c_fc"]
    else:
        assert len(set(dens.values())) == 1


def test_erk_density_follows_sum_over_product():
    shapes = {"a": (64, 64), "b": (64, 256)}
    dens = layer_densities(shapes, 0.8, "erk")
    ratio = (sum(shapes["a"]) / math.prod(shapes["a"])) / (sum(shapes["b"]) / math.prod(shapes["b"]))
    assert dens["a"] / dens["b"] == pytest.approx(ratio)


def test_counter_random_is_shard_independent():
    full = counter_random.uniform(3, 7, 0, 1000)
    parts = torch.cat([counter_random.uniform(3, 7, 0, 400), counter_random.uniform(3, 7, 400, 600)])
    assert torch.equal(full, parts)
    assert 0.0 <= float(full.min()) and float(full.max()) < 1.0
    assert abs(float(full.mean()) - 0.5) < 0.05
    assert not torch.equal(full, counter_random.uniform(4, 7, 0, 1000))
