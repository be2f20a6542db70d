"""Faults on 2 CPU ranks: a killed rank under torchrun restarts from the last committed checkpoint and ends like an
uninterrupted run; a hung peer is a clear error within train.dist_timeout_s; NaN on one rank skips on both.

The uninterrupted reference of the kill test also carries a NaN on rank 1 at step 3 (the restarted run carries it
too, in its first attempt): that one run checks that both ranks skip the step and train on (one launch fewer than a
separate NaN run; both runs skip the same step, so the restart equality is unaffected)."""

import json
import time

import pytest
import torch

from tests.test_checkpoint_resume import full_masks, losses, train


@pytest.mark.slow
def test_killed_rank_restarts_and_matches_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    proc = train(straight, "train.save_interval=5", fault="nan@3:1")
    # NaN on one rank: every rank skips step 3 and training continues to a finite loss
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["final_val_loss"] == summary["final_val_loss"]
    assert "step 3 skipped on every rank" in proc.stderr
    restarted = tmp_path / "restarted"
    proc = train(restarted, "train.save_interval=5", fault="nan@3:1,kill@12:1", max_restarts=1)
    assert proc.returncode == 0
    assert "step 3 skipped on every rank" in proc.stderr  # the first attempt saw the same history
    summary = json.loads((restarted / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step_00000010")
    a, b = full_masks(straight / "checkpoints" / "step_00000020"), full_masks(restarted / "checkpoints" /
                                                                             "step_00000020")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    la, lb = losses(straight), losses(restarted)
    assert [la[s] for s in range(11, 21)] == [lb[s] for s in range(11, 21)]


@pytest.mark.slow
def test_hung_peer_is_a_clear_error_within_the_timeout(tmp_path):
    t0 = time.time()
    proc = train(tmp_path, "train.dist_timeout_s=15", fault="hang@4:1", expect_ok=False, timeout=400)
    elapsed = time.time() - t0
    assert proc.returncode != 0
    assert "train.dist_timeout_s=15s" in proc.stderr and "peer rank hung or died" in proc.stderr
    assert elapsed < 300  # bounded by the timeout (plus start-up), not an endless hang


@pytest.mark.slow
def test_nan_on_one_rank_aborts_after_max_skipped_steps(tmp_path):
    """A NaN on one rank skips the step on both ranks (checked on the reference run of
    test_killed_rank_restarts_and_matches_uninterrupted_run); train.max_skipped_steps consecutive ones abort every
    rank."""
    proc = train(tmp_path, "train.steps=8", "train.max_skipped_steps=2", fault="nan@3:1,nan@4:1", expect_ok=False)
    assert proc.returncode != 0
    assert "2 consecutive steps had a non-finite loss" in proc.stderr
    assert "error on rank 0" in proc.stderr and "error on rank 1" in proc.stderr
