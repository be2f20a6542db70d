"""The full masks a sender needs, built from the ranks' shards just in time (docs/memory.md, "Masks stay sharded").

A rank stores only the mask bits of its own range of each parameter (the sparsifier's ``packed``, ranges
``mask_start``/``mask_len`` of its views). Two features select coordinates of a rank's *whole* local gradient and
therefore need a parameter's full mask, identically on every rank: compact state's packed gradient reduction
(``integration/compact_reduce.py``) and gradient compression (``integration/ds_compression.py``).

:class:`MaskSource` gives them one tensor's full mask at a time:

- sharded (the default, ``sparsity.replicate_masks: false``): nothing is kept between uses. :meth:`full` moves
  that tensor's shard bits to every rank, unpacks them into a bool mask, keeps that one mask until the next tensor
  is asked for or :meth:`release` is called, and drops the moved bits at once. When every rank holds a part of the
  tensor (ZeRO-3 shards) that is one all-gather of the bits padded to the widest part (every rank knows the
  ranges, so no length header is sent): each rank hands ``max_r ceil(len_r / 8)`` bytes. When only some ranks
  hold a part (ZeRO-1/2: a tensor usually lies in one or two partitions) padding would make every rank send a
  whole tensor's bits, so each owner broadcasts its part instead: an owner hands ``ceil(len / 8)`` bytes of its
  own, the others nothing. Either way a rank receives about the tensor's bits once. Between steps a rank holds
  only its own bits (about 1/world of the full masks); the transient is one tensor's bits (``max_in_flight``).
- replicated (``sparsity.replicate_masks: true``, the behaviour before issue 18): the full masks of every tensor
  are gathered once per mask change (:func:`dist_sparse.masks.replicate.gather_full_masks`) and kept bit-packed,
  1 bit per weight of every sparsified parameter on every rank; no mask traffic on steps between mask changes.

Both modes hand out the very same bits, so everything selected by them is bit-identical.

:meth:`full` is a collective in sharded mode: every rank must ask for the same tensors in the same order. The
callers do (the packed reduction from DeepSpeed's gradient hooks, which fire in the same order on every rank, as
DeepSpeed's own bucketed reduction requires; compression in its fixed name order).
"""

import torch

from dist_sparse import distributed as D
from dist_sparse.masks.packing import packed_nbytes, unpack_bits
from dist_sparse.masks.replicate import gather_full_masks

# the config key that chooses the mode (named in errors and docs)
KEY = "sparsity.replicate_masks"


