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
               stream: int) -> torch.Tensor:
        """Sorted int64 indices of the coordinates of ``values`` (flat) to send. ``stream`` identifies the tensor
        and rank for randomized methods."""
        raise NotImplementedError

    @staticmethod
    def _scores(values: torch.Tensor, eligible: torch.Tensor | None) -> torch.Tensor:
        """|values| with ineligible coordinates at -1 (below every magnitude), so they are never chosen."""
        scores = values.abs()
        if eligible is not None:
            scores = scores.masked_fill(~eligible, -1.0)
        return scores

    @staticmethod
    def _n_eligible(values: torch.Tensor, eligible: torch.Tensor | None) -> int:
        return values.numel() if eligible is None else int(eligible.sum())
