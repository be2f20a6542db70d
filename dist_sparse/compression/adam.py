"""Momentum correction for Adam/AdamW: the optimizer's moments are estimated where the gradient is still dense.

Why a compressed stream breaks Adam. With top-k at density ``d`` and error feedback, a coordinate whose gradient is
small is sent about once every ``1/d`` steps, as one spike that carries the ``1/d`` steps it waited for. SGD is
linear, so the spike moves the weight as far as the ``1/d`` dense steps would have. Adam is not: its second moment
``v`` is an average of squared gradients, and a spike of size ``g/d`` every ``1/d`` steps gives ``v ~ g^2/d``, so
the update ``m / sqrt(v)`` summed over the ``1/d`` steps is about ``sqrt(d)`` times the dense one: at 1% density the
small coordinates learn ten times slower, and error feedback (which builds those spikes) makes it worse, not better.

The correction (DGC's momentum correction, Lin et al. 2018, Sec. 3.2, carried over to Adam): every rank still
holds its full *local* gradient before compression, so it estimates the moments there and compresses only what the
update is linear in.

- first moment: as in DGC, each rank accumulates the momentum of its own local gradient before selection
  (``u <- b1 u + (1 - b1) g``, then error feedback on ``u``, without momentum factor masking; see
  :mod:`dist_sparse.compression.feedback`), and the optimizer applies the averaged, already momentum-filtered
  values without a second momentum: ``m_t`` is the received value, bias-corrected by ``1 - b1^t`` like Adam's.
- second moment: each rank estimates the second moment of the *averaged* gradient from its local statistics
  (never below the bound Adam's own moments obey, ``v >= m^2 (1 - b2)(1 - b1^2/b2) / (1 - b1)^2`` for the
  received first moment ``m``: a rank that saw no gradient where others did would otherwise divide by almost 0),
  a blend ``lam v_local + (1 - lam) avg(u^2)`` whose weight is fitted per tensor to the running energy of the
  averaged gradient, measured by count sketches for 64 bytes per tensor and step
  (:meth:`~dist_sparse.compression.feedback.ErrorFeedback.second_moment_estimate`,
  :mod:`dist_sparse.compression.sketch`); the rank that owns a coordinate (its ZeRO partition) steps with its own
  estimate.

With both moments local, the update ``lr * m / (sqrt(v) + eps)`` is linear in the exchanged values, so the sum of
what error feedback delivers equals the sum of what was computed, as for SGD (Stich et al. 2018).

:class:`LocalMomentAdam` replaces the ``step`` of the inner torch Adam/AdamW (the same state keys ``step``,
``exp_avg``, ``exp_avg_sq``: checkpoints are unchanged) and is engine-agnostic: before each step it is handed,
per master fragment, the second-moment estimate for those coordinates (:meth:`stage`).
"""

import math

import torch

from dist_sparse.errors import ConfigError

KEY = "compression.momentum_correction"


def is_adam(optimizer) -> bool:
    return isinstance(optimizer, torch.optim.Adam)  # torch's AdamW is an Adam subclass


def _decoupled(optimizer, group) -> bool:
    return isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))


