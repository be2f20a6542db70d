"""A custom accelerate loop with a DeepSpeed plugin and ``dist_sparse.accelerate.attach``, under
``accelerate launch --num_processes 2`` on CPU (tests/workers/accelerate_worker.py): ZeRO-1 with compact state,
pruned weights 0 after every step, mask updates on schedule, save_state/load_state restore masks and weights."""

import json
import os
import sys
from pathlib import Path

import pytest

from tests.distributed_utils import ROOT, run_group

ACCELERATE = Path(sys.executable).with_name("accelerate")


@pytest.mark.slow
def test_accelerate_sparse_steps_and_state(tmp_path):
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [str(ACCELERATE), "launch", "--use_deepspeed", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", "0", "--mixed_precision", "no", str(ROOT / "tests" / "workers" /
                                                                        "accelerate_worker.py"),
           str(out), "1", str(tmp_path)]
    proc = run_group(cmd, env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    per_rank = json.loads(out.read_text())
    assert len(per_rank) == 2
    for rank, r in enumerate(per_rank):
        where = f"rank {rank}"
        assert r["world"] == 2 and r["type"] == "SparseEngine" and r["compact"], where
        assert r["owned"] < r["total"], f"{where}: masks not sharded"
        assert r["updates"] == [0, 0, 1, 1, 2, 2], where  # RigL at engine steps 2 and 4
        assert r["pruned_nonzero"] == [0] * 9, f"{where}: pruned weights not exactly 0"
        assert r["restored_equal"], f"{where}: load_state did not restore the saved masks and weights"
        assert r["resume_equal"] == [True, True, True], f"{where}: steps after load_state differ"
        assert {"dist_sparse", "sparsity_masks.safetensors"} <= set(r["saved_files"]), where
