"""When masks change and by how much. Each schedule is a small object, injected into a method by config.

- :class:`CubicSparsity`: Zhu & Gupta (2017), "To prune, or not to prune": sparsity ramps from s_i to s_f as
  ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3``, pruning every ``interval`` steps.
- :class:`CosineFraction`: Evci et al. (2020), RigL: the fraction of active weights dropped (and regrown) at step t
  is ``alpha / 2 * (1 + cos(pi * t / t_end))``.
- :class:`ConstantFraction`: a fixed fraction (SET, Mocanu et al. 2018, uses zeta = 0.3).
"""

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class UpdateTimes:
    """Mask updates happen at optimizer steps t (count of completed steps) with t % interval == 0, start <= t < end."""

    interval: int
    start: int
    end: int

    def is_update(self, step: int) -> bool:
        return step > 0 and self.start <= step < self.end and (step - self.start) % self.interval == 0


@dataclass(frozen=True)
class CubicSparsity:
    final: float
    initial: float
    start: int
    end: int

    def __call__(self, step: int) -> float:
        if step <= self.start:
            return self.initial
        if step >= self.end:
            return self.final
        progress = (step - self.start) / (self.end - self.start)
        return self.final + (self.initial - self.final) * (1.0 - progress) ** 3


@dataclass(frozen=True)
class CosineFraction:
    alpha: float
    end: int

    def __call__(self, step: int) -> float:
        if step >= self.end:
            return 0.0
        return self.alpha / 2.0 * (1.0 + math.cos(math.pi * step / self.end))


@dataclass(frozen=True)
class ConstantFraction:
    alpha: float
    end: int

    def __call__(self, step: int) -> float:
        return self.alpha if step < self.end else 0.0


FRACTION_SCHEDULES = {"cosine": CosineFraction, "constant": ConstantFraction}
