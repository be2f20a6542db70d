"""The sparsifier: owns this rank's masks and applies a method's decisions to sharded training state.

It is model- and framework-agnostic: it talks to parameters through *views* (see
:mod:`dist_sparse.integration.deepspeed`), one per sparsified parameter, each describing which contiguous range of
the flattened parameter this rank holds (``mask_start``/``mask_len``: its ZeRO partition; the whole tensor at
stage 0) and which part it scores for mask updates (``score_start``/``score_len``: equal to the mask range when the
state is partitioned; an even split at stage 0, where the new bits are then exchanged so every rank holds the same
full masks). Masks are stored bit-packed.

One optimizer step, as seen from here (the integration calls these hooks):
1. ``before_step(step)``: on a mask-update step, score this rank's slices (|w|, |dense grad| or random), select
   globally (exact top-k across ranks), store the new masks, zero dropped weights, start regrown weights at 0 with
   zeroed optimizer moments. Then zero the gradients of pruned positions, so they neither count in gradient
   clipping nor reach the optimizer.
2. the optimizer step (skipped on update steps of methods whose update replaces the step, like RigL).
3. ``after_optimizer_step()``: multiply the master weights by the mask, so pruned weights are exactly 0 whatever
   the optimizer did (Adam momentum cannot revive them). DeepSpeed then copies master weights to the model.
"""

import torch

from dist_sparse import distributed as D
from dist_sparse.masks.packing import pack_bits, unpack_bits
from dist_sparse.masks.select import DistributedSelector
from dist_sparse.methods.base import LayerSlice


