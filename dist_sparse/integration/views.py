"""Parameter views: for each trainable parameter, what this rank holds of it under DeepSpeed, behind one interface.

How each ZeRO stage lays out what a rank holds of a parameter (and so which part of the mask it stores):

- stage 0: nothing is partitioned. The model parameter is also the master weight (fp32), or DeepSpeed's
  fp16/bf16 wrapper keeps a full fp32 copy. Masks are replicated; each rank *scores* an even slice for mask updates
  and the new bits are exchanged (:class:`ReplicatedView`).
- stages 1 and 2: each rank owns a contiguous fragment of the flattened fp32 master copy of some parameters,
  described by ``param._hp_mapping`` (``deepspeed/utils/tensor_fragment.py``): ``lp_fragment_address`` is the
  range of the parameter, ``hp_fragment`` a view of the master weights, ``get_lp_grad_fragment`` the reduced
  gradient of that range (between backward and step); the Adam moments are the inner optimizer's state of the
  flat partition ``hp_fragment`` views, at the same range (:class:`FragmentView`).
- stage 3: each rank owns ``param.ds_tensor``, the range ``[rank * n, (rank + 1) * n)`` of the flattened
  parameter (the last rank's shard is padded), with fp32 master, gradient and moments reached through
  ``param._z3_optimizer`` (:class:`Stage3View`).

Compact state replaces these with :class:`dist_sparse.integration.compact_zero.CompactView` (same interface,
values packed). The sparsifier, the checkpoint code, accounting and compression use only :class:`ParamView`.
This module reads DeepSpeed's attributes; it does not import deepspeed.
"""

import math
from abc import ABC, abstractmethod

import torch

from dist_sparse import distributed as D

STATE_KEYS = ("exp_avg", "exp_avg_sq", "momentum_buffer")  # optimizer state zeroed with the weights it belongs to
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


class ParamView(ABC):
    """What this rank holds of one parameter. Ranges are of the flattened parameter: ``[mask_start, +mask_len)``
    is what it stores (weights, moments, mask bits), ``[score_start, +score_len)`` what it scores at a mask update
    (equal, except at stage 0 where every rank stores everything and scores an even slice). Tensors returned by
    ``master``, ``grad`` and ``state`` cover the mask range, flattened.

    ``replicated``: every rank holds the whole tensor (stage 0). ``model_needs_full_mask``: ``zero_model_`` needs
    the whole parameter's mask (the model copy is replicated while the mask is sharded). ``model_is_master``: the
    forward runs on the master weights themselves (ZeRO-0 in fp32), so the model cannot be masked apart from them.
    ``store``: the object that owns this view's packed values and must finish a checkpoint load (None: the values
    live in DeepSpeed's own tensors)."""

    model_needs_full_mask = False
    model_is_master = False  # the forward's weights are the master weights themselves (ZeRO-0 fp32)
    replicated = False
    store = None

    def __init__(self, name, param):
        self.name = name
        self.param = param
        self.shape = tuple(getattr(param, "ds_shape", param.shape))
        self.numel = math.prod(self.shape)
        self.mask_start = self.mask_len = self.score_start = self.score_len = 0

    def __repr__(self):
        return (f"{type(self).__name__}({self.name}, mask=[{self.mask_start}, +{self.mask_len}), "
                f"score=[{self.score_start}, +{self.score_len}))")

    @abstractmethod
    def master(self) -> torch.Tensor:
        """The fp32 master weights of the mask range (writable, except for packed views)."""

    @abstractmethod
    def grad(self) -> torch.Tensor | None:
        """The reduced gradient of the mask range, between backward and the optimizer step (None outside)."""

    @abstractmethod
    def state(self, key: str) -> torch.Tensor | None:
        """Optimizer state ``key`` (``exp_avg``, ...) of the mask range (None when the optimizer has none)."""

    @abstractmethod
    def mul_grad_(self, mask) -> None:
        """Zero the gradient where ``mask`` is False."""

    def set_grad_(self, values) -> None:
        """Replace the reduced gradient of the mask range with ``values`` (a gradient exchange's result)."""
        g = self.grad()
        g.copy_(values.reshape(-1).to(g.dtype))

    @abstractmethod
    def add_grad_(self, delta) -> None:
        """Add ``delta`` (over the mask range) to the reduced gradient (a method's gradient term)."""

    @abstractmethod
    def mul_master_(self, mask) -> None:
        """Zero the master weights where ``mask`` is False."""

    @abstractmethod
    def zero_state_(self, positions) -> None:
        """Zero the optimizer moments at ``positions`` (bool over the mask range)."""

    @abstractmethod
    def zero_model_(self, mask, full_mask=None) -> None:
        """Zero the model's (low-precision) weights where ``mask`` is False (``full_mask``: the whole parameter's
        mask, for views with ``model_needs_full_mask``)."""

    @abstractmethod
    def model(self) -> torch.Tensor | None:
        """The model's weights as the forward sees them, flattened (None where they are partitioned)."""

    @abstractmethod
    def load(self, master: torch.Tensor, states: dict) -> None:
        """Checkpoint load: take the mask range's fp32 master values and optimizer states (the sparsifier already
        holds the loaded mask)."""


