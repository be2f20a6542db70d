"""DeepSpeed ZeRO 0/1/2/3 on 2 CPU ranks: masks sharded like the optimizer state, decisions equal to one process,
pruned weights exactly 0 after every step (see tests/workers/zero_worker.py for what each rank checks)."""

import json

import pytest

from tests.distributed_utils import run_torchrun


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_sparse_training(stage, tmp_path):
    out = tmp_path / "report.json"
    methods = "rigl,magnitude" if stage else "rigl,set,static"
    run_torchrun("zero_worker.py", 2, stage, out, methods)
    per_rank = json.loads(out.read_text())
    assert len(per_rank) == 2
    for rank, results in enumerate(per_rank):
        for method, r in results.items():
            where = f"ZeRO-{stage} {method} rank {rank}"
            assert all(r["reference_equal"]), f"{where}: sharded masks differ from the single-process reference"
            if method != "static":
                assert r["grad_matches_deepspeed"] and all(r["grad_matches_deepspeed"]), f"{where}: wrong gradient"
            expected_updates = {"rigl": 3, "set": 3, "magnitude": 4, "static": 0}[method]
            assert r["updates"] == expected_updates, where
            assert len(r["reference_equal"]) == 1 + expected_updates, where
            assert r["masked_nonzero"] == [0] * 9, f"{where}: pruned model weights not exactly 0"
            assert r["master_masked_nonzero"] == [0] * 9, f"{where}: pruned master weights not exactly 0"
            assert all(loss == loss and abs(loss) < 100 for loss in r["losses"]), where
            assert abs(r["achieved_sparsity"] - 0.8) < 0.01, where
            if stage == 0:  # replicated like the parameters
                assert r["owned"] == r["total"], where
            else:  # each rank stores only its partition's bits
                assert r["owned"] < r["total"], where
                assert r["mask_bytes"] <= r["owned"] // 8 + 16, where
    if stage:
        assert sum(per_rank[r][m]["owned"] for r in range(2) for m in ["rigl"]) == per_rank[0]["rigl"]["total"]
