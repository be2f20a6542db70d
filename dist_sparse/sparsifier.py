"""The sparsifier: owns this rank's masks and applies a method's decisions to sharded training state.

It is model- and framework-agnostic: it talks to parameters through *views* (:class:`ParamView` in
:mod:`dist_sparse.integration.views`), one per sparsified parameter, each describing which contiguous range of
the flattened parameter this rank holds (``mask_start``/``mask_len``: its ZeRO partition; the whole tensor at
stage 0) and which part it scores for mask updates (``score_start``/``score_len``: equal to the mask range when the
state is partitioned; an even split at stage 0, where the new bits are then exchanged so every rank holds the same
full masks). Masks are stored bit-packed.

It is a step component (:mod:`dist_sparse.step`); one optimizer step, as seen from here:
0. ``before_forward`` / after the gradient: a method that trains dense weights through a masked forward
   (``SparseMethod.dense_weights``) gets the model's weights masked before each forward (re-deciding the masks from
   the current masters first when ``reselects_before_forward``: SR-STE), and a method may add a term to the
   reduced gradient (``SparseMethod.grad_deltas``) before anything else reads it.
1. ``before_step(plan)``: on a mask-update step, score this rank's slices (|w|, |dense grad| or random), select
   globally (exact top-k across ranks), store the new masks, zero dropped weights, start regrown weights at 0 with
   zeroed optimizer moments. Then zero the gradients of pruned positions, so they neither count in gradient
   clipping nor reach the optimizer.
2. the optimizer step (skipped on update steps of methods whose update replaces the step, like RigL).
3. ``after_optimizer_step()``: multiply the master weights by the mask, so pruned weights are exactly 0 whatever
   the optimizer did (Adam momentum cannot revive them). DeepSpeed then copies master weights to the model.

Where the masked values live is the *storage*'s business (:class:`DenseStorage`: DeepSpeed's dense tensors, whose
pruned positions are zeroed; compact state's packed store, which repacks instead).
"""

import torch

from dist_sparse import distributed as D
from dist_sparse.masks.packing import pack_bits, unpack_bits
from dist_sparse.masks.select import DistributedSelector
from dist_sparse.methods.base import LayerSlice
from dist_sparse.step import Component, StepPlan, StepSchedule


class DenseStorage:
    """Masked values stored densely (DeepSpeed's own tensors): pruned positions hold zeros, which the sparsifier
    writes after every optimizer step and at every mask change. Compact state's store replaces this with packed
    storage (``PackedZeroState``), where pruned positions are not stored at all."""

    # frozen weights (freezing.py): their values are the sparsifier's copy, written back after every optimizer step
    holds_frozen_values = False

    @torch.no_grad()
    def masks_changed(self, sparsifier, old: dict) -> None:
        """After a mask update: regrown weights start at 0 with zero moments, dropped ones are zeroed."""
        for v in sparsifier.views:
            changed = (sparsifier.mask(v.name) ^ old[v.name]).to(v.master().device)
            v.mul_master_(~changed)
            v.zero_state_(changed)

    @torch.no_grad()
    def enforce(self, sparsifier) -> None:
        """After the optimizer step: pruned master weights back to exactly 0."""
        for v in sparsifier.views:
            v.mul_master_(sparsifier.mask(v.name).to(v.master().device))

    @torch.no_grad()
    def restore_frozen(self, sparsifier) -> None:
        """After the optimizer step: frozen positions back to their kept values, whatever Adam or weight decay did
        to the dense masters."""
        for name, values in sparsifier.frozen_values.items():
            master = sparsifier.views[sparsifier.order[name]].master()
            master[sparsifier.frozen_mask(name).to(master.device)] = values


