"""Exact top-k across ranks: pieces of a tensor on 2 or 3 gloo ranks select exactly what one process selects."""

import pytest
import torch

from dist_sparse.masks.select import Piece, topk_reference, topk_select
from tests.distributed_utils import run_spawned


def _check_select(rank, world, seed):
    g = torch.Generator().manual_seed(seed)  # the same full tensors on every rank
    sizes = (1000, 37, 517)
    # heavy ties, both signs (GraSP's scores are signed), -0.0 equal to +0.0
    scores = [(torch.randint(0, 8, (n,), generator=g).float() - 4) / 8 for n in sizes]
    scores[1][::5] = -0.0
    eligible = [torch.rand(n, generator=g) < 0.6 for n in sizes]
    ks = {0: int(eligible[0].sum()) // 4, 1: 5, 2: int(eligible[2].sum())}  # incl. "select all"
    # uneven contiguous split, ranks own ascending ranges (as ZeRO partitions do)
    pieces, spans = [], []
    for t, (s, e) in enumerate(zip(scores, eligible)):
        bounds = [0] + sorted(torch.randint(0, len(s) + 1, (world - 1,), generator=g).tolist()) + [len(s)]
        lo, hi = bounds[rank], bounds[rank + 1]
        pieces.append(Piece(s[lo:hi], e[lo:hi], t, 0, lo))
        spans.append((lo, hi))
    local = topk_select(pieces, ks)
    for t, (sel, (lo, hi)) in enumerate(zip(local, spans)):
        ref = topk_reference(scores[t], eligible[t], ks[t])[lo:hi]
        assert torch.equal(sel, ref), f"rank {rank} tensor {t}"
    # one global group over two tensors: order between tensors by `order`
    gpieces = [Piece(p.scores, p.eligible, 0, t, p.start) for t, p in enumerate(pieces[:2])]
    k = int(eligible[0].sum() + eligible[1].sum()) // 3
    glocal = topk_select(gpieces, {0: k})
    ref = topk_reference(torch.cat(scores[:2]), torch.cat(eligible[:2]), k)
    ref0, ref1 = ref[:1000], ref[1000:]
    assert torch.equal(glocal[0], ref0[spans[0][0]: spans[0][1]])
    assert torch.equal(glocal[1], ref1[spans[1][0]: spans[1][1]])


@pytest.mark.parametrize("world,seed", [(2, 0), (2, 1), (3, 2)])
def test_sharded_select_equals_single_process(world, seed):
    run_spawned(_check_select, world, seed)