class MaskSource:
    """Full masks of ``sparsifier``'s sparsified parameters over ``group``, on ``device`` (see the module
    docstring). ``token()`` changes whenever the masks change (a mask update, a checkpoint load): the callers pass
    it to :meth:`refresh` before a step's first use. ``bits``: returns the name -> packed bits of this rank's
    ranges to build full masks from (default: the sparsifier's masks; compact state with frozen weights hands its
    trainable bits, the layout it packs by)."""

    def __init__(self, sparsifier, group=None, device=None, replicate: bool = False, bits=None):
        self.sparsifier = sparsifier
        self._bits = bits if bits is not None else (lambda: sparsifier.packed)
        self.group = group
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.replicate = bool(replicate)
        self.world = D.world_size(group)
        self.views = {v.name: v for v in sparsifier.views}
        # stage 0 stores the whole mask on every rank: nothing to gather in either mode
        self.local = bool(self.views) and all(v.replicated for v in self.views.values())
        self._ranges = None  # name -> [(start, length) of every rank], fixed for the run (ZeRO's ranges are)
        self._replicated: dict = {}  # replicated mode: name -> (packed full bits, numel)
        self._counts = None  # name -> [active count of every rank's range], for the current masks
        self._token = None
        self._last = None  # (name, bool mask): the one full mask handed out last (sharded mode)
        # accounting (per rank): bytes handed to the collectives, split into the masks' bits and the layout
        # (ranges once, per-rank active counts after each mask change); the bits that arrived from other ranks;
        # the most bits alive at once while one tensor's full mask is built
        self.bits_bytes = 0
        self.layout_bytes = 0
        self.received_bytes = 0
        self.max_in_flight = 0

    def __contains__(self, name) -> bool:
        return name in self.views

    def __len__(self) -> int:
        return len(self.views)

    # -- ranges and counts -----------------------------------------------------------------------------------------
    def ranges(self, name: str) -> list:
        """Every rank's ``(start, length)`` of ``name`` (one all-gather for all tensors, at the first use)."""
        if self._ranges is None:
            names = list(self.views)
            mine = torch.tensor([[self.views[n].mask_start, self.views[n].mask_len] for n in names],
                                dtype=torch.int64, device=self.device).reshape(-1, 2)
            if self.local:
                gathered = [mine]
            else:
                gathered = D.all_gather_equal(mine, self.group)
                self.layout_bytes += mine.numel() * 8 if self.world > 1 else 0
            rows = [g.tolist() for g in gathered]
            self._ranges = {n: [tuple(r[k]) for r in rows] for k, n in enumerate(names)}
            for n, rs in self._ranges.items():  # the ranks' ranges must tile each parameter
                covered = sorted((s, s + ln) for s, ln in rs if ln)
                ends = [0] + [e for _, e in covered]
                if not self.local and ([s for s, _ in covered] != ends[:-1] or ends[-1] != self.views[n].numel):
                    raise RuntimeError(f"mask ranges of {n} do not tile it: {rs}")
        return self._ranges[name]

    def refresh(self, token) -> None:
        """The masks may have changed (``token`` differs from the last one): replicated mode re-gathers the full
        masks (a collective), both modes forget the per-rank counts."""
        if token == self._token:
            return
        self._token = token
        self._counts = None
        self.release()
        if self.replicate and not self.local and self.views:
            full, handed = gather_full_masks(list(self.views.values()), self._bits(), self.group, self.device)
            self._replicated = full
            self.bits_bytes += handed
            own = sum(packed_nbytes(v.mask_len) for v in self.views.values())
            self.received_bytes += sum(bits.numel() for bits, _ in full.values()) - own

    def counts(self) -> dict:
        """name -> every rank's number of active positions in its range of ``name``, for the current masks: one
        all-gather of int64 counts per mask change (sharded), or counted from the kept full masks (replicated)."""
        if self._counts is not None:
            return self._counts
        names = list(self.views)
        if self.local or (self.replicate and self._replicated):
            out = {}
            for n in names:
                full = self.full(n) if self.local else unpack_bits(*self._replicated[n])
                out[n] = [int(full[s: s + ln].sum()) for s, ln in self.ranges(n)]
            self._counts = out
            return out
        bits = self._bits()
        mine = torch.tensor([int(unpack_bits(bits[n], self.views[n].mask_len).sum()) for n in names],
                            dtype=torch.int64, device=self.device)
        gathered = [g.tolist() for g in D.all_gather_equal(mine, self.group)]
        if self.world > 1:
            self.layout_bytes += mine.numel() * 8
        self._counts = {n: [g[k] for g in gathered] for k, n in enumerate(names)}
        return self._counts

    # -- full masks --------------------------------------------------------------------------------------------
    def full(self, name: str) -> torch.Tensor:
        """The whole flat bool mask of ``name`` on this source's device (sharded: a collective)."""
        v = self.views[name]
        if self.local:
            return unpack_bits(self._bits()[name], v.numel).to(self.device)
        if self.replicate:
            if name not in self._replicated:
                raise RuntimeError(f"{KEY}: the replicated masks were not gathered before {name!r} was asked "
                                   f"for (call refresh() first)")
            return unpack_bits(*self._replicated[name]).to(self.device)
        if self._last is not None and self._last[0] == name:
            return self._last[1]
        self._last = None  # the previous tensor's mask is released before the next one is built
        ranges = self.ranges(name)
        me = D.rank(self.group)
        own = self._bits()[name].to(self.device)
        if self.gathers(name):
            width = max(packed_nbytes(ln) for _, ln in ranges)
            mine = torch.zeros(width, dtype=torch.uint8, device=self.device)
            mine[: own.numel()] = own
            parts = D.all_gather_equal(mine, self.group)
            handed, received, in_flight = width, width * (self.world - 1), width * self.world
        else:  # the owners broadcast their parts (see the module docstring)
            parts = []
            for r, (_, length) in enumerate(ranges):
                bits = own if r == me else torch.empty(packed_nbytes(length), dtype=torch.uint8, device=self.device)
                parts.append(D.broadcast_from(bits, r, self.group) if length else bits)
            handed = own.numel() if ranges[me][1] else 0
            received = sum(packed_nbytes(ln) for r, (_, ln) in enumerate(ranges) if r != me)
            in_flight = sum(packed_nbytes(ln) for _, ln in ranges)
        if self.world > 1:
            self.bits_bytes += handed
            self.received_bytes += received
            self.max_in_flight = max(self.max_in_flight, in_flight)
        full = torch.zeros(v.numel, dtype=torch.bool, device=self.device)
        for (start, length), bits in zip(ranges, parts):
            if length:
                full[start: start + length] = unpack_bits(bits[: packed_nbytes(length)], length)
        del parts  # the moved bits: only the bool mask of this one tensor stays, until the next is asked for
        self._last = (name, full)
        return full

    def gathers(self, name: str) -> bool:
        """Whether ``name``'s bits move by one all-gather (every rank holds a part) or by its owners' broadcasts."""
        return all(length for _, length in self.ranges(name))

    def handed_bytes(self, name: str, rank: int) -> int:
        """What rank ``rank`` hands to build ``name``'s full mask once (the formula the tests check)."""
        ranges = self.ranges(name)
        if self.gathers(name):
            return max(packed_nbytes(ln) for _, ln in ranges)
        return packed_nbytes(ranges[rank][1])

    def get(self, name, default=None):
        """``full(name)`` for a sparsified parameter, ``default`` otherwise (a mask dict's interface, which
        gradient compression reads)."""
        return self.full(name) if name in self.views else default

    def release(self) -> None:
        """Drop the last handed-out mask (sharded mode holds nothing else between uses)."""
        self._last = None

    # -- accounting --------------------------------------------------------------------------------------------
    def held_bytes(self) -> int:
        """Bytes kept between steps beyond the sparsifier's own bits: the replicated full masks (replicated
        mode), 0 when sharded (and at stage 0, where the sparsifier's masks are the full ones)."""
        if self.local:
            return 0
        return sum(bits.numel() for bits, _ in self._replicated.values())

    def sync_bytes(self) -> int:
        """Every byte handed to the masks' collectives so far (bits and layout)."""
        return self.bits_bytes + self.layout_bytes
