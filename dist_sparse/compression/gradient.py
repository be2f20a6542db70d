"""One compressed gradient exchange at the accumulation boundary, engine-agnostic (tensors keyed by name).

:class:`GradientCompression` takes this rank's full local gradients, the masks of the sparsified tensors, and the
step number; it compresses every tensor (:class:`~dist_sparse.compression.feedback.ErrorFeedback`), runs one
bucketed exchange (:class:`~dist_sparse.compression.exchange.SparseExchange`) and returns the averaged gradients.
Two kinds of tensors get special treatment on a step:

- ``dense``: exchanged dense over *all* coordinates. Used on RigL's mask-update steps, where growth needs the dense
  averaged gradient of the sparsified tensors (Evci et al. 2020). When the optimizer does not step (RigL's update
  replaces the step: ``dense_applied=False``) the values are the raw gradient and the residual is untouched, so
  nothing accumulated is lost. When it does (the steps of a growth window before the update), pruned coordinates
  carry the raw gradient (what growth reads) and unpruned ones what error feedback accumulated there (gradient or
  momentum, plus residual), delivered in full (:meth:`~dist_sparse.compression.feedback.ErrorFeedback.deliver_all`):
  the raw gradient there would hand Adam's momentum correction a raw gradient as its first moment and drop that
  step from the local moments.
- ``skip``: not exchanged at all (residual untouched). Used for the other tensors on update steps whose update
  replaces the optimizer step (RigL, SET): their gradient would not be applied anyway.

Tensors smaller than ``min_tensor_size`` are sent dense (all unpruned coordinates; their residual stays 0).
"""

import math

import torch

from dist_sparse import distributed as D
from dist_sparse.compression import sketch
from dist_sparse.compression.base import COMPRESSORS, keep_count, wire_count
from dist_sparse.compression.exchange import Outgoing, SparseExchange
from dist_sparse.compression.feedback import ErrorFeedback


@torch.no_grad()
def clip_local_(grads: dict, eligible: dict, max_norm: float, skip=()) -> float:
    """DGC's local gradient clipping (Lin et al. 2018, Sec. 3.3), in place: scale this rank's gradients so that
    their norm over the coordinates that may be sent (``eligible``; pruned ones do not count) is at most
    ``max_norm``, with DeepSpeed's formula (coefficient ``(norm + 1e-6) / max_norm`` when above 1). Returns the norm
    before clipping.

    With momentum correction the gradient is accumulated into a local momentum *before* the exchange, so it has to
    be clipped there; clipping the exchanged momentum instead would clip a different quantity. The caller passes
    ``max_norm = C * sqrt(N)`` for a global threshold ``C`` on the average of N ranks (DGC scales by ``N^-1/2``
    for a sum): N independent local gradients of norm ``C sqrt(N)`` average to a norm of about ``C``."""
    total = 0.0
    for name, g in grads.items():
        if name in skip:
            continue
        mask = eligible.get(name)
        flat = g.reshape(-1).float()
        total += float(flat.square().sum() if mask is None else flat.square().mul_(mask).sum())
    norm = math.sqrt(total)
    coef = (norm + 1e-6) / max_norm
    if coef > 1:
        for name, g in grads.items():
            if name not in skip:
                g.div_(coef)
    return norm


class _Restricted:
    """The coordinates a rank may select from: the weight masks (``eligible``), within this exchange's slice
    (``within``, None: everything). ``get`` returns None where both are unrestricted, as a mask dict does."""

    def __init__(self, eligible, within):
        self.eligible, self.within = eligible, within

    def scope(self, name: str):
        return None if self.within is None else self.within.get(name)

    def get(self, name: str, default=None):
        mask, scope = self.eligible.get(name), self.scope(name)
        if mask is None or scope is None:
            return mask if scope is None else scope
        return mask & scope.to(mask.device)


RESIDUAL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # compression.residual_dtype


