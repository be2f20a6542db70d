"""The compressed exchange: every rank's selected coordinates of every tensor in one bucket, one all-gather.

It sees only tensors and a process group (works on gloo and NCCL: int32 all-gathers of equal-size tensors).

Encoding of one tensor on one rank (``positions``: the coordinates that may be sent, identical on every rank: the
coordinates the weight mask keeps, or all of them):

- sparse: ``k`` int32 indices into the tensor, then ``k`` fp32 values (bit-cast to int32): ``8 k`` bytes;
- dense over ``positions``: one fp32 value per position, 0 where not selected: ``4 n`` bytes, no indices. Chosen
  when it is not larger (``2 k >= n``), e.g. during warm-up, for small tensors and for the dense RigL step.
  With ZeRO-1/2 ranges (every rank's own partition range of the tensor, known to all), a rank's positions exclude
  its own range: what it owns it adds locally, so ``n`` is the count outside that range.

All tensors of a rank are concatenated into one int32 payload (the bucket), so a step costs one all-gather when
every rank's counts are known in advance (``topk``/``randomk``: ``k`` depends only on the shared mask and the
density), two when they are not (``threshold``: first an all-gather of the per-tensor counts, then the payloads
padded to the longest). Every rank then adds all ranks' contributions and divides by the world size: the
average, the same on every rank.

Byte accounting: :attr:`SparseExchange.last_bytes` is what this rank handed to collectives in the last exchange
(the count header, if any, plus the padded payload): ``elements x 4``.
"""

from dataclasses import dataclass

import torch

from dist_sparse import distributed as D

INT32_MAX = 2**31 - 1


@dataclass
class Outgoing:
    """What this rank sends for one tensor."""

    name: str
    numel: int
    positions: torch.Tensor | None  # sorted int64 coordinates that may be sent (same on every rank); None = all
    indices: torch.Tensor  # sorted int64 coordinates selected, a subset of positions
    values: torch.Tensor  # fp32 values at ``indices``
    own_start: int = 0  # this rank's own contribution to the range it owns, added locally (never sent)
    own: torch.Tensor | None = None
    ranges: list | None = None  # every rank's own (start, length) range (ZeRO 1/2 partitions); None: no ranges

    def sendable(self, rank: int) -> torch.Tensor | None:
        """Sorted coordinates rank ``rank`` may send: ``positions`` outside its own range (None: all)."""
        if self.ranges is None or self.ranges[rank][1] == 0:
            return self.positions
        start, length = self.ranges[rank]
        if self.positions is None:
            device = self.values.device
            return torch.cat([torch.arange(0, start, device=device),
                              torch.arange(start + length, self.numel, device=device)])
        p = self.positions
        return p[(p < start) | (p >= start + length)]

    def n_sendable(self, rank: int) -> int:
        if self.ranges is None or self.ranges[rank][1] == 0:
            return self.n_positions
        if self.positions is None:
            return self.numel - self.ranges[rank][1]
        start, length = self.ranges[rank]
        return int(((self.positions < start) | (self.positions >= start + length)).sum())

    @property
    def n_positions(self) -> int:
        return self.numel if self.positions is None else int(self.positions.numel())


def is_dense(k: int, n_positions: int) -> bool:
    """Dense encoding when it is not larger than indices + values."""
    return n_positions > 0 and 2 * k >= n_positions


def payload_elements(k: int, n_positions: int) -> int:
    """int32 elements one tensor occupies in a payload."""
    return n_positions if is_dense(k, n_positions) else 2 * k


def _dense_values(item: Outgoing, positions: torch.Tensor | None) -> torch.Tensor:
    """Values over ``positions`` (0 where not selected)."""
    full = torch.zeros(item.numel, dtype=torch.float32, device=item.values.device)
    full[item.indices] = item.values.float()
    return full if positions is None else full[positions]


