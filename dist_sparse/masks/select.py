"""Exact top-k selection over tensors sharded across ranks, with deterministic tie-breaking.

A mask decision ("keep the k largest |w| of this layer", "grow the k largest |grad|") must not depend on how the
layer is split across ranks: on 2 ranks the result must equal, bit for bit, what one process computes on the full
tensor. We define one total order, **larger score first, then smaller global index first**, and select the first k
elements in it. Per selection group (a layer, or all layers for the `global` distribution):

1. Scores (finite, >= 0) are mapped to int32 keys by their IEEE-754 bit pattern, which orders non-negative floats
   exactly like their values; ineligible elements get key -1.
2. The k-th largest key T is found by bisection over the 31-bit key range: each round every rank counts its keys
   >= mid and one all-reduce (for all groups at once) sums the counts. 31 rounds, no data is moved.
3. Every key > T is selected; of the keys == T the first ``k - count(> T)`` in global-index order are selected:
   an all-gather of per-piece tie counts tells each rank how many ties precede its piece.

The reference :func:`topk_reference` sorts the full tensor (stable, descending) and must agree exactly.
"""

from dataclasses import dataclass

import torch

from dist_sparse import distributed as D

_KEY_HI = 0x7F800001  # one past +inf's bit pattern: count(key >= _KEY_HI) == 0 for finite scores


@dataclass
class Piece:
    """One rank's contiguous piece of one tensor taking part in a selection.

    ``group`` is the selection group, ``order`` the tensor's position inside its group (layers are ordered by it for
    tie-breaking, then by ``start``, the offset of this piece in the flattened tensor).
    """

    scores: torch.Tensor  # flat, float, finite, >= 0
    eligible: torch.Tensor | None  # flat bool; None = all eligible
    group: int
    order: int
    start: int


def score_keys(scores: torch.Tensor, eligible: torch.Tensor | None) -> torch.Tensor:
    s = scores.detach().reshape(-1).to(torch.float32)
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError("selection scores must be finite and >= 0 (got NaN, inf or a negative score)")
    # +0.0 and -0.0 both map to key 0 (s < 0 is False for -0.0, but its bit pattern is negative)
    keys = (s + 0.0).abs().view(torch.int32).to(torch.int64)
    if eligible is not None:
        keys = torch.where(eligible.reshape(-1), keys, torch.full_like(keys, -1))
    return keys


