"""The held weights' exchange: every rank's run of a flat buffer filled from that rank in one padded all-gather
(rounds when the receive buffer is bounded), on 3 gloo ranks and on a sub-group."""

import pytest
import torch
import torch.distributed as dist

from dist_sparse import distributed as D
from tests.distributed_utils import run_spawned


def _buffers(runs, total, dtype, owner):
    """The buffer every rank should end with, and the one ``owner`` starts from: its own run filled, the rest
    garbage (NaN), the gaps between runs a sentinel that must survive."""
    g = torch.Generator().manual_seed(7)
    want = torch.full((total,), -5.0)
    for start, n in runs:
        want[start:start + n] = torch.randn(n, generator=g)
    want = want.to(dtype)
    start, n = runs[owner]
    have = torch.where(want == -5.0, want, torch.full_like(want, float("nan")))
    have[start:start + n] = want[start:start + n]
    return want, have


def _check(rank, world):
    # uneven runs in rank order, one empty, a gap between runs 1 and 2
    runs = [(0, 37), (37, 0), (40, 101)]
    for dtype in (torch.float32, torch.bfloat16):
        for max_buffer, calls in ((1 << 20, 1), (3 * 16, 7)):  # 101 values in rounds of 16: 7 collectives
            want, flat = _buffers(runs, 150, dtype, rank)
            assert D.all_gather_runs(flat, runs, max_buffer=max_buffer) == calls
            assert torch.equal(flat, want), (rank, dtype, max_buffer)
    # a sub-group (what a ZeRO data-parallel group can be): group ranks, not global ones, index the runs
    sub = dist.new_group([0, 2])
    if rank != 1:
        me = dist.get_rank(group=sub)
        runs = [(0, 5), (5, 9)]
        want, flat = _buffers(runs, 14, torch.float32, me)
        assert D.all_gather_runs(flat, runs, group=sub) == 1
        assert torch.equal(flat, want)
        with pytest.raises(ValueError, match="runs has 3 entries for a group of 2 ranks"):
            D.all_gather_runs(flat, runs + [(14, 0)], group=sub)
    # nothing anywhere: no collective
    assert D.all_gather_runs(torch.empty(0), [(0, 0)] * world) == 0


def test_all_gather_runs_fills_every_rank_run():
    run_spawned(_check, 3)


def test_all_gather_runs_single_process_is_a_no_op():
    flat = torch.arange(4.0)
    assert D.all_gather_runs(flat, [(0, 4)]) == 0
    assert torch.equal(flat, torch.arange(4.0))