class Sparsifier:
    def __init__(self, method, views: list, group=None):
        self.method = method
        self.views = sorted(views, key=lambda v: v.name)
        self.group = group
        self.order = {v.name: i for i, v in enumerate(self.views)}
        self.packed = {v.name: pack_bits(torch.ones(v.mask_len, dtype=torch.bool)) for v in self.views}
        self.selector = DistributedSelector(group)
        self.skip_optimizer_step = False
        self.grad_sums: dict = {}  # name -> sum of dense gradients (score range) over the growth window
        self.grad_sum_steps = 0
        self.last_update: dict | None = None  # churn etc. of the latest mask update
        self.updates_done = 0
        # compact state (issue 7): called with the old masks after an update; it repacks master weights and
        # moments (replacing the per-view zeroing below, which assumes dense storage)
        self.repack = None

    # -- mask storage ------------------------------------------------------------------------------------------
    def mask(self, name: str) -> torch.Tensor:
        v = self.views[self.order[name]]
        return unpack_bits(self.packed[name], v.mask_len)

    def set_mask(self, name: str, mask: torch.Tensor) -> None:
        self.packed[name] = pack_bits(mask.reshape(-1).to("cpu"))

    def mask_bytes(self) -> int:
        return sum(p.numel() for p in self.packed.values())

    def _slices(self, with_weight: bool, with_grad: bool) -> list:
        out = []
        for v in self.views:
            lo = v.score_start - v.mask_start
            sl = slice(lo, lo + v.score_len)
            w = v.master()[sl].detach().float() if with_weight else None
            g = None
            if with_grad and v.name in self.grad_sums:
                g = self.grad_sums[v.name] / self.grad_sum_steps
            elif with_grad:
                grad = v.grad()
                g = grad[sl].detach().float() if grad is not None else None
            m = self.mask(v.name)[sl].to(w.device if w is not None else "cpu")
            out.append(LayerSlice(v.name, self.order[v.name], tuple(v.shape), v.numel, v.score_start, m, w, g))
        return out

    def _store_scored(self, new_slices: list) -> None:
        """Store new masks computed on the score ranges; at stage 0 exchange slices so all ranks hold full masks."""
        for v, new in zip(self.views, new_slices):
            new = new.to("cpu")
            if not v.replicated:
                self.set_mask(v.name, new)
            else:
                parts = D.all_gather_varlen(new.to(torch.uint8), self.group)
                self.set_mask(v.name, torch.cat(parts).bool())

    # -- lifecycle ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, init_masks: dict | None = None) -> None:
        """Draw the initial masks (or take ``init_masks``: name -> full bool tensor) and zero pruned weights."""
        if init_masks is not None:
            missing = sorted(set(self.order) - set(init_masks))
            if missing:
                raise KeyError(f"init_masks has no mask for sparsified parameter {missing[0]!r}")
            for v in self.views:
                full = init_masks[v.name].reshape(-1).bool()
                if full.numel() != v.numel:
                    raise ValueError(f"init mask for {v.name!r} has {full.numel()} elements, parameter has {v.numel}")
                self.set_mask(v.name, full[v.mask_start: v.mask_start + v.mask_len])
        elif self.method is not None:
            self._store_scored(self.method.initial_masks(self._slices(False, False), self.selector))
        for v in self.views:
            m = self.mask(v.name).to(v.master().device)
            v.mul_master_(m)
            v.zero_model_(m, self.full_mask(v.name) if v.model_needs_full_mask else None)

    @torch.no_grad()
    def before_step(self, step: int) -> None:
        """Between backward and the optimizer step; ``step`` = number of optimizer steps completed so far."""
        self.skip_optimizer_step = False
        if self.method is not None and self.uses_dense_grad(step) and getattr(self.method, "grow_grad_steps", 1) > 1:
            self._accumulate_grads()
        if self.method is not None and self.method.is_update_step(step):
            self._update(step)
            self.grad_sums, self.grad_sum_steps = {}, 0
            self.skip_optimizer_step = self.method.replaces_optimizer_step
        for v in self.views:
            if v.grad() is not None:
                v.mul_grad_(self.mask(v.name))

    def uses_dense_grad(self, step: int) -> bool:
        """Whether the gradient of *pruned* positions is used at ``step``: on mask-update steps of methods that
        grow by gradient (RigL), and on the ``grow_grad_steps - 1`` steps before them when the growth score is the
        mean gradient of a window. On every other step only active coordinates' gradients matter."""
        if self.method is None or not self.method.needs_dense_grad:
            return False
        k = getattr(self.method, "grow_grad_steps", 1)
        return any(self.method.is_update_step(step + j) for j in range(k))

    def _accumulate_grads(self) -> None:
        for v in self.views:
            grad = v.grad()
            if grad is None:
                continue
            lo = v.score_start - v.mask_start
            g = grad[lo: lo + v.score_len].detach().float()
            if v.name in self.grad_sums:
                self.grad_sums[v.name].add_(g)
            else:
                self.grad_sums[v.name] = g.clone()
        self.grad_sum_steps += 1

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.repack is not None:  # compact state: only active positions are stored, nothing to zero
            return
        for v in self.views:
            v.mul_master_(self.mask(v.name).to(v.master().device))

    @torch.no_grad()
    def _update(self, step: int) -> None:
        old = {v.name: self.mask(v.name) for v in self.views}
        slices = self._slices(True, self.method.needs_dense_grad)
        self._store_scored(self.method.update(step, slices, self.selector))
        grown = torch.zeros(len(self.views), dtype=torch.int64)
        pruned = torch.zeros(len(self.views), dtype=torch.int64)
        for i, v in enumerate(self.views):
            new = self.mask(v.name)
            born, died = new & ~old[v.name], old[v.name] & ~new
            # regrown weights start at 0 with zero moments; dropped ones are zeroed (and their moments cleared)
            if self.repack is None:
                changed = (born | died).to(v.master().device)
                v.mul_master_(~changed)
                v.zero_state_(changed)
            lo = v.score_start - v.mask_start  # count on score ranges only: they partition the tensor across ranks
            grown[i] = int(born[lo: lo + v.score_len].sum())
            pruned[i] = int(died[lo: lo + v.score_len].sum())
        if self.repack is not None:
            self.repack(old)
        D.all_reduce_sum(grown, self.group)
        D.all_reduce_sum(pruned, self.group)
        active = self.active_counts()
        self.updates_done += 1
        self.last_update = {
            "step": step,
            "grown": int(grown.sum()),
            "pruned": int(pruned.sum()),
            "churn": float(grown.sum()) / max(1, sum(active.values())),
            "layer_churn": {v.name: int(grown[i]) / max(1, active[v.name]) for i, v in enumerate(self.views)},
        }

    # -- statistics and gathering ------------------------------------------------------------------------------
    def active_counts(self) -> dict:
        """Global number of active weights per sparsified parameter."""
        t = torch.tensor([int(self.mask(v.name)[v.score_start - v.mask_start:][: v.score_len].sum())
                          for v in self.views], dtype=torch.int64)
        D.all_reduce_sum(t, self.group)
        return {v.name: int(t[i]) for i, v in enumerate(self.views)}

    def layer_density(self) -> dict:
        active = self.active_counts()
        return {v.name: active[v.name] / v.numel for v in self.views}

    def achieved_sparsity(self) -> float:
        total = sum(v.numel for v in self.views)
        return 1.0 - sum(self.active_counts().values()) / total if total else 0.0

    def gather(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """Assemble a tensor held per mask range (mask bits, weights, ...) into the full parameter shape.

        A collective: every rank must call it. At stage 0 the local tensor is already whole.
        """
        v = self.views[self.order[name]]
        local = local.reshape(-1)
        if v.replicated:
            return local.reshape(v.shape)
        ranges = D.all_gather_varlen(torch.tensor([v.mask_start, v.mask_len], dtype=torch.int64), self.group)
        as_bytes = local.to(torch.uint8) if local.dtype == torch.bool else local
        parts = D.all_gather_varlen(as_bytes.contiguous(), self.group)
        full = torch.zeros(v.numel, dtype=as_bytes.dtype, device=local.device)
        for (start, length), part in zip((r.tolist() for r in ranges), parts):
            full[start: start + length] = part
        return (full.bool() if local.dtype == torch.bool else full).reshape(v.shape)

    def full_mask(self, name: str) -> torch.Tensor:
        """The whole mask of one parameter (a collective)."""
        return self.gather(name, self.mask(name))

    def full_masks(self) -> dict:
        return {v.name: self.full_mask(v.name) for v in self.views}

    def state_dict(self) -> dict:
        # grad_sums themselves are per-rank tensors: the checkpoint saves them beside the masks
        return {"updates_done": self.updates_done, "last_update": self.last_update,
                "grad_sum_steps": self.grad_sum_steps}

    def load_state_dict(self, state: dict) -> None:
        self.updates_done = int(state["updates_done"])
        self.last_update = state["last_update"]
        self.grad_sum_steps = int(state.get("grad_sum_steps", 0))

    def sparsified_numel(self) -> int:
        return sum(v.numel for v in self.views)