def topk_select(pieces: list, ks: dict, group=None) -> list:
    """Select, per group g, the ``ks[g]`` first eligible elements in (score desc, global index asc) order.

    ``pieces`` are this rank's pieces; every rank must pass the same groups and ks. Returns one bool tensor per piece.
    Raises ValueError if a group has fewer eligible elements than requested.
    """
    groups = sorted(ks)
    gidx = {g: i for i, g in enumerate(groups)}
    keys = [score_keys(p.scores, p.eligible) for p in pieces]
    k = torch.tensor([int(ks[g]) for g in groups], dtype=torch.int64)
    if (k < 0).any():
        raise ValueError(f"negative k requested: {ks}")

    def counts_ge(threshold: torch.Tensor) -> torch.Tensor:
        c = torch.zeros(len(groups), dtype=torch.int64)
        for p, key in zip(pieces, keys):
            g = gidx[p.group]
            c[g] += int((key >= threshold[g]).sum())
        return D.all_reduce_sum(c, group)

    eligible_total = counts_ge(torch.zeros(len(groups), dtype=torch.int64))
    if (eligible_total < k).any():
        bad = [(g, int(k[i]), int(eligible_total[i])) for i, g in enumerate(groups) if eligible_total[i] < k[i]]
        raise ValueError(f"cannot select k elements from fewer eligible ones (group, k, eligible): {bad}")
    # invariant: count(>= lo) >= k and count(>= hi) < k (for k >= 1); bisect all groups in lock-step
    lo = torch.zeros(len(groups), dtype=torch.int64)
    hi = torch.full((len(groups),), _KEY_HI, dtype=torch.int64)
    while bool(((hi - lo) > 1).any()):
        mid = (lo + hi) // 2
        ge = counts_ge(mid)
        ok = ge >= k
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    threshold = lo
    above = counts_ge(threshold + 1)  # count(> T) < k
    need_ties = k - above

    # tie counts of every piece on every rank, to order ties by (order, start) globally
    local = torch.tensor([[gidx[p.group], p.order, p.start, int((key == threshold[gidx[p.group]]).sum())]
                          for p, key in zip(pieces, keys)], dtype=torch.int64).reshape(-1, 4)
    everyone = torch.cat(D.all_gather_varlen(local.reshape(-1), group)).reshape(-1, 4)

    out = []
    for p, key in zip(pieces, keys):
        g = gidx[p.group]
        if k[g] == 0:
            out.append(torch.zeros_like(key, dtype=torch.bool))
            continue
        before = everyone[(everyone[:, 0] == g) & ((everyone[:, 1] < p.order) |
                                                   ((everyone[:, 1] == p.order) & (everyone[:, 2] < p.start)))]
        ties_before = int(before[:, 3].sum())
        take = max(0, min(int(need_ties[g]) - ties_before, int((key == threshold[g]).sum())))
        sel = key > threshold[g]
        if take > 0:
            tie_pos = torch.nonzero(key == threshold[g]).reshape(-1)[:take]
            sel[tie_pos] = True
        out.append(sel)
    return out


def topk_reference(scores: torch.Tensor, eligible: torch.Tensor | None, k: int) -> torch.Tensor:
    """Single-process reference on a full flat tensor: the first k eligible by (score desc, index asc)."""
    keys = score_keys(scores, eligible)
    if int((keys >= 0).sum()) < k:
        raise ValueError("k exceeds the number of eligible elements")
    order = torch.sort(-keys, stable=True).indices
    sel = torch.zeros(keys.numel(), dtype=torch.bool)
    sel[order[:k]] = True
    return sel


def topk_select_local(pieces: list, ks: dict) -> list:
    """Reference for :func:`topk_select` in one process: pieces of each group are concatenated in (order, start)
    order and selected with :func:`topk_reference` (a stable sort), then split back. No collectives."""
    out = [None] * len(pieces)
    for g, k in ks.items():
        idx = sorted((i for i, p in enumerate(pieces) if p.group == g),
                     key=lambda i: (pieces[i].order, pieces[i].start))
        scores = torch.cat([pieces[i].scores.reshape(-1).float() for i in idx])
        elig = torch.cat([(pieces[i].eligible if pieces[i].eligible is not None
                           else torch.ones(pieces[i].scores.numel(), dtype=torch.bool)).reshape(-1) for i in idx])
        sel = topk_reference(scores, elig, int(k))
        pos = 0
        for i in idx:
            n = pieces[i].scores.numel()
            out[i] = sel[pos: pos + n]
            pos += n
    return out


class DistributedSelector:
    """What methods use to decide: exact top-k, integer sums and (for structured patterns, whose cells may
    straddle ranks) an all-gather of variable-length tensors over all ranks of ``group``."""

    def __init__(self, group=None):
        self.group = group

    def topk(self, pieces: list, ks: dict) -> list:
        return topk_select(pieces, ks, self.group)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return D.all_reduce_sum(t, self.group)

    def gather(self, t: torch.Tensor) -> list:
        """Every rank's 1-D tensor (lengths may differ), in rank order."""
        return D.all_gather_varlen(t, self.group)


class LocalSelector:
    """The single-process reference: full tensors in one process, selection by stable sort, no collectives."""

    def topk(self, pieces: list, ks: dict) -> list:
        return topk_select_local(pieces, ks)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def gather(self, t: torch.Tensor) -> list:
        return [t]