def _copy_into(view: ParamView, master: torch.Tensor, states: dict) -> None:
    """Checkpoint load for views whose ``master()`` and ``state()`` are writable views of DeepSpeed's tensors."""
    view.master().copy_(master.to(view.master().dtype))
    for key, value in states.items():
        target = view.state(key)
        if target is None:
            raise KeyError(key)
        target.copy_(value.to(target.dtype))


class ReplicatedView(ParamView):
    """ZeRO stage 0: full tensors on every rank."""

    replicated = True

    def __init__(self, name, param, master, inner_optimizer, rank, world):
        super().__init__(name, param)
        self.master_param = master
        self.model_is_master = param is master
        self.inner = inner_optimizer
        self.mask_start, self.mask_len = 0, self.numel
        chunk = math.ceil(self.numel / world)
        self.score_start = min(self.numel, rank * chunk)
        self.score_len = max(0, min(self.numel, (rank + 1) * chunk) - self.score_start)

    def master(self):
        return self.master_param.data.view(-1)

    def grad(self):
        g = self.param.grad
        return None if g is None else g.view(-1)

    def mul_grad_(self, mask):
        self.param.grad.view(-1).masked_fill_(~mask.to(self.param.grad.device), 0)

    def add_grad_(self, delta):
        g = self.param.grad.view(-1)
        g.add_(delta.reshape(-1).to(g.device, g.dtype))

    def mul_master_(self, mask):
        self.master().masked_fill_(~mask, 0)

    def zero_state_(self, positions):
        for key, value in self.inner.state.get(self.master_param, {}).items():
            if key in STATE_KEYS and torch.is_tensor(value) and value.numel() == self.numel:
                value.view(-1).masked_fill_(positions, 0)

    def zero_model_(self, mask, full_mask=None):
        if self.param is not self.master_param:
            self.param.data.view(-1).masked_fill_(~mask.to(self.param.device), 0)

    def state(self, key):
        value = self.inner.state.get(self.master_param, {}).get(key)
        return value.view(-1) if torch.is_tensor(value) and value.numel() == self.numel else None

    def model(self):
        return self.param.data.view(-1)

    def load(self, master, states):
        _copy_into(self, master, states)


