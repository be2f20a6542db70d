"""`dist-sparse lottery`: round bookkeeping, magnitude pruning per round, rewinding equality (the survivors' state
after the reset equals the saved step-K state), resume in the middle of a round, the reinit control."""

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from dist_sparse.cli.lottery import prune_by_magnitude
from dist_sparse.masks import load_masks
from dist_sparse.masks.packing import unpack_bits
from tests.distributed_utils import ROOT, run_group


def test_prune_by_magnitude_removes_the_fraction_of_remaining_weights():
    w = {"a": torch.tensor([[0.1, -3.0], [2.0, 0.5]]), "b": torch.tensor([4.0, -0.2, 0.3, 1.0])}
    m = {"a": torch.tensor([[True, True], [True, False]]), "b": torch.ones(4, dtype=torch.bool)}
    per_layer = prune_by_magnitude(w, m, 0.5, global_selection=False)
    assert per_layer["a"].tolist() == [[False, True], [False, False]]  # 3 active: round(1.5) = 2 pruned
    assert per_layer["b"].tolist() == [True, False, False, True]
    glob = prune_by_magnitude(w, m, 0.5, global_selection=True)  # 7 active, round(3.5) = 4 pruned: |4|, |-3|, |2| kept
    assert glob["a"].tolist() == [[False, True], [True, False]] and glob["b"].tolist() == [True, False, False, False]


TINY = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32", "train.steps=12",
        "train.eval_interval=6", "train.log_interval=4", "train.eval_batches=2", "data.max_chars=200000",
        "deepspeed.train_micro_batch_size_per_gpu=4", "train.progress=false", "sparsity.sparsity=0.75",
        "sparsity.distribution=uniform", "deepspeed.zero_optimization.stage=2"]


def lottery(out, fault=None):
    cmd = [sys.executable, "-m", "dist_sparse.cli.main", "lottery", str(ROOT / "configs" / "demo.yaml"),
           "--rounds", "2", "--prune-fraction", "0.5", "--rewind-step", "4", "--control", "reinit", "--nproc", "2"]
    for o in (*TINY, f"train.output_dir={out}"):
        cmd += ["--set", o]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DIST_SPARSE_FAULT")}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    if fault:
        env["DIST_SPARSE_FAULT"] = fault
    return run_group(cmd, env, timeout=1200)


def shards(ckpt):
    out = {}
    for f in sorted(ckpt.glob("rank_*.safetensors")):
        out[f.name] = load_file(str(f))
    return out


@pytest.mark.slow
def test_lottery_rounds_rewind_resume_and_control(tmp_path):
    first = lottery(tmp_path, fault="kill@10:1")  # round 0 dies after its step-8 checkpoint
    assert first.returncode != 0 and not (tmp_path / "round-00" / "summary.json").exists()
    done = lottery(tmp_path)  # the same command resumes round 0 at step 8 and finishes
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads((tmp_path / "lottery.json").read_text())
    assert report["rounds"] == 2 and report["prune_fraction"] == 0.5 and report["rewind_step"] == 4
    assert [r["round"] for r in report["round"]] == [0, 1, 2]
    assert [round(r["sparsity"], 3) for r in report["round"]] == [0.0, 0.5, 0.75]
    assert all(r["val_loss"] == r["val_loss"] for r in report["round"])
    assert json.loads((tmp_path / "round-00" / "summary.json").read_text())["resumed_from"]
    assert report["control"]["seed"] == 1000 and round(report["control"]["sparsity"], 3) == 0.75
    # each round's masks: the previous round's final weights pruned by magnitude, nested
    m1, m2 = load_masks(tmp_path / "round-01" / "final"), load_masks(tmp_path / "round-02" / "final")
    assert all(not bool((m2[n] & ~m1[n]).any()) for n in m1)
    assert all(torch.equal(load_masks(tmp_path / "control-reinit" / "final")[n], m2[n]) for n in m2)
    # rewinding: round 2 at step 4 holds round 0's step-4 masters and moments on its surviving positions, 0 elsewhere
    ref = shards(tmp_path / "round-00" / "checkpoints" / "step_00000004")
    got = shards(tmp_path / "round-02" / "checkpoints" / "step_00000004")
    compared = 0
    for f, tensors in got.items():
        for key, value in tensors.items():
            name, _, kind = key.partition("::")
            if kind not in ("master", "exp_avg", "exp_avg_sq") or name not in m2:
                continue
            mask = unpack_bits(tensors[f"{name}::mask"], value.numel())
            assert torch.equal(value[mask], ref[f][key][mask]) and bool((value[~mask] == 0).all()), key
            compared += 1
    assert compared >= 3 * len(m2)
    t_ref = json.loads((tmp_path / "round-00" / "checkpoints" / "step_00000004" / "trainer.json").read_text())
    t_got = json.loads((tmp_path / "round-02" / "checkpoints" / "step_00000004" / "trainer.json").read_text())
    assert t_got["lr_scheduler"] == t_ref["lr_scheduler"] and t_got["data"] == t_ref["data"]
    assert t_got["optimizer_step"] == t_ref["optimizer_step"] == 4