class LocalMomentAdam:
    """Adam/AdamW whose moments come from this rank's local (uncompressed) gradient; see the module docstring.

    ``optimizer``: the torch Adam/AdamW that steps the fp32 masters (``param_groups`` and ``state`` are used as they
    are). The gradient the engine puts in ``p.grad`` is the exchanged average of the locally momentum-filtered
    gradients, scaled however the engine scales it (clipping, loss scale); the second moment handed to
    :meth:`stage` is scaled by the square of the same factor."""

    def __init__(self, optimizer):
        if not is_adam(optimizer):
            raise ConfigError(KEY, f"Adam momentum correction needs torch.optim.Adam/AdamW, not "
                                   f"{type(optimizer).__name__}")
        for g in optimizer.param_groups:
            for flag in ("amsgrad", "maximize", "capturable", "differentiable"):
                if g.get(flag):
                    raise ConfigError(KEY, f"Adam momentum correction does not cover {flag}=True")
            if not _decoupled(optimizer, g) and g.get("weight_decay", 0):
                # L2 added to the gradient would have to enter the first moment, which is formed before the exchange
                raise ConfigError(KEY, "Adam momentum correction needs decoupled weight decay (AdamW) or "
                                       "weight_decay 0; coupled L2 decay would enter the first moment before the "
                                       "exchange")
        self.optimizer = optimizer
        self.beta1, self.beta2 = self._one_beta(0), self._one_beta(1)
        self._staged: dict = {}  # id(optimizer param) -> [param, flat second moment, sum of squares written]

    def _one_beta(self, i: int) -> float:
        # the momentum and the selection's second moment live in the exchange, one per tensor, not per group
        b = {float(g["betas"][i]) for g in self.optimizer.param_groups}
        if len(b) != 1:
            raise ConfigError(KEY, f"needs one beta{i + 1} in every param group, found {sorted(b)}")
        return b.pop()

    @staticmethod
    def _owner(fragment: torch.Tensor, params: list):
        """The optimizer param whose storage holds ``fragment`` and the fragment's offset in it."""
        ptr = fragment.untyped_storage().data_ptr()
        for p in params:
            if p.untyped_storage().data_ptr() == ptr:
                return p, fragment.storage_offset() - p.storage_offset()
        raise RuntimeError("a master fragment lies outside every optimizer parameter")

    @torch.no_grad()
    def stage(self, fragments, params: list | None = None) -> None:
        """Before the step: ``fragments`` lists ``(master fragment, second moment, averaged gradient written)``,
        flat tensors of equal length, for every fragment this rank steps; the second moment is the estimate the
        exchange keeps (:meth:`ErrorFeedback.second_moment_estimate`), a running average not yet bias-corrected.
        ``params``: the tensors the optimizer will step, where its param groups do not list them until the step
        (DeepSpeed's ZeRO-3 hands each sub-group's flat master to the optimizer only for its step)."""
        if params is None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._staged = {}
        for master, second, written in fragments:
            if master.numel() == 0:
                continue
            p, offset = self._owner(master, params)
            entry = self._staged.get(id(p))
            if entry is None:
                entry = self._staged[id(p)] = [p, torch.zeros(p.numel(), dtype=torch.float32, device=p.device), 0.0]
            entry[1][offset: offset + master.numel()].copy_(second)
            entry[2] += float(written.float().square().sum())

    def follow(self, old, new, repack) -> None:
        """Optimizer param ``old`` was replaced by ``new`` between :meth:`stage` and :meth:`step` (compact state
        repacks its packed masters at a mask update that does not replace the step, e.g. magnitude pruning):
        its staged second moment moves to the new layout (``repack``: old layout -> new, a flat tensor)."""
        entry = self._staged.pop(id(old), None)
        if entry is not None:
            self._staged[id(new)] = [new, repack(entry[1]), entry[2]]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.optimizer.param_groups:
            beta1, beta2 = (float(b) for b in group["betas"])
            lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
            decoupled = _decoupled(self.optimizer, group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                # popped: DeepSpeed's ZeRO-1/2 calls step() once per param group (a group at a time)
                entry = self._staged.pop(id(p), None)
                if entry is None:
                    raise RuntimeError("LocalMomentAdam.step without stage(): no second moment for a parameter")
                grad = p.grad.reshape(-1).float()
                second = entry[1]
                # the engine scaled the average it received (clipping, loss scale): scale the second moment alike
                written = math.sqrt(entry[2])
                if written > 0:
                    scale = float(grad.norm()) / written
                    if abs(scale - 1.0) > 1e-6:
                        second = second * scale**2
                state = self.optimizer.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                flat = p.view(-1)
                if decoupled:
                    flat.mul_(1 - lr * wd)
                m, v = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
                m.copy_(grad)  # the first moment was accumulated before compression (no second momentum here)
                # Adam's own moments satisfy m^2 <= v (1 - b1)^2 / ((1 - b2)(1 - b1^2 / b2)) (Cauchy-Schwarz on the
                # two exponential averages, b1^2 < b2): its step never exceeds a few lr. The local estimate of v can
                # fall far below that where this rank saw (almost) no gradient but others did (an embedding row of
                # a token only they had), and the step would approach lr * m / eps; the bound, as a floor on v,
                # keeps it where Adam's would be (a floor true Adam never crosses)
                floor = grad.square().mul_(max(0.0, (1 - beta2) * (1 - beta1 ** 2 / beta2)) / (1 - beta1) ** 2)
                v.copy_(torch.maximum(second, floor))  # stored in the optimizer state, for checkpoints
                denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
                flat.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
        return loss