class FragmentView(ParamView):
    """ZeRO stages 1/2 (and DeepSpeed's bf16 optimizer): this rank's fragment of the fp32 master partition."""

    model_needs_full_mask = True

    def __init__(self, name, param, inner_optimizer):
        super().__init__(name, param)
        self.inner = inner_optimizer
        self.hm = getattr(param, "_hp_mapping", None)
        if self.hm is None:  # this rank owns nothing of this parameter
            self.mask_start, self.mask_len = 0, 0
            self._empty = torch.zeros(0, dtype=torch.float32, device=param.device)
        else:
            self.mask_start = self.hm.lp_fragment_address.start
            self.mask_len = self.hm.lp_fragment_address.numel
        self.score_start, self.score_len = self.mask_start, self.mask_len

    def master(self):
        return self._empty if self.hm is None else self.hm.hp_fragment.view(-1)

    def grad(self):
        if self.hm is None:
            return self._empty
        try:
            g = self.hm.get_lp_grad_fragment(self.param._index_in_param_group)
        except ValueError:  # outside the backward..step window
            return None
        g = g.view(-1)
        if g.numel() == self.numel and self.mask_len != self.numel:  # bf16 optimizer keeps the full buffer
            g = g.narrow(0, self.mask_start, self.mask_len)
        return g

    def mul_grad_(self, mask):
        g = self.grad()
        if g is not None:
            g.masked_fill_(~mask.to(g.device), 0)

    def add_grad_(self, delta):
        g = self.grad()
        if g is not None:
            g.add_(delta.reshape(-1).to(g.device, g.dtype))

    def mul_master_(self, mask):
        if self.hm is not None:
            self.master().masked_fill_(~mask, 0)

    def zero_state_(self, positions):
        # the optimizer's own state of the flat partition, not DeepSpeed's ``hm.optim_fragment``: DeepSpeed links
        # that once, after its first ``_optimizer_step``; when that step did not run Adam (RigL's update replaced
        # it, or an fp16 overflow / non-finite step came first) it links an empty state and never again, and the
        # moments of regrown weights would silently not be zeroed
        if self.hm is None:
            return
        for key in STATE_KEYS:
            value = self.state(key)
            if value is not None:
                value.masked_fill_(positions.to(value.device), 0)

    def zero_model_(self, mask, full_mask=None):
        self.param.data.view(-1).masked_fill_(~full_mask.reshape(-1).to(self.param.device), 0)

    def state(self, key):
        if self.hm is None:
            return self._empty
        flat = self.hm.hp_fragment._base  # the flat fp32 partition the optimizer steps (hp_fragment narrows it)
        value = self.inner.state.get(flat, {}).get(key) if flat is not None else None
        if not torch.is_tensor(value) or value.shape != flat.shape:
            return None
        return value.narrow(0, self.hm.hp_fragment_address.start, self.mask_len)

    def model(self):
        return self.param.data.view(-1)

    def load(self, master, states):
        _copy_into(self, master, states)