def encode(items: list, rank: int = 0) -> torch.Tensor:
    parts = []
    for it in items:
        if it.numel > INT32_MAX:
            raise ValueError(f"{it.name}: {it.numel} elements do not fit int32 indices")
        k = int(it.indices.numel())
        if is_dense(k, it.n_sendable(rank)):
            parts.append(_dense_values(it, it.sendable(rank)).view(torch.int32))
        elif k:
            parts.append(it.indices.to(torch.int32))
            parts.append(it.values.float().contiguous().view(torch.int32))
    device = items[0].values.device if items else "cpu"
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32, device=device)


class SparseExchange:
    def __init__(self, group=None):
        self.group = group
        self.last_bytes = 0
        self.collectives = 0  # in the last exchange

    def run(self, items: list, fixed_counts: bool, rank_counts: list | None = None) -> dict:
        """The average over ranks of every tensor (dense, flat fp32), from each rank's selected coordinates.

        ``items`` must list the same tensors in the same order on every rank. ``fixed_counts``: every rank sends
        the same number of coordinates per tensor (then the count header is skipped); ``rank_counts``: every
        rank's count per tensor, known in advance (no header either). Where an item carries ``own`` (the rank's
        contribution to the range it owns, see :meth:`ErrorFeedback.compress`), it is added in rank order with
        what the rank sent, so the sum is formed in the same order as a reduction of whole tensors; outside the
        owned range, the result then lacks the other owners' parts and must not be used."""
        world = D.world_size(self.group)
        me = D.rank(self.group)
        device = items[0].values.device if items else torch.device("cpu")
        counts = torch.tensor([int(it.indices.numel()) for it in items], dtype=torch.int32, device=device)
        payload = encode(items, me)
        self.last_bytes, self.collectives = 0, 0
        # every rank's sendable count per tensor, computed once (lengths and decoding both need it)
        n_send = [[it.n_sendable(r) for it in items] for r in range(world)]
        if world == 1:
            all_counts, all_payloads = [counts], [payload]
        else:
            if rank_counts is not None:
                all_counts = [torch.tensor(c, dtype=torch.int32) for c in rank_counts]
                if not torch.equal(all_counts[me], counts.cpu()):
                    raise RuntimeError(f"rank {me} sends {counts.tolist()} coordinates, the precomputed counts say "
                                       f"{all_counts[me].tolist()}")
            elif fixed_counts:
                all_counts = [counts] * world
            else:
                all_counts = D.all_gather_equal(counts, self.group)
                self.last_bytes += counts.numel() * 4
                self.collectives += 1
            lengths = [sum(payload_elements(int(k), n) for k, n in zip(c.tolist(), n_send[r]))
                       for r, c in enumerate(all_counts)]
            longest = max(lengths)
            padded = torch.zeros(longest, dtype=torch.int32, device=device)
            padded[: payload.numel()] = payload
            all_payloads = [p[:n] for p, n in zip(D.all_gather_equal(padded, self.group), lengths)]
            self.last_bytes += longest * 4
            self.collectives += 1
        out = {it.name: torch.zeros(it.numel, dtype=torch.float32, device=device) for it in items}
        for r, (c, p) in enumerate(zip(all_counts, all_payloads)):
            offset = 0
            for k, it, n in zip(c.tolist(), items, n_send[r]):
                if r == me and it.own is not None and it.own.numel():
                    out[it.name].narrow(0, it.own_start, it.own.numel()).add_(it.own)
                if is_dense(k, n):
                    vals = p[offset: offset + n].view(torch.float32)
                    positions = it.sendable(r)
                    if positions is None:
                        out[it.name].add_(vals)
                    else:
                        out[it.name].index_add_(0, positions, vals)
                    offset += n
                elif k:
                    idx = p[offset: offset + k].long()
                    vals = p[offset + k: offset + 2 * k].view(torch.float32)
                    out[it.name].index_add_(0, idx, vals)
                    offset += 2 * k
        for t in out.values():
            t.div_(world)
        return out
