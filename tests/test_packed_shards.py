"""Packed parameter shards at ZeRO-3 (``sparsity.compact_state`` + ``sparsity.packed_gather``, docs/memory.md).

One multi-process worker (``tests/workers/shards_worker.py``, 2 gloo ranks, one torchrun) checks every property:
the same losses and masks as compact state with dense shards over 20 steps with RigL mask updates (bf16; fp32 for
6 steps), every gathered tensor equal to DeepSpeed's dense gather, ``state_bytes_per_rank.weights`` equal to the
formula and below the dense shards, a resume at step 10 equal to the uninterrupted run, the final export and
DeepSpeed's consolidated state dict equal to the dense-shard run's, and the typed errors. The rest checks the
planner.
"""

import json

import pytest

from dist_sparse.cli import plan as plan_cli
from dist_sparse.memory import plan as P
from tests.distributed_utils import run_torchrun


def _setting(packed: bool, **kw) -> P.Setting:
    groups = [[P.Param("w", 1000, 0.1, True), P.Param("b", 10), P.Param("small", 50, 0.5, True)]]
    return P.Setting(world_size=2, zero_stage=3, precision="bf16", compact_state=True, packed_shards=packed,
                     groups=groups, persistence_threshold=100, **kw)


def test_plan_weights_with_packed_shards_by_hand():
    """2 ranks, bf16: ``w`` (1000 elements, density 0.1) is packed: 2 bytes x its expected active values on the
    rank's 500-element shard; ``b`` (not sparsified) and ``small`` (persistent: at most 100 elements, kept whole)
    keep their dense shards, plus the persistent parameters' whole tensors."""
    dense = P.predict(_setting(False))
    packed = P.predict(_setting(True))
    for r in range(2):
        assert dense[r]["weights"] == 2 * (500 + 5 + 25) + 2 * (10 + 50)
        assert packed[r]["weights"] == 2 * 500 * 0.1 + 2 * (5 + 25) + 2 * (10 + 50)
        for key in ("gradients", "master_weights", "optimizer_state", "masks"):
            assert packed[r][key] == dense[r][key]


def test_plan_refuses_packed_shards_without_compact_state_or_zero3():
    with pytest.raises(P.PlanError) as err:
        P.predict(P.Setting(world_size=2, zero_stage=3, precision="bf16", compact_state=False, packed_shards=True))
    assert err.value.key == "--packed-gather" and "--compact-state" in str(err.value)
    with pytest.raises(P.PlanError) as err:
        P.predict(P.Setting(world_size=2, zero_stage=2, precision="bf16", compact_state=True, packed_shards=True))
    assert err.value.key == "--packed-gather"


def test_plan_cli_7b_64_ranks(capsys):
    """The docs' figure: 7B, 64 ranks, ZeRO-3, bf16, 90%: compact state with packed shards vs without."""
    args = ["--params", "7e9", "--world-size", "64", "--zero-stage", "3", "--sparsity", "0.9", "--precision",
            "bf16", "--compact-state", "--json"]
    assert plan_cli.main(args) == 0
    before = json.loads(capsys.readouterr().out)
    assert plan_cli.main([*args, "--packed-gather"]) == 0
    after = json.loads(capsys.readouterr().out)
    assert after["packed_shards"] is True and before["packed_shards"] is False
    wb, wa = before["state_bytes_per_rank"]["weights"], after["state_bytes_per_rank"]["weights"]
    # 95% of the weights sparsified at density 0.1: 0.05 + 0.95 x 0.1 of the dense shard bytes
    assert wa == pytest.approx(wb * (0.05 + 0.95 * 0.1), rel=1e-3)
    assert after["ratio_to_dense"] < before["ratio_to_dense"]


@pytest.mark.slow
def test_packed_shards_train_resume_export(tmp_path):
    out = tmp_path / "report.json"
    run_torchrun("shards_worker.py", 2, out, tmp_path, timeout=900)
    ranks = json.loads(out.read_text())
    for rank, r in enumerate(ranks):
        dense, packed, resumed = r["dense"], r["packed"], r["resumed"]
        # the same training, bit for bit: losses and the masks after every step (RigL updates at steps 2 and 4)
        assert packed["losses"] == dense["losses"] and len(packed["losses"]) == 20
        assert packed["masks"] == dense["masks"]
        assert dense["masks"][1] != dense["masks"][2] and dense["masks"][3] != dense["masks"][4]
        # every tensor the coordinator gathered (packed values read from the packed shards) equals DeepSpeed's
        # dense gather of the dense-shard run, in the same order, every step
        cmp = r["compare"]
        assert cmp["same_sequence"] and not cmp["mismatches"] and cmp["steps"] == 20 and cmp["tensors"] > 200
        assert packed["gather_stats"]["packed"] and packed["gather_stats"]["packed_params_gathered"] > 0
        # weights per rank, measured by the accounting: the formula (dense shards kept + persistent parameters'
        # whole tensors + 2 bytes x active values of the packed shards), below the dense shards
        sb, db = packed["state_bytes"], dense["state_bytes"]
        assert packed["packed_params"] == 8  # the 8 sparsified matrices (attention, projection, MLP) of 2 layers
        assert sb["weights"] == packed["formula"]
        assert db["weights"] == packed["dense_shard_bytes"]
        assert sb["weights"] < 0.4 * db["weights"]
        for key in ("gradients", "master_weights", "optimizer_state", "masks"):
            assert sb[key] == db[key], key
        # resume at step 10 (a dist_sparse checkpoint: masters, moments, masks by range): steps 11-20 equal
        assert resumed["start"] == 10
        assert resumed["losses"] == packed["losses"][10:]
        assert resumed["masks"] == packed["masks"][10:]
        assert resumed["state_bytes"]["weights"] == sb["weights"]
        # DeepSpeed's consolidated 16-bit state dict (GatheredParameters over materialised dense shards) and the
        # final export (save_final) equal the dense-shard run's weights
        if rank == 0:
            assert packed["export"] == dense["export"] == resumed["export"]
            for k, v in packed["exported_file"].items():
                assert v == dense["export"][k], k
            assert "model.safetensors" in packed["exported_files"]
            assert "sparsity_masks.safetensors" in packed["exported_files"]
        assert packed["transient_dense_bytes"] > 0  # the export's transient dense shards were counted
        # a write through GatheredParameters(modifier_rank=0) is refused and discarded
        assert "weights of packed shards were modified through DeepSpeed" in packed["modifier_error"]
        assert packed["export_after_refusal"] == packed["export"]
        # packed shards need the packed gather: a ConfigError naming the key
        key, message = r["no_gather_error"]
        assert key == "sparsity.packed_gather" and "set sparsity.packed_gather: true" in message
        # fp32 (the packed fp32 values are the master itself): the same losses, masks, gathers and export
        f = r["fp32"]
        assert f["packed"]["losses"] == f["dense"]["losses"] and f["packed"]["masks"] == f["dense"]["masks"]
        assert not f["compare"]["mismatches"] and f["compare"]["same_sequence"]
        assert f["packed"]["export"] == f["dense"]["export"] == f["packed"]["export_after_remask"]
        assert f["packed"]["state_bytes"]["weights"] < 0.4 * f["dense"]["state_bytes"]["weights"]