class Stage3View(ParamView):
    """ZeRO stage 3: this rank's shard ``param.ds_tensor``; master/grad/moments through ``param._z3_optimizer``."""

    def __init__(self, name, param, rank):
        super().__init__(name, param)
        self.opt = param._z3_optimizer
        per_rank = param.ds_tensor.ds_numel
        self.mask_start = min(self.numel, rank * per_rank)
        self.mask_len = max(0, min(per_rank, self.numel - self.mask_start))
        self.score_start, self.score_len = self.mask_start, self.mask_len

    def master(self):
        return self.opt.get_local_fp32_param(self.param).view(-1)[: self.mask_len]

    def grad(self):
        try:
            g = self.opt.get_local_fp32_grad_for_param(self.param)
        except (KeyError, AttributeError, IndexError):
            return None
        return None if g is None else g.view(-1)[: self.mask_len]

    def mul_grad_(self, mask):
        g = self.opt.get_local_fp32_grad_for_param(self.param).view(-1)
        g[: self.mask_len].masked_fill_(~mask.to(g.device), 0)
        self.opt.set_local_grad_for_param(g, self.param)

    def add_grad_(self, delta):
        g = self.opt.get_local_fp32_grad_for_param(self.param).view(-1)
        g[: self.mask_len].add_(delta.reshape(-1).to(g.device, g.dtype))
        self.opt.set_local_grad_for_param(g, self.param)

    def set_grad_(self, values):
        # get_local_fp32_grad_for_param hands out an fp32 copy of a bf16/fp16 shard: write back through the setter
        g = self.opt.get_local_fp32_grad_for_param(self.param).view(-1)
        g[: self.mask_len].copy_(values.reshape(-1).to(g.device, g.dtype))
        self.opt.set_local_grad_for_param(g, self.param)

    def mul_master_(self, mask):
        w = self.opt.get_local_fp32_param(self.param).view(-1)
        w[: self.mask_len].masked_fill_(~mask.to(w.device), 0)
        self.opt.set_local_hp_param(w, self.param)

    def zero_state_(self, positions):
        for key in STATE_KEYS:
            try:
                s = self.opt.get_local_fp32_param(self.param, optim_state_key=key).view(-1)
            except KeyError:
                continue
            s[: self.mask_len].masked_fill_(positions.to(s.device), 0)
            self.opt.set_local_hp_param(s, self.param, optim_state_key=key)

    def zero_model_(self, mask, full_mask=None):
        self.param.ds_tensor.data.view(-1)[: self.mask_len].masked_fill_(~mask.to(self.param.ds_tensor.device), 0)

    def state(self, key):
        try:
            return self.opt.get_local_fp32_param(self.param, optim_state_key=key).view(-1)[: self.mask_len]
        except KeyError:
            return None

    def model(self):
        return None  # partitioned: the shard is refreshed from the master weights (refresh_partitioned_model)

    def load(self, master, states):
        # through the optimizer's own setters: they write DeepSpeed's fp32 partition (and its swapped copies)
        for key, value in states.items():
            if self.state(key) is None:
                raise KeyError(key)
            self.opt.set_local_hp_param(self._pad(value), self.param, optim_state_key=key)
        self.opt.set_local_hp_param(self._pad(master), self.param)

    def _pad(self, values):
        out = torch.zeros(self.param.ds_tensor.numel(), dtype=torch.float32, device=self.param.ds_tensor.device)
        out[: self.mask_len] = values.reshape(-1)[: self.mask_len]
        return out



def inner_optimizer(engine):
    """The torch optimizer that updates the fp32 master weights (DeepSpeed wrappers keep it in ``.optimizer``)."""
    opt = engine.optimizer
    while hasattr(opt, "optimizer") and isinstance(opt.optimizer, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def _stage0_master(engine, param):
    """The fp32 master of ``param`` at stage 0: the param itself, or the fp16/bf16 wrapper's fp32 copy."""
    opt = engine.optimizer
    low, high = getattr(opt, "fp16_groups", None), getattr(opt, "fp32_groups", None)
    if low is not None and high is not None:
        for lg, hg in zip(low, high):
            for lp, hp in zip(lg, hg if isinstance(hg, (list, tuple)) else []):
                if lp is param:
                    return hp
        raise NotImplementedError(
            f"{type(opt).__name__} at ZeRO stage 0 keeps flattened fp32 groups; use ZeRO stage >= 1 with fp16/bf16")
    return param


def build_views(engine, names: list) -> list:
    params = dict(engine.module.named_parameters())
    stage = engine.zero_optimization_stage()
    rank, world = D.rank(), D.world_size()
    views = []
    for name in names:
        p = params[name]
        if stage == 3 or hasattr(p, "ds_id"):
            views.append(Stage3View(name, p, D.rank(getattr(p, "ds_process_group", None))))
        elif hasattr(p, "_hp_mapping"):
            views.append(FragmentView(name, p, inner_optimizer(engine)))
        else:
            views.append(ReplicatedView(name, p, _stage0_master(engine, p), inner_optimizer(engine), rank, world))
    return views


def trainable_names(engine) -> list:
    return sorted(n for n, p in engine.module.named_parameters() if p.requires_grad)