class Sparsifier(Component):
    name = "sparsifier"

    def __init__(self, method, views: list, group=None, schedule: StepSchedule | None = None):
        self.method = method
        self.schedule = schedule if schedule is not None else StepSchedule(method)
        self.views = sorted(views, key=lambda v: v.name)
        self.group = group
        self.order = {v.name: i for i, v in enumerate(self.views)}
        self.packed = {v.name: pack_bits(torch.ones(v.mask_len, dtype=torch.bool)) for v in self.views}
        self.selector = DistributedSelector(group)
        self.skip_optimizer_step = False  # of the latest before_step: its plan's decision
        self.grad_sums: dict = {}  # name -> sum of dense gradients (score range) over the growth window
        # set by a gradient exchange that keeps the growth window itself (the compressed exchange): returns how many
        # steps the update step's reduced gradient sums; None: the window's reduced gradients are summed here
        self.window_upstream = None
        self.grad_sum_steps = 0
        self.last_update: dict | None = None  # churn etc. of the latest mask update
        self.updates_done = 0
        self.storage = DenseStorage()
        # the model's weights are masked for the forward while the master weights stay dense
        self.masked_forward = method is not None and method.dense_weights
        self._reselected_at: int | None = None  # the step whose forward masks were last re-decided (SR-STE)
        # freezing (dist_sparse/freezing.py): positions of the mask range that never change state, and the master
        # values they keep (restored after every optimizer step, so neither the update nor weight decay moves them).
        # A storage that holds the frozen values itself (compact state: they are not packed, the model's weights
        # keep them) makes this copy unnecessary: ``frozen_values`` stays empty then
        self.frozen: dict = {}  # name -> packed bits
        self.frozen_values: dict = {}  # name -> values at the frozen positions, in order


    @property
    def base_method(self):
        """The method itself: fused MoE experts see it through a per-matrix wrapper (``PerMatrixLayers.method``)."""
        return getattr(self.method, "method", self.method)

    def store_in(self, storage) -> None:
        """Keep the masked values in ``storage`` from now on (compact state's packed store)."""
        self.storage = storage
        if storage.holds_frozen_values:  # the model's weights keep them: no second copy
            self.frozen_values = {}

    # -- mask storage ------------------------------------------------------------------------------------------
    def mask(self, name: str) -> torch.Tensor:
        v = self.views[self.order[name]]
        return unpack_bits(self.packed[name], v.mask_len)

    def set_mask(self, name: str, mask: torch.Tensor) -> None:
        self.packed[name] = pack_bits(mask.reshape(-1).to("cpu"))

    def frozen_mask(self, name: str) -> torch.Tensor | None:
        if name not in self.frozen:
            return None
        return unpack_bits(self.frozen[name], self.views[self.order[name]].mask_len)

    @torch.no_grad()
    def set_frozen(self, name: str, bits: torch.Tensor, master: torch.Tensor | None = None) -> None:
        """Freeze the positions ``bits`` (this rank's mask range) at the master values they hold now, or at those
        of ``master`` (the range's dense masters about to be loaded: a checkpoint load). Call it before a
        storage that holds the frozen values itself is handed the loaded masters: it lays them out by these bits."""
        v = self.views[self.order[name]]
        bits = bits.reshape(-1).to("cpu").bool()
        self.frozen[name] = pack_bits(bits)
        self.frozen_values.pop(name, None)
        if self.storage.holds_frozen_values:
            return
        held = v.master()
        source = held if master is None else master.reshape(-1)
        self.frozen_values[name] = source[bits.to(source.device)].detach().to(held.device, copy=True)

    def trainable_mask(self, name: str) -> torch.Tensor:
        """The positions the optimizer updates: active and not frozen."""
        frozen = self.frozen_mask(name)
        return self.mask(name) if frozen is None else self.mask(name) & ~frozen

    def frozen_count(self, exclude=()) -> int:
        """Frozen active positions over all ranks (score ranges partition each tensor), not counting ``exclude``."""
        t = torch.zeros(1, dtype=torch.int64)
        for v in self.views:
            f = self.frozen_mask(v.name)
            if f is not None and v.name not in exclude:
                lo = v.score_start - v.mask_start
                t += int((f[lo: lo + v.score_len] & self.mask(v.name)[lo: lo + v.score_len]).sum())
        return int(D.all_reduce_sum(t, self.group))

    def mask_bytes(self) -> int:
        """The bits this rank keeps: its masks and, with freezing, its frozen bits."""
        return sum(p.numel() for p in self.packed.values()) + sum(p.numel() for p in self.frozen.values())

    def _slices(self, with_weight: bool, with_grad: bool, current_grad: bool = False,
                stored_range: bool = False) -> list:
        """This rank's score range of every view as :class:`LayerSlice` (``stored_range``: the whole range it
        stores instead; ``current_grad``: this step's gradient, not the growth window's mean)."""
        out = []
        for v in self.views:
            lo = 0 if stored_range else v.score_start - v.mask_start
            n = v.mask_len if stored_range else v.score_len
            sl = slice(lo, lo + n)
            w = v.master()[sl].detach().float() if with_weight else None
            g = None
            if with_grad and v.name in self.grad_sums and not current_grad:
                g = self.grad_sums[v.name] / self.grad_sum_steps
            elif with_grad:
                grad = v.grad()
                g = grad[sl].detach().float() if grad is not None else None
            m = self.mask(v.name)[sl].to(w.device if w is not None else "cpu")
            frozen = self.frozen_mask(v.name)
            out.append(LayerSlice(v.name, self.order[v.name], tuple(v.shape), v.numel, v.mask_start + lo, m, w, g,
                                  None if frozen is None else frozen[sl].to(m.device)))
        return out

    def _store_scored(self, new_slices: list, store=None) -> None:
        """Store new masks (or, with ``store``, other bits) computed on the score ranges; at stage 0 exchange slices
        so all ranks hold the full tensor's bits."""
        store = store or self.set_mask
        for v, new in zip(self.views, new_slices):
            new = new.to("cpu")
            if not v.replicated:
                store(v.name, new)
            else:
                parts = D.all_gather_varlen(new.to(torch.uint8), self.group)
                store(v.name, torch.cat(parts).bool())

    @torch.no_grad()
    def freeze_fraction(self, fraction: float, select: str, seed: int, saliency: dict | None = None) -> None:
        """FreezeNet-style freezing (Wimmer et al. 2020): of each layer's active weights, the ``fraction`` with the
        lowest ``select`` score (``random``: counter-based, ``magnitude``: |w|, ``saliency``: |g ⊙ w| given as
        :class:`~dist_sparse.methods.pai.RangeScores` covering this rank's score ranges) keep their current value and
        are never updated; exact across ranks (the selector)."""
        from dist_sparse.masks import random as counter_random
        from dist_sparse.masks.select import Piece
        from dist_sparse.methods.pai import slice_scores

        slices = self._slices(True, False)
        pieces, ks = [], {}
        active = torch.tensor([int(s.mask.sum()) for s in slices], dtype=torch.int64)
        D.all_reduce_sum(active, self.group)
        saliency_scores = slice_scores(saliency, slices) if select == "saliency" else None
        for i, (s, a) in enumerate(zip(slices, active.tolist())):
            if select == "random":
                score = counter_random.uniform(seed, 900_001 + s.order, s.start, s.mask.numel(), device=s.mask.device)
            elif select == "magnitude":
                score = s.weight.abs()
            else:
                score = saliency_scores[i]
            pieces.append(Piece(score, s.mask, s.order, 0, s.start))
            ks[s.order] = a - int(round(fraction * a))  # the trained ones: the highest scores
        trained = self.selector.topk(pieces, ks)
        self._store_scored([s.mask & ~t for s, t in zip(slices, trained)], store=self.set_frozen)

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
            self._store_scored(self.method.initial_masks(self._slices(True, False), self.selector))
        for v in self.views:
            m = self.mask(v.name).to(v.master().device)
            if not self.masked_forward:  # straight-through methods keep the pruned master weights
                v.mul_master_(m)
            v.zero_model_(m, self.full_mask(v.name) if v.model_needs_full_mask else None)

    # -- step hooks ---------------------------------------------------------------------------------------------
    def _plan(self, plan) -> StepPlan:
        """A plan, or a bare step number (the sparsifier used on its own, without an engine)."""
        return self.schedule.plan(plan) if isinstance(plan, int) else plan

    @torch.no_grad()
    def before_forward(self, plan) -> None:
        """Methods that train dense weights (``SparseMethod.dense_weights``, straight-through estimators): the
        forward runs on the masked weights, so the model's copy is masked before it; the master weights the
        optimizer steps stay dense, and the gradient of the masked weights is applied to them as it is."""
        if not self.masked_forward:
            return
        plan = self._plan(plan)
        if self.method.reselects_before_forward and plan.step != self._reselected_at:
            # SR-STE: S(W) from the current dense masters, once per step (micro-batches and evaluation share it)
            self._update(plan.step)
            self._reselected_at = plan.step
        for v in self.views:
            m = self.mask(v.name).to(v.master().device)
            v.zero_model_(m, self.full_mask(v.name) if v.model_needs_full_mask else None)

    @torch.no_grad()
    def before_step(self, plan) -> None:
        """Between backward and the optimizer step, at the accumulation boundary (after the reduction)."""
        plan = self._plan(plan)
        method = self.method
        if method is not None and method.adjusts_grads:
            self._add_grad_deltas(plan.step)
        if method is not None and plan.dense_grad and method.grow_window() > 1:
            if self.window_upstream is None:
                self._accumulate_grads()
            elif plan.mask_update:  # the reduced gradient already is the window's sum
                self.grad_sums, self.grad_sum_steps = {}, 0
                self._accumulate_grads()
                self.grad_sum_steps = self.window_upstream()
        if plan.mask_update:
            self._update(plan.step)
            self.grad_sums, self.grad_sum_steps = {}, 0
        self.skip_optimizer_step = plan.skip_optimizer_step
        if method is not None and method.dense_weights:
            return  # straight-through: pruned positions keep their gradient
        for v in self.views:
            if v.grad() is not None:
                v.mul_grad_(self.trainable_mask(v.name))  # frozen weights get no gradient step (nor count in clipping)

    def uses_dense_grad(self, step: int) -> bool:
        """Whether the gradient of pruned positions is used at ``step`` (the schedule decides)."""
        return self.schedule.uses_dense_grad(step)

    def _add_grad_deltas(self, step: int) -> None:
        """A method's gradient rule (``SparseMethod.grad_deltas``), added to the reduced gradient of every position
        this rank stores (at stage 0 the whole tensor: every rank holds the same reduced gradient)."""
        slices = self._slices(True, True, current_grad=True, stored_range=True)
        for v, delta in zip(self.views, self.method.grad_deltas(step, slices)):
            if delta is not None and v.grad() is not None:
                v.add_grad_(delta)

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
    def after_optimizer_step(self, plan=None) -> None:
        if self.method is not None and self.method.dense_weights:
            return  # the masters stay dense; the forward is masked
        self.storage.enforce(self)
        self.storage.restore_frozen(self)  # frozen weights: back to their value, whatever Adam or weight decay did

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
            lo = v.score_start - v.mask_start  # count on score ranges only: they partition the tensor across ranks
            grown[i] = int(born[lo: lo + v.score_len].sum())
            pruned[i] = int(died[lo: lo + v.score_len].sum())
        # regrown weights start at 0 with zero moments; dropped ones are gone (zeroed, or repacked away); a method
        # training dense weights keeps them all (its masks only decide what the forward sees)
        if not self.masked_forward:
            self.storage.masks_changed(self, old)
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

    def bytes_held(self) -> dict:
        """Mask (and frozen) bits; the frozen positions' values kept to restore them after every step (a copy of
        master values, where the model's weights do not hold them); the growth window's gradient sums."""
        return {"masks": self.mask_bytes(), "master_weights": list(self.frozen_values.values()),
                "gradients": list(self.grad_sums.values())}

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
