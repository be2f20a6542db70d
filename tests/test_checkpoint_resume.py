"""Checkpoint and resume on 2 CPU ranks: bit-identical losses, identical masks and optimizer state, atomic commits,
corrupt and unsafe files refused, resharding across world sizes (docs/reliability.md lists what each test proves)."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dist_sparse import checkpoint
from dist_sparse.errors import CheckpointError
from tests.distributed_utils import dist_sparse_train

TINY = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32", "train.eval_interval=100",
        "train.log_interval=1", "train.eval_batches=2", "data.max_chars=100000",
        "deepspeed.train_micro_batch_size_per_gpu=4", "sparsity.method=rigl", "sparsity.update_interval=3",
        "train.progress=false", "train.save_final_model=false", "train.steps=20", "train.tensorboard=false"]


def train(out, *overrides, **kwargs):
    return dist_sparse_train(out, [*TINY, *overrides], nproc=kwargs.pop("nproc", 2), **kwargs)


def losses(out) -> dict:
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def shard_tensors(ckpt: Path) -> dict:
    out = {}
    for f in sorted(ckpt.glob("rank_*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            out.update({f"{f.name}/{k}": sf.get_tensor(k) for k in sf.keys()})
    return out


def full_masks(ckpt: Path) -> dict:
    """Masks assembled from all rank files by range (world-size independent)."""
    from dist_sparse.masks.packing import unpack_bits

    masks = {}
    for f in sorted(ckpt.glob("rank_*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            ranges = json.loads(sf.metadata()["ranges"])
            for name, (start, length, shape) in ranges.items():
                key = f"{name}::mask"
                if key in sf.keys() and length:
                    full = masks.setdefault(name, torch.zeros(int(torch.tensor(shape).prod()), dtype=torch.bool))
                    full[start: start + length] = unpack_bits(sf.get_tensor(key), length)
    return masks


# ZeRO-2 resumes inside an open RigL growth window: grow_grad_steps=4 with updates at steps 6 and 12, so the
# step-10 checkpoint holds one step of the window that ends at the update of step 12; resuming must restore that
# gradient sum (not restart the window)
WINDOW = ["sparsity.update_interval=6", "sparsity.grow_grad_steps=4"]


def _stage_overrides(stage):
    return [f"deepspeed.zero_optimization.stage={stage}", *(WINDOW if stage == 2 else ())]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    train(out, *_stage_overrides(2))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_resume_is_bit_identical(straight, tmp_path, stage):
    """Resumed at step 10 of 20: the same losses and state as the uninterrupted run. ZeRO-2 (the module's
    ``straight`` run) is killed after its step-10 checkpoint and resumes with ``--resume auto``, inside an open RigL
    growth window (``WINDOW``); ZeRO-0 and ZeRO-3 resume (into a fresh directory) from their uninterrupted run's
    step-10 checkpoint: every stage writes the same checkpoint format, so one kill tests the commit protocol."""
    resumed = tmp_path / "resumed"
    if stage == 2:
        # 10 steps, killed before step 10 (checkpoint at 10 committed), then resumed for the last 10
        proc = train(resumed, *_stage_overrides(stage), "train.save_interval=10", fault="kill@10:1",
                     expect_ok=False)
        assert proc.returncode != 0
        assert checkpoint.committed_checkpoints(resumed / "checkpoints")[-1].name == "step_00000010"
        # the checkpoint holds the open growth window's gradient sum (one step of four)
        ckpt = resumed / "checkpoints" / "step_00000010"
        assert json.loads((ckpt / "trainer.json").read_text())["sparsifier"]["grad_sum_steps"] == 1
        assert any(k.endswith("::grow_grad_sum") for k in shard_tensors(ckpt))
        train(resumed, *_stage_overrides(stage), "train.save_interval=10", resume="auto")
    else:
        straight = tmp_path / "straight"
        train(straight, *_stage_overrides(stage), "train.save_interval=10")
        train(resumed, *_stage_overrides(stage), resume=str(straight / "checkpoints" / "step_00000010"))
    a, b = losses(straight), losses(resumed)
    assert [a[s] for s in range(11, 21)] == [b[s] for s in range(11, 21)]  # exactly equal, not close
    ta = shard_tensors(straight / "checkpoints" / "step_00000020")
    tb = shard_tensors(resumed / "checkpoints" / "step_00000020")
    assert set(ta) == set(tb)
    for k in ta:  # masks, master weights and Adam moments
        assert torch.equal(ta[k], tb[k]), k
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step_00000010")


@pytest.mark.slow
def test_kill_during_save_resumes_from_previous_checkpoint(tmp_path):
    proc = train(tmp_path, "train.save_interval=5", fault="save_before_commit@10:0", expect_ok=False)
    assert proc.returncode != 0
    root = tmp_path / "checkpoints"
    assert (root / "step_00000010").is_dir() and not checkpoint.is_committed(root / "step_00000010")
    assert (root / "latest").read_text().strip() == "step_00000005"
    assert checkpoint.resolve("auto", root).name == "step_00000005"
    with pytest.raises(CheckpointError, match="not committed"):
        checkpoint.resolve(str(root / "step_00000010"), root)
    proc = train(tmp_path, "train.save_interval=5", resume="auto")
    assert "step_00000005" in json.loads((tmp_path / "summary.json").read_text())["resumed_from"]


@pytest.mark.slow
def test_missing_or_uncommitted_resume_target_is_an_error(tmp_path):
    proc = train(tmp_path, resume="auto", expect_ok=False, nproc=None)
    assert proc.returncode != 0 and "no committed checkpoint" in proc.stderr
    proc = train(tmp_path, resume=str(tmp_path / "nope"), expect_ok=False, nproc=None)
    assert proc.returncode != 0 and "does not exist" in proc.stderr


@pytest.mark.slow
def test_corrupt_shards_are_named_on_every_rank(straight, tmp_path):
    import shutil

    ckpt = tmp_path / "checkpoints" / "step_00000020"
    shutil.copytree(straight / "checkpoints" / "step_00000020", ckpt)
    shard = ckpt / "rank_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    shard.write_bytes(bytes(data))
    proc = train(tmp_path, "deepspeed.zero_optimization.stage=2", resume=str(ckpt), expect_ok=False, timeout=300)
    assert proc.returncode != 0
    assert "rank_00001.safetensors" in proc.stderr and "checksum mismatch" in proc.stderr
    assert "error on rank 0" in proc.stderr and "error on rank 1" in proc.stderr  # both ranks raise, no hang
    shard.write_bytes(bytes(data[: len(data) // 3]))  # truncated
    proc = train(tmp_path, "deepspeed.zero_optimization.stage=2", resume=str(ckpt), expect_ok=False, timeout=300)
    assert "rank_00001.safetensors" in proc.stderr and "truncated" in proc.stderr


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/dist_sparse_pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    with pytest.raises(CheckpointError, match="evil.pt"):
        checkpoint.safe_torch_load(path)
    assert not Path("/tmp/dist_sparse_pwned").exists()
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(3)}, good)
    assert torch.equal(checkpoint.safe_torch_load(good)["w"], torch.ones(3))


@pytest.mark.slow
def test_resume_on_a_different_world_size_keeps_global_masks(tmp_path):
    """2 ranks -> 1 rank -> 2 ranks in one chain: the 1-rank run resumes from the 2-rank checkpoint and writes the
    checkpoint the second 2-rank run resumes from (masks frozen after step 6, so they must not change)."""
    common = ["deepspeed.zero_optimization.stage=2", "sparsity.end_step=6"]
    train(tmp_path, *common, "train.steps=8", "train.save_interval=4")
    ckpt = tmp_path / "checkpoints" / "step_00000008"
    before = full_masks(ckpt)
    for world, steps in ((1, 12), (2, 16)):
        out = tmp_path / f"on_{world}_rank"
        train(out, *common, f"train.steps={steps}", nproc=world if world > 1 else None, resume=str(ckpt))
        ckpt = out / "checkpoints" / f"step_{steps:08d}"
        after = full_masks(ckpt)
        assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before), world
        assert len(list(ckpt.glob("rank_*.safetensors"))) == world
