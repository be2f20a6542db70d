"""``sparsity.packed_gather``: ZeRO-3 parameter gathers of mask bits + active values (docs/memory.md).

The multi-process test (``tests/workers/gather_worker.py``, 2 gloo ranks, one torchrun for every property): the
packed gather hands the coordinator exactly DeepSpeed's dense gather of every parameter at every step (right
after RigL's mask updates too), the runs' losses and masks equal a run without it, the bytes equal the formula,
``dist-sparse plan``'s prediction is within a few percent. The rest checks the config errors and the planner.
"""

import json
import math

import pytest

from dist_sparse import config as C
from dist_sparse.cli import plan as plan_cli
from dist_sparse.config import ConfigError
from dist_sparse.memory import gather as G
from tests.distributed_utils import run_torchrun

KEY = "sparsity.packed_gather"


@pytest.mark.parametrize("sparsity, zero, extra, needle", [
    ({"method": "rigl"}, {"stage": 2}, {}, "needs ZeRO stage 3, not 2"),
    ({"method": "rigl"}, {"stage": 0}, {}, "needs ZeRO stage 3, not 0"),
    ({"method": "none"}, {"stage": 3}, {}, "keeps masks"),
    ({"method": "rigl"}, {"stage": 3, "offload_param": {"device": "cpu"}}, {}, "offload_param"),
    ({"method": "rigl"}, {"stage": 3, "zero_hpz_partition_size": 2}, {}, "hierarchical partitioning"),
    ({"method": "rigl"}, {"stage": 3, "zero_quantized_weights": True}, {}, "zero_quantized_weights"),
    ({"method": "rigl"}, {"stage": 3, "stage3_use_all_reduce_for_fetch_params": True}, {}, "all-reduce"),
    ({"method": "rigl"}, {"stage": 3}, {"torch_autocast": {"enabled": True}}, "torch_autocast"),
])
def test_invalid_combinations_are_config_errors(sparsity, zero, extra, needle):
    ds = {"zero_optimization": zero, **extra}
    raw = {"sparsity": {**sparsity, "packed_gather": True}, "deepspeed": ds}
    with pytest.raises(ConfigError) as err:  # dist-sparse train's path: before any process group starts
        C.from_dict(raw)
    assert err.value.key == KEY and needle in str(err.value)
    with pytest.raises(ConfigError) as err:  # dist_sparse.initialize's path: before deepspeed.initialize
        C.split_deepspeed_json({**ds, "sparsity": raw["sparsity"]})
    assert err.value.key == KEY and needle in str(err.value)


