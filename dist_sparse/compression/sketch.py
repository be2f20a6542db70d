"""Count sketches of the local gradients: the energy ``||avg_r g_r||^2`` of the averaged gradient for a few bytes.

Adam momentum correction needs Adam's second moment of the *averaged* gradient while only local gradients are at
hand (:mod:`dist_sparse.compression.adam`). Per coordinate that second moment lies between the local one (ranks'
per-step gradients fully correlated) and ``1/N`` of it plus the squared mean (independent noise); measured on
tinyshakespeare the blend differs per tensor and drifts in training (docs/compression.md). One number per tensor
pins it down: the energy of the averaged gradient, which a count sketch (Charikar, Chen & Farach-Colton 2002)
estimates without bias from ``k`` values per tensor: rank ``r`` adds each coordinate ``x_j``, times a random sign
``s_j``, into bucket ``j mod k``; the sketches are linear, so one all-reduce sums them into the sketch of the sum,
and ``E ||S x||^2 = ||x||^2`` (the cross terms of colliding coordinates have random signs and mean zero). With
``k >= n`` no two coordinates collide and the energy is exact.

The signs are drawn per (seed, step, tensor) with the counter-based generator, identical on every rank, fresh
each step so that the error averages out in the running average that uses it.
"""

import torch

from dist_sparse.masks import random as counter_random

BUCKETS = 16  # values per tensor and step (64 bytes in fp32)


def buckets(numel: int) -> int:
    return min(int(numel), BUCKETS)


def signs(numel: int, seed: int, step: int, stream: int, device=None) -> torch.Tensor:
    u = counter_random.uniform(seed, step * 1_000_003 + stream, 0, numel, device=device)
    return torch.where(u < 0.5, -1.0, 1.0)


def count_sketch(flat: torch.Tensor, seed: int, step: int, stream: int) -> torch.Tensor:
    """The ``buckets(n)`` values of the count sketch of ``flat`` (fp32)."""
    n = flat.numel()
    k = buckets(n)
    out = torch.zeros(k, dtype=torch.float32, device=flat.device)
    if n == 0:
        return out
    idx = torch.arange(n, device=flat.device) % k
    return out.index_add_(0, idx, flat.float() * signs(n, seed, step, stream, flat.device))


def energy(sketch_of_sum: torch.Tensor, world: int) -> float:
    """Unbiased estimate of ``||sum / world||^2`` from the sketch of the sum over ranks."""
    return float(sketch_of_sum.square().sum()) / world**2
