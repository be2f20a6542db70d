"""One compressed gradient exchange at the accumulation boundary, engine-agnostic (tensors keyed by name).

:class:`GradientCompression` takes this rank's full local gradients, the masks of the sparsified tensors, and the
step number; it compresses every tensor (:class:`~dist_sparse.compression.feedback.ErrorFeedback`), runs one
bucketed exchange (:class:`~dist_sparse.compression.exchange.SparseExchange`) and returns the averaged gradients.
Two kinds of tensors get special treatment on a step:

- ``dense``: exchanged dense over *all* coordinates, the raw gradient, residual untouched. Used on RigL's mask-update
  steps, where growth needs the dense averaged gradient of the sparsified tensors (Evci et al. 2020).
- ``skip``: not exchanged at all (residual untouched). Used for the other tensors on update steps whose update
  replaces the optimizer step (RigL, SET): their gradient would not be applied anyway.

Tensors smaller than ``min_tensor_size`` are sent dense (all unpruned coordinates; their residual stays 0).
"""

import math

import torch

from dist_sparse import distributed as D
from dist_sparse.compression.base import COMPRESSORS
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


class GradientCompression:
    def __init__(self, cfg, seed: int = 0, group=None, momentum: float | None = None, ema: bool = False,
                 local_clip: float = 0.0, precondition_beta2: float | None = None):
        self.cfg = cfg
        self.compressor = COMPRESSORS[cfg.method](seed)
        self.feedback = ErrorFeedback(self.compressor, cfg.density, cfg.error_feedback,
                                      momentum if cfg.momentum_correction else None, cfg.warmup_steps, ema,
                                      precondition_beta2, D.world_size(group))
        self.exchange = SparseExchange(group)
        self.group = group
        self.local_clip = float(local_clip)  # DGC local gradient clipping threshold (0: off)
        self.total_bytes = 0
        self.exchanges = 0
        self.last_sent: dict = {}  # name -> sorted indices this rank sent in the last exchange (for inspection)

    def run(self, grads: dict, eligible: dict, step: int, dense=(), skip=()) -> dict:
        """Averaged gradients for every name in ``grads`` except ``skip`` (same names and order on every rank).

        ``grads``: name -> this rank's full local gradient; ``eligible``: name -> bool mask of kept coordinates
        (absent or None: all coordinates)."""
        rank = D.rank(self.group)
        dense, skip = set(dense), set(skip)
        if self.local_clip > 0:
            clip_local_(grads, eligible, self.local_clip, skip)
        items = []
        self.last_sent = {}
        for order, (name, g) in enumerate(grads.items()):
            if name in skip:
                continue
            flat = g.reshape(-1)
            mask = None if name in dense else eligible.get(name)
            positions = None if mask is None else torch.nonzero(mask).reshape(-1)
            if name in dense:
                idx = torch.arange(flat.numel(), device=flat.device)
                values = flat.float().clone()
            else:
                small = flat.numel() < self.cfg.min_tensor_size
                idx, values = self.feedback.compress(name, flat, mask, step, order * 4099 + rank,
                                                     density=1.0 if small else None)
            self.last_sent[name] = idx
            items.append(Outgoing(name, flat.numel(), positions, idx, values))
        # threshold selection makes counts differ across ranks (a count header is exchanged first); top-k and
        # random-k counts follow from the shared masks and the density, so every rank knows them already
        out = self.exchange.run(items, fixed_counts=self.compressor.fixed_count)
        self.total_bytes += self.exchange.last_bytes
        self.exchanges += 1
        return out

    @property
    def bytes_per_exchange(self) -> float:
        return self.total_bytes / self.exchanges if self.exchanges else 0.0
