"""The compressor interface: which coordinates of one tensor a rank sends this step.

A compressor only *selects*. It sees the flat fp32 tensor a rank wants to send (its gradient plus error-feedback
residual, see :mod:`dist_sparse.compression.feedback`), a boolean ``eligible`` mask (the coordinates the weight
mask keeps; ``None`` = all) and the density to aim for, and returns sorted int64 indices into the tensor, all of
them eligible. Everything else (residuals, momentum, warm-up, the collective, byte accounting) is shared, so a new
compressor is one ``select`` method registered with :func:`register`.
"""

import math

import torch

COMPRESSORS: dict = {}


def register(cls):
    """Register a :class:`Compressor` subclass under its ``name`` (used by ``compression.method``)."""
    if not (isinstance(cls, type) and issubclass(cls, Compressor)):
        raise TypeError("register() expects a Compressor subclass")
    if cls.name in COMPRESSORS or cls.name == "none":
        raise ValueError(f"a compressor named {cls.name!r} is already registered")
    COMPRESSORS[cls.name] = cls
    return cls


def wire_count(n_eligible: int, n_candidates: int, density: float) -> int:
    """k for a rank that delivers its own partition locally: ``keep_count(n_eligible, density)`` (the density is a
    fraction of the tensor's unpruned coordinates, as everywhere), at most the ``n_candidates`` coordinates that
    lie outside that partition. Every rank computes every rank's count with it, so counts need no exchange."""
    return min(int(n_candidates), keep_count(n_eligible, density))


def keep_count(n_eligible: int, density: float) -> int:
    """k for a tensor with ``n_eligible`` sendable coordinates: ceil(density * n), at least 1 when n > 0.

    ceil (not round) so that a small tensor still sends its largest coordinate; the overhead is below one
    coordinate per tensor."""
    if n_eligible <= 0:
        return 0
    return min(n_eligible, max(1, math.ceil(density * n_eligible - 1e-9)))


class Compressor:
    """Base class; ``seed`` makes randomized selections reproducible (and resumable) per (step, tensor, rank)."""

    name = "base"
    fixed_count = True  # True: k depends only on (eligible count, density), so it is equal on every rank

    def __init__(self, seed: int = 0):
        self.seed = seed

    def select(self, values: torch.Tensor, eligible: torch.Tensor | None, density: float, *, step: int,
               stream: int, k: int | None = None) -> torch.Tensor:
        """Sorted int64 indices of the coordinates of ``values`` (flat) to send. ``stream`` identifies the tensor
        and rank for randomized methods. Default: the k = ceil(density * eligible) largest :meth:`scores`; a
        given ``k`` (at most the eligible count) overrides the count, for compressors with ``fixed_count``."""
        if k is None:
            k = keep_count(self._n_eligible(values, eligible), density)
        if k == 0:
            return torch.zeros(0, dtype=torch.int64, device=values.device)
        if k == values.numel():
            return torch.arange(k, device=values.device)
        scores = self._masked(self.scores(values, step=step, stream=stream), eligible)
        # ineligible coordinates score -1 and k <= number eligible, so they are never among the k largest
        return torch.sort(torch.topk(scores, k, sorted=False).indices).values

    def scores(self, values: torch.Tensor, *, step: int, stream: int) -> torch.Tensor:
        """Non-negative scores; the default selection sends the largest."""
        raise NotImplementedError(f"compressor {self.name!r} defines neither scores() nor select()")

    @staticmethod
    def _masked(scores: torch.Tensor, eligible: torch.Tensor | None) -> torch.Tensor:
        """Ineligible coordinates at -1 (below every non-negative score), so they are never chosen."""
        return scores if eligible is None else scores.masked_fill(~eligible, -1.0)

    @staticmethod
    def _n_eligible(values: torch.Tensor, eligible: torch.Tensor | None) -> int:
        return values.numel() if eligible is None else int(eligible.sum())
