"""DeepSpeed ZeRO 0/1/2/3 on 2 CPU ranks: masks sharded like the optimizer state, decisions equal to one process,
pruned weights exactly 0 after every step (see tests/workers/zero_worker.py for what each rank checks)."""

import json

import pytest

from tests.distributed_utils import run_torchrun

STAGES = (0, 1, 2, 3)


def _methods(stage: int) -> str:
    methods = "rigl,magnitude" if stage else "rigl,set,static"
    # every structured pattern with each method family, its groups and blocks cut by the stage's partitions
    methods += ",static@2:4,set@2:4,rigl@block:4x4" if stage in (0, 2) else ",rigl@2:4,magnitude@2:4,set@block:4x4"
    if stage:  # SR-STE keeps dense masters: ZeRO >= 1 (at ZeRO-0 fp32 the model's weights are the masters)
        methods += ",sr_ste@2:4"
    # pruning at initialization; GraSP's signed scores through the selector (at ZeRO-3 GraSP and SynFlow are refused
    # and SNIP scores partitions, whose reference is the whole-tensor scorer: tests/test_pai.py)
    if stage < 3:
        methods += ",snip,grasp,synflow,grasp@2:4" if stage != 1 else ",snip,grasp@block:4x4,synflow@2:4"
    return methods


@pytest.fixture(scope="module")
def _reports(tmp_path_factory):
    """One launch runs every ZeRO stage (process start-up dominates a stage's runs): stage -> per-rank results."""
    out = tmp_path_factory.mktemp("zero") / "report.json"
    run_torchrun("zero_worker.py", 2, ",".join(map(str, STAGES)), out,
                 json.dumps({str(stage): _methods(stage) for stage in STAGES}), timeout=1800)
    per_rank = json.loads(out.read_text())
    assert len(per_rank) == 2
    return {stage: [r[str(stage)] for r in per_rank] for stage in STAGES}


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_zero_stage_sparse_training(stage, _reports):
    per_rank = _reports[stage]
    assert all(set(results) == set(_methods(stage).split(",")) for results in per_rank)
    for rank, results in enumerate(per_rank):
        for spec, r in results.items():
            method, _, pattern = spec.partition("@")
            where = f"ZeRO-{stage} {spec} rank {rank}"
            assert r["conforms"], f"{where}: masks do not have the {pattern} structure"
            assert all(r["reference_equal"]), f"{where}: sharded masks differ from the single-process reference"
            if method in ("rigl", "set", "magnitude"):
                assert r["grad_matches_deepspeed"] and all(r["grad_matches_deepspeed"]), f"{where}: wrong gradient"
            # SR-STE re-decides S(W) before every step's forward (9 steps); the others on their schedule
            expected_updates = {"rigl": 3, "set": 3, "magnitude": 4, "static": 0, "sr_ste": 9, "snip": 0, "grasp": 0,
                                "synflow": 0}[method]
            assert r["updates"] == expected_updates, where
            assert len(r["reference_equal"]) == 1 + expected_updates, where
            if method == "sr_ste":  # dense masters: trained, not zeroed (the forward sees them masked)
                assert all(n > 0 for n in r["master_masked_nonzero"]), f"{where}: pruned masters were zeroed"
            else:
                assert r["masked_nonzero"] == [0] * 9, f"{where}: pruned model weights not exactly 0"
                assert r["master_masked_nonzero"] == [0] * 9, f"{where}: pruned master weights not exactly 0"
            assert all(loss == loss and abs(loss) < 100 for loss in r["losses"]), where
            assert abs(r["achieved_sparsity"] - (0.5 if pattern == "2:4" else 0.8)) < 0.01, where
            if stage == 0:  # replicated like the parameters
                assert r["owned"] == r["total"], where
            else:  # each rank stores only its partition's bits
                assert r["owned"] < r["total"], where
                assert r["mask_bytes"] <= r["owned"] // 8 + 16, where
    if stage:
        assert sum(per_rank[r][m]["owned"] for r in range(2) for m in ["rigl"]) == per_rank[0]["rigl"]["total"]
