"""Freezing: weights that are kept but never trained (the ``freeze`` config section; docs/methods.md).

- ``freeze.fraction`` / ``freeze.select`` (FreezeNet, Wimmer, Mehnert & Condurache 2020): of each sparsified
  layer's unpruned weights, the fraction f with the lowest score (``random``, ``magnitude`` |w|, or ``saliency``
  |g ⊙ w| on the first training batches) keeps its initial value. The sparsifier owns these bits
  (``Sparsifier.freeze_fraction``): their gradients are zeroed before clipping and the optimizer, and their masters
  are written back after every optimizer step, so neither Adam's update nor weight decay moves them, bit for bit.
  Dynamic methods never drop or regrow them (``SparseMethod.select_survivors``). The bits are saved with every
  checkpoint (``::frozen``); their values are the saved masters. With compact state the packed store holds only
  trainable weights (active, not frozen): no master, moments or gradient for a frozen one, whose value stays in
  the model's low-precision weights (``PackedZeroState``).
- ``freeze.modules: [glob, ...]``: every parameter of the matching modules gets ``requires_grad = False`` before
  DeepSpeed is initialised: no weight gradient at all (backward does less work), no optimizer state, and they are
  not sparsified.
- ``freeze.schedule: [{modules: glob, step: N}, ...]`` (progressive freezing in the spirit of FreezeOut, Brock et
  al. 2017): from step N the matching modules' parameters get ``requires_grad = False`` (their backward stops) and
  their masters are written back after every step. Their optimizer state stays allocated (DeepSpeed's flat
  partitions cannot shrink) but never moves. A sparsified parameter there is frozen whole: its mask stops changing.
"""

import fnmatch
import math

import torch
from torch import nn

from dist_sparse.errors import ConfigError
from dist_sparse.step import Component


def module_parameters(model: nn.Module, glob: str, key: str) -> list:
    """Names of the parameters of every module whose name matches ``glob`` (a ConfigError naming ``key`` if none
    matches)."""
    names = []
    for mod_name, module in model.named_modules():
        if mod_name and fnmatch.fnmatchcase(mod_name, glob):
            names += [f"{mod_name}.{n}" for n, _ in module.named_parameters()]
    if not names:
        raise ConfigError(key, f"module pattern {glob!r} matches no module of {type(model).__name__}")
    return sorted(set(names))


def freeze_modules(model: nn.Module, globs) -> list:
    """``freeze.modules``: ``requires_grad = False`` on every parameter of the matching modules (call before
    ``deepspeed.initialize``). Returns the frozen parameter names."""
    params = dict(model.named_parameters())
    frozen = []
    for i, glob in enumerate(globs or ()):
        for name in module_parameters(model, glob, f"freeze.modules[{i}]"):
            params[name].requires_grad_(False)
            frozen.append(name)
    return sorted(set(frozen))


class ProgressiveFreezing(Component):
    """``freeze.schedule``: from step N, the parameters of the matching modules are frozen (no gradient, masters
    written back after every optimizer step). On resume the entries whose step has passed apply at the first
    forward; the loaded masters are then the frozen values."""

    name = "progressive_freezing"

    def __init__(self, model: nn.Module, schedule: list, views: list, sparsifier):
        self.model = model
        self.entries = [(module_parameters(model, e["modules"], f"freeze.schedule[{i}].modules"), int(e["step"]))
                        for i, e in enumerate(schedule)]
        self.views = {v.name: v for v in views}
        self.sparsifier = sparsifier
        self.applied = [False] * len(self.entries)
        self.values: dict = {}  # view name -> its masters at freezing time (this rank's range)

    @torch.no_grad()
    def before_forward(self, plan) -> None:
        params = dict(self.model.named_parameters())
        for i, (names, step) in enumerate(self.entries):
            if self.applied[i] or plan.step < step:
                continue
            self.applied[i] = True
            for name in names:
                params[name].requires_grad_(False)  # backward computes no weight gradient for it any more
                v = self.views.get(name)
                if v is None or name in self.values:
                    continue
                if name in self.sparsifier.order:  # its mask stops changing: every position frozen
                    self.sparsifier.set_frozen(name, torch.ones(v.mask_len, dtype=torch.bool))
                else:
                    self.values[name] = v.master().detach().clone()

    @torch.no_grad()
    def before_step(self, plan) -> None:
        for name in self.values:
            v = self.views[name]
            if v.grad() is not None:
                v.mul_grad_(torch.zeros(v.mask_len, dtype=torch.bool))

    @torch.no_grad()
    def after_optimizer_step(self, plan) -> None:
        for name, value in self.values.items():
            self.views[name].master().copy_(value)

    def bytes_held(self) -> dict:
        """The masters of reached entries' parameters that are not sparsified, kept to write them back (the
        sparsified ones are frozen through the sparsifier, which reports its copy)."""
        return {"master_weights": list(self.values.values())}

    def frozen_names(self) -> list:
        return sorted(n for names, _ in (e for e, a in zip(self.entries, self.applied) if a) for n in names)


def freeze_counts(engine, model: nn.Module) -> dict:
    """``summary.json``'s ``trainable_parameters`` (weights the optimizer updates: not pruned, not frozen) and
    ``frozen_parameters`` (unpruned weights kept at their value: frozen modules, scheduled ones that were reached,
    ``freeze.fraction``'s). A collective."""
    params = dict(model.named_parameters())  # tied weights once
    numel = {n: math.prod(getattr(p, "ds_shape", p.shape)) for n, p in params.items()}
    no_grad = {n for n, p in params.items() if not p.requires_grad}
    sp = engine.sparsifier
    active = sp.active_counts() if sp.views else {}
    pruned = {v.name: v.numel - active[v.name] for v in sp.views}
    frozen = sum(numel[n] - pruned.get(n, 0) for n in no_grad) + sp.frozen_count(exclude=no_grad)
    return {"trainable_parameters": sum(numel.values()) - frozen - sum(pruned.values()), "frozen_parameters": frozen}