def test_key_type_checked_and_default_off():
    with pytest.raises(ConfigError) as err:
        C.from_dict({"sparsity": {"method": "rigl", "packed_gather": "yes"},
                     "deepspeed": {"zero_optimization": {"stage": 3}}})
    assert err.value.key == KEY
    assert C.from_dict({}).sparsity.packed_gather is False
    ok = C.from_dict({"sparsity": {"method": "rigl", "packed_gather": True, "compact_state": True},
                      "deepspeed": {"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}})
    assert ok.sparsity.packed_gather


def test_prediction_by_hand():
    """One sparsified and one dense parameter, 2 ranks, bf16: the first step records DeepSpeed's trace (every
    parameter twice, persistent ones too), later ones gather the non-persistent ones once per micro-batch."""
    params = [G.GatherParam("w", 1000, 0.1, True), G.GatherParam("b", 10)]
    steady = G.predict(params, 2, "bf16", True, persistence_threshold=100)
    shard = 500
    packed_w = math.ceil(shard / 8) + 2 * 0.1 * shard
    assert steady["param_gather_bytes_per_step"] == pytest.approx(packed_w)
    assert steady["dense_param_gather_bytes_per_step"] == 2 * shard
    run = G.predict(params, 2, "bf16", True, steps=4, gas=2, persistence_threshold=100)
    first = 2 * (packed_w + 2 * 5) + (packed_w + 2 * 5)  # recording micro-batch, then the second one
    assert run["param_gather_bytes_per_step"] == pytest.approx((first + 3 * 2 * packed_w) / 4)
    # beyond the reuse distance a parameter is gathered again for the backward
    far = G.predict([G.GatherParam("a", 1000), G.GatherParam("z", 1000)], 2, "fp32", False,
                     reuse_distance=1000, persistence_threshold=100)
    assert far["dense_param_gather_bytes_per_step"] == 4 * 500 * (2 + 1)
    assert G.predict(params, 1, "bf16", True)["param_gather_bytes_per_step"] == 0.0


def test_plan_cli_predicts_both_keys(capsys):
    argv = ["--params", "7e9", "--world-size", "64", "--zero-stage", "3", "--precision", "bf16", "--json"]
    assert plan_cli.main([*argv, "--packed-gather"]) == 0
    packed = json.loads(capsys.readouterr().out)
    assert plan_cli.main(argv) == 0
    dense = json.loads(capsys.readouterr().out)
    assert packed["packed_gather"] is True and dense["packed_gather"] is False
    assert dense["param_gather_bytes_per_step"] == dense["dense_param_gather_bytes_per_step"]
    assert packed["dense_param_gather_bytes_per_step"] == dense["dense_param_gather_bytes_per_step"]
    # 95% sparsified at density 0.1: 0.95 x (0.1 + 1/16) + 0.05 of the dense bytes (bf16: 1 bit vs 16 per weight)
    ratio = packed["param_gather_bytes_per_step"] / packed["dense_param_gather_bytes_per_step"]
    assert ratio == pytest.approx(0.95 * (0.1 + 1 / 16) + 0.05, rel=1e-3)
    assert plan_cli.main(["--params", "1e9", "--world-size", "2", "--zero-stage", "2", "--json"]) == 0
    assert "param_gather_bytes_per_step" not in json.loads(capsys.readouterr().out)  # no gathers at ZeRO-0/1/2
    assert plan_cli.main(["--params", "1e9", "--world-size", "2", "--zero-stage", "2", "--packed-gather"]) == 2
    assert "--packed-gather" in capsys.readouterr().err


@pytest.mark.slow
def test_packed_gather_equals_dense_gather(tmp_path):
    from tests.workers import tiny_gpt2

    out = tmp_path / "report.json"
    run_torchrun("gather_worker.py", 2, out, timeout=900)
    ranks = json.loads(out.read_text())
    model = tiny_gpt2()
    for rank in ranks:
        for label, r in rank.items():
            dense, packed, cmp = r["dense"], r["packed"], r["compare"]
            # every gathered tensor of every step equals DeepSpeed's dense gather of the same parameter, bit for
            # bit, in the same order; the runs mask-update at steps 0, 2 and 4, so the steps after an update
            # gather with the new masks
            assert cmp["same_sequence"] and not cmp["mismatches"], (label, cmp["mismatches"][:5])
            assert cmp["steps"] == 8 and cmp["tensors"] > 100
            assert packed["updates"] == dense["updates"] and sum(packed["updates"]) == 2  # steps 2 and 4
            # sparsified parameters were gathered packed, at every step
            assert packed["stats"]["packed"] and packed["stats"]["packed_params_gathered"] >= 8 * 8
            sparse = set(packed["sparse"])
            assert all(sparse & set(names) for names in packed["gathered_per_step"])
            assert dense["pruned_nonzero"] == packed["pruned_nonzero"] == 0
            # the same training: losses and masks of a run without packed gathers
            assert packed["losses"] == dense["losses"], label
            assert packed["final_masks"] == dense["final_masks"], label
            # bytes: what ParamGather counted equals the formula over the observed calls (mask bytes + the
            # largest rank's active values in each packed call, dense shards for the rest), every step
            assert packed["measured"] == packed["expected"], label
            assert dense["measured"] == dense["expected"] == dense["expected_dense"] == dense["dense"]
            assert packed["dense"] == dense["dense"]  # the dense key: DeepSpeed's gather of the same parameters
            assert dense["stats"]["param_gather_bytes_per_step"] == dense["stats"]["dense_param_gather_bytes_per_step"]
            ratio = packed["stats"]["param_gather_bytes_per_step"] / dense["stats"]["dense_param_gather_bytes_per_step"]
            assert ratio < 0.4, (label, ratio)  # 80% sparsity over the weight matrices + dense embeddings
            # dist-sparse plan's formula on the same model and densities: dense exact, packed within 3%
            precision, gas = ("bf16", 2) if label.startswith("bf16") else ("fp32", 1)
            for run, packed_gather in ((dense, False), (packed, True)):
                params = G.model_params(model, sparse, run["densities"])
                predicted = G.predict(params, 2, precision, packed_gather, steps=8, gas=gas,
                                      persistence_threshold=100)
                stats = run["stats"]
                assert predicted["dense_param_gather_bytes_per_step"] == stats["dense_param_gather_bytes_per_step"]
                assert predicted["param_gather_bytes_per_step"] == pytest.approx(
                    stats["param_gather_bytes_per_step"], rel=0.03), (label, packed_gather)
