"""Layer-wise sparsity targets from parameter shapes (separate from methods, injected by config).

- ``uniform``: every layer gets the target sparsity.
- ``erk``: Erdős–Rényi-Kernel (Evci et al. 2020, after Mocanu et al. 2018): density of a layer proportional to
  ``sum(shape) / prod(shape)`` (raised to ``power_scale``), scaled so the total number of kept weights matches the
  target; layers that would exceed density 1 are made dense and the scale is solved again for the rest.
- ``global``: one threshold across all layers; per-layer densities are not fixed (the selection groups all layers
  together), so this returns the uniform density as the *overall* target.

A distribution is a function ``(shapes, sparsity, power_scale) -> {name: density}`` registered by name
(:func:`register`); the config validates ``sparsity.distribution`` against :data:`DISTRIBUTIONS`.
"""

import math


def uniform(shapes: dict, sparsity: float, power_scale: float = 1.0) -> dict:
    return {name: 1.0 - sparsity for name in shapes}


def erk(shapes: dict, sparsity: float, power_scale: float = 1.0) -> dict:
    density = 1.0 - sparsity
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: (sum(s) / math.prod(s)) ** power_scale for n, s in shapes.items()}
    total_keep = density * sum(numel.values())
    dense: set = set()
    while True:
        # solve eps * sum(raw_l * n_l) over sparse layers == total_keep - kept by dense layers
        budget = total_keep - sum(numel[n] for n in dense)
        weight = sum(raw[n] * numel[n] for n in shapes if n not in dense)
        eps = budget / weight if weight > 0 else 0.0
        over = [n for n in shapes if n not in dense and eps * raw[n] > 1.0]
        if not over:
            break
        dense.update(over)
    return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}


DISTRIBUTIONS: dict = {"uniform": uniform, "erk": erk, "global": uniform}


def register(name: str, fn) -> None:
    """Register a per-layer density function under ``name`` (usable as ``sparsity.distribution``)."""
    if not callable(fn):
        raise TypeError("register() expects a function (shapes, sparsity, power_scale) -> {name: density}")
    if DISTRIBUTIONS.get(name, fn) is not fn:
        raise ValueError(f"a distribution named {name!r} is already registered")
    DISTRIBUTIONS[name] = fn


def layer_densities(shapes: dict, sparsity: float, kind: str, power_scale: float = 1.0) -> dict:
    """Density (fraction kept) per layer name, for layer ``shapes`` (name -> tuple)."""
    if kind not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {kind!r}; choose one of {tuple(DISTRIBUTIONS)}")
    return DISTRIBUTIONS[kind](shapes, sparsity, power_scale)


def keep_counts(numels: dict, densities: dict) -> dict:
    """Integer number of kept weights per layer: round(n * density), at least 1 for a sparsified layer."""
    return {n: max(1, min(numels[n], int(round(numels[n] * densities[n])))) for n in numels}