class GradientCompression:
    def __init__(self, cfg, seed: int = 0, group=None, momentum: float | None = None, ema: bool = False,
                 local_clip: float = 0.0, precondition_beta2: float | None = None, packed: bool = False):
        self.cfg = cfg
        self.compressor = COMPRESSORS[cfg.method](seed)
        self.feedback = ErrorFeedback(self.compressor, cfg.density, cfg.error_feedback,
                                      momentum if cfg.momentum_correction else None, cfg.warmup_steps, ema,
                                      precondition_beta2, D.world_size(group), packed,
                                      RESIDUAL_DTYPES[cfg.residual_dtype])
        self.exchange = SparseExchange(group)
        self.seed = seed
        self.last_sketch_bytes = 0  # the count sketches' all-reduce in the last exchange
        self.group = group
        self.local_clip = float(local_clip)  # DGC local gradient clipping threshold (0: off)
        self.total_bytes = 0
        self.exchanges = 0
        self.last_sent: dict = {}  # name -> sorted indices this rank sent in the last exchange (for inspection)

    def run(self, grads: dict, eligible: dict, step: int, dense=(), skip=(), owned: dict | None = None,
            within=None, dense_applied: bool = False) -> dict:
        """Averaged gradients for every name in ``grads`` except ``skip`` (same names and order on every rank).

        ``grads``: name -> this rank's full local gradient; ``eligible``: name -> bool mask of kept coordinates
        (absent or None: all coordinates). ``owned`` (ZeRO stages 1/2): name -> every rank's ``(start, length)``
        range of that tensor in its partition. A rank needs the average only over its own range, and its own
        contribution there never crosses the wire, so it is added uncompressed and only the rest is selected
        from (:meth:`ErrorFeedback.compress`); outside its own range the returned average is incomplete.
        ``within``: name -> bool mask of the coordinates this exchange covers (the same on every rank of the
        group; None: all). The inter-node scope (:mod:`dist_sparse.compression.hierarchical`) gives each group its
        slice of every tensor: nothing outside it is selected, sent or kept in a residual, and the result is 0
        there. DGC's local clipping still measures the whole gradient (``eligible``). ``dense_applied``: the
        optimizer applies this step's values of the ``dense`` tensors (the module docstring)."""
        rank = D.rank(self.group)
        dense, skip = set(dense), set(skip)
        if self.local_clip > 0:
            clip_local_(grads, eligible, self.local_clip, skip)
        eligible = _Restricted(eligible, within)
        energies = self._sketched_energies(grads, eligible, step, dense, skip)
        items = []
        rank_counts = None if owned is None else [[] for _ in range(D.world_size(self.group))]
        self.last_sent = {}
        for order, (name, g) in enumerate(grads.items()):
            if name in skip:
                continue
            flat = g.reshape(-1)
            # a dense exchange covers every coordinate of the slice, pruned ones included
            mask = eligible.scope(name) if name in dense else eligible.get(name)
            positions = None if mask is None else torch.nonzero(mask).reshape(-1)
            own, own_start = None, 0
            ranges = None if owned is None else owned[name]
            if name in dense:
                keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device) if mask is None else mask.clone()
                n_covered = int(keep.sum())
                counts = [] if ranges is None else [n_covered - length for _, length in ranges]
                full = (self.feedback.deliver_all(name, flat, eligible.get(name)) if dense_applied
                        else flat.float())
                if ranges is not None and ranges[rank][1]:  # the own range is added locally, not sent
                    own_start, length = ranges[rank]
                    own = full[own_start: own_start + length].clone()
                    keep[own_start: own_start + length] = False
                idx = torch.nonzero(keep).reshape(-1)
                values = full[idx]
            else:
                d = 1.0 if flat.numel() < self.cfg.min_tensor_size else self.feedback.density(step)
                local = None if ranges is None else ranges[rank]
                idx, values, own = self.feedback.compress(name, flat, mask, step, order * 4099 + rank, density=d,
                                                          local=local, energy=energies.get(name))
                own_start = 0 if local is None else local[0]
                counts = [] if ranges is None else self._counts(mask, flat.numel(), d, ranges)
            if rank_counts is not None:
                for r, c in enumerate(counts):
                    rank_counts[r].append(c)
            self.last_sent[name] = idx
            items.append(Outgoing(name, flat.numel(), positions, idx, values, own_start, own, ranges))
        # threshold selection makes counts differ across ranks (a count header is exchanged first); top-k and
        # random-k counts follow from the shared masks, the density and the partition ranges, so every rank knows
        # them already
        fixed = self.compressor.fixed_count
        out = self.exchange.run(items, fixed_counts=fixed, rank_counts=rank_counts if fixed else None)
        self.total_bytes += self.exchange.last_bytes + self.last_sketch_bytes
        self.exchanges += 1
        return out

    def _sketched_energies(self, grads: dict, eligible: dict, step: int, dense: set, skip: set) -> dict:
        """name -> energy of the averaged (unpruned) gradient, from count sketches summed by one all-reduce, for
        the tensors compressed this step; empty unless the Adam second-moment estimate asks for it."""
        self.last_sketch_bytes = 0
        if not self.feedback.wants_energy:
            return {}
        names, parts = [], []
        for order, (name, g) in enumerate(grads.items()):
            if name in skip or name in dense:
                continue
            flat = g.reshape(-1).float()
            mask = eligible.get(name)
            parts.append(sketch.count_sketch(flat if mask is None else flat * mask, self.seed, step, order))
            names.append(name)
        if not parts:
            return {}
        summed = D.all_reduce_sum(torch.cat(parts), self.group)
        self.last_sketch_bytes = summed.numel() * 4
        world, out, offset = D.world_size(self.group), {}, 0
        for name, part in zip(names, parts):
            out[name] = sketch.energy(summed[offset: offset + part.numel()], world)
            offset += part.numel()
        return out

    @staticmethod
    def _counts(mask, numel: int, density: float, ranges: list) -> list:
        """Every rank's number of sent coordinates of one tensor when each keeps its own range local."""
        n_eligible = numel if mask is None else int(mask.sum())
        out = []
        for start, length in ranges:
            if length == 0:
                out.append(keep_count(n_eligible, density))
                continue
            inside = length if mask is None else int(mask[start: start + length].sum())
            out.append(wire_count(n_eligible, n_eligible - inside, density))
        return out

    @property
    def bytes_per_exchange(self) -> float:
        return self.total_bytes / self.exchanges if self.exchanges else 0.0
