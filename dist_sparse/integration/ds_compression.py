"""Compressed gradient exchange inside DeepSpeed's loop (ZeRO stages 0-3): where the local gradients come from
and where the averaged gradients go. Receives the engine; never imports deepspeed.

How DeepSpeed's own reduction is replaced (``docs/compression.md``):

- stage 0: ``engine.enable_backward_allreduce = False``: ``engine.backward`` no longer all-reduces, so at the
  accumulation boundary ``param.grad`` holds this rank's local gradient (summed over micro-batches).
- stages 1 and 2: DeepSpeed hands every parameter's gradient to
  ``optimizer.reduce_independent_p_g_buckets_and_remove_grads(param, i)`` (stage 2: after each micro-batch's
  backward, from its gradient hooks; stage 1: at the boundary). We replace that bound method on the optimizer
  instance: it adds the gradient to this rank's local accumulator and puts nothing in DeepSpeed's buckets, so no
  collective runs; DeepSpeed's epilogue still builds its partition-gradient views (``averaged_gradients``) at the
  boundary, now holding local values.
- stage 3: the same bound method of ``DeepSpeedZeroOptimizer_Stage3`` (called from each gathered parameter's
  gradient hook, every micro-batch) is replaced alike; the full local gradient is stashed and ``param.grad``
  released, as DeepSpeed's bucketing releases it. The rank's ranges are its ZeRO-3 shards (``[r n, (r + 1) n)`` of
  every flattened parameter), and the averages go into DeepSpeed's gradient shards through
  ``set_local_grad_for_param`` (:meth:`~dist_sparse.integration.views.ParamView.set_grad_`). The stash is a full
  fp32 local gradient per rank between backward and the exchange (``transient_bytes_per_rank``), which error
  feedback needs anyway: the residual is per rank and full-size by construction.
- at the boundary, :meth:`CompressedReduction.reduce_gradients` (the first step component: after the finiteness
  check, before the sparsifier) runs the compressed exchange and writes each parameter's average into exactly the
  storage DeepSpeed's reduction would have filled: ``param.grad`` at stage 0, the rank's partition fragment
  (``param._hp_mapping.get_lp_grad_fragment``) at stages 1/2. Gradient clipping, the norm and the optimizer step
  then proceed unchanged.

The sender must know which coordinates of its *full* local gradient are pruned, while masks are stored sharded:
each tensor's full mask is built from the ranks' shard bits when the exchange asks for it and released before
the next one (:class:`dist_sparse.masks.sharded.MaskSource`; one all-gather per tensor and pass over the tensors;
``mask_sync_bytes_per_step``), or, with ``sparsity.replicate_masks: true``, a replicated copy of the full masks
is gathered whenever the masks change and kept (bit-packed, 1 bit per weight on every rank).

fp16 (DeepSpeed's loss scaler): the local gradients are loss-scaled, and the scale changes during training. The
exchange divides them by the current scale before they enter a residual or momentum buffer (so those buffers hold
unscaled values and a scale change cannot corrupt them) and writes ``average x scale`` back, which DeepSpeed's step
unscales as usual. Two ways a step overflows: a rank's local gradient is not finite (the engine's agreement sees it
before the exchange; the residuals are untouched) or the average would not fit fp16 at the current scale (error
feedback can release larger values than one step's gradient). For the latter every rank agrees after the exchange,
restores its buffers from the copy taken before it (a transient of the buffers' size, fp16 runs only) and the
step is skipped. Either way the partition gradients get an inf, so DeepSpeed's loss scaler sees the overflow,
skips and lowers the scale.
"""

import logging

import torch

from dist_sparse import distributed as D
from dist_sparse import preflight
from dist_sparse.compression import hierarchical
from dist_sparse.compression.adam import LocalMomentAdam, is_adam
from dist_sparse.errors import ConfigError
from dist_sparse.integration import patches
from dist_sparse.masks.sharded import MaskSource
from dist_sparse.step import Component

log = logging.getLogger("dist_sparse")

# checkpoint keys of the growth window kept by the exchange (enable_local_window)
WINDOW_SUM, WINDOW_STEPS = "grow_window_sum", "grow_window_steps"


def _numel(p) -> int:
    """A parameter's full size (ZeRO-3 partitions it: its local ``numel`` is 0)."""
    return getattr(p, "ds_numel", p.numel())


def dense_comm_bytes_per_step(engine, params: list) -> int:
    """What DeepSpeed's uncompressed reduction hands to torch.distributed per rank and optimizer step.

    Every gradient element is all-reduced once per reduction, as ``communication_data_type``: stage 0's
    ``allreduce_bucket`` and stages 1/2's ``average_tensor`` (reduce-scatter via bucketed all-reduce/reduce) hand
    the flattened bucket, ``numel`` elements, to the collective. Stage 0 and 1 reduce at the accumulation
    boundary; stages 2 and 3 reduce after every micro-batch's backward (``gradient_accumulation_steps`` times).
    A ZeRO-3 parameter counts its full size (``ds_numel``; its local ``numel`` is 0 once partitioned)."""
    dtype = getattr(engine, "communication_data_type", None) or params[0].dtype
    itemsize = torch.empty(0, dtype=dtype).element_size()
    reductions = engine.gradient_accumulation_steps() if engine.zero_optimization_stage() >= 2 else 1
    return sum(_numel(p) for p in params) * itemsize * reductions


def _dgc_refusal(inner) -> str | None:
    """Why DGC momentum correction cannot move ``inner``'s momentum into the exchange (None: it can)."""
    groups = inner.param_groups
    m = groups[0].get("momentum")
    if m is None or not m > 0 or any(g.get("momentum") != m for g in groups):
        return (f"needs an SGD optimizer with one momentum > 0 in every param group (DGC, Lin et al. 2018); "
                f"{type(inner).__name__} has momentum {m!r}")
    if any(g.get("nesterov") for g in groups):
        return "DGC momentum correction does not cover Nesterov SGD"
    return None


def _optimizer_momentum(inner) -> float:
    """Move SGD momentum into the exchange (DGC momentum correction): return it, set the optimizer's to 0."""
    why = _dgc_refusal(inner)
    if why is not None:
        raise ConfigError("compression.momentum_correction", why)
    groups = inner.param_groups
    m = groups[0]["momentum"]
    for g in groups:
        g["momentum"] = 0.0
    log.info("compression.momentum_correction: SGD momentum %.3g is applied before compression (DGC); the "
             "optimizer's own momentum is set to 0", m)
    return float(m)


class CompressedReduction(Component):
    """Owns the per-rank compression state of one engine and replaces its gradient reduction (a step component:
    ``reduce_gradients`` runs the exchange, a skipped step drops the local gradients, residuals stay)."""

    name = "compression"

    def __init__(self, engine, param_views: list, inner_optimizer, cfg, seed: int = 0, store=None, sparsifier=None,
                 replicate_masks: bool = False):
        """``store``: compact state's :class:`~dist_sparse.integration.compact_zero.PackedZeroState` (ZeRO-1/2/3),
        which then receives the averaged ranges instead of DeepSpeed's partition fragments (or ZeRO-3 shards);
        ``sparsifier``: whose masks the senders respect (None: dense training); ``replicate_masks``: keep the full
        masks between mask changes (``sparsity.replicate_masks``) instead of building each tensor's when the exchange
        needs it."""
        stage = engine.zero_optimization_stage()
        dp = getattr(engine, "dp_world_size", D.world_size())
        if dp != D.world_size():
            raise ConfigError("compression.method", f"gradient compression needs pure data parallelism (data-"
                                                    f"parallel size {dp} != world size {D.world_size()})")
        self.engine = engine
        self.stage = stage
        self.fp16 = bool(engine.fp16_enabled())
        if self.fp16 and store is not None:
            raise ConfigError("compression.method", "gradient compression with sparsity.compact_state does not "
                                                    "support fp16; use bf16, or compression without compact state")
        self.exchange_overflowed = False  # fp16: the last exchange's average did not fit the loss scale
        self.sparsifier = sparsifier
        self.views = {v.name: v for v in param_views}
        self.names = sorted(self.views)
        params = dict(engine.module.named_parameters())
        self.params = {n: params[n] for n in self.names}
        self._name_of = {id(p): n for n, p in self.params.items()}
        # momentum correction: SGD (DGC) moves the optimizer's momentum into the exchange; Adam/AdamW also keeps
        # its second moment on the local gradient (dist_sparse.compression.adam)
        # an unset momentum_correction follows the optimizer actually built (the config may not name one)
        # (an SGD momentum DGC could not move leaves an unset momentum_correction off, instead of refusing it)
        movable = None if _dgc_refusal(inner_optimizer) else inner_optimizer.param_groups[0]["momentum"]
        cfg = cfg.resolved_for("adamw" if is_adam(inner_optimizer) else type(inner_optimizer).__name__, movable)
        self.adam = None
        momentum, ema = None, False
        if cfg.momentum_correction and is_adam(inner_optimizer):
            self.adam = LocalMomentAdam(inner_optimizer)
            momentum, ema = self.adam.beta1, True
        elif cfg.momentum_correction:
            momentum = _optimizer_momentum(inner_optimizer)
        # which node each rank runs on: the inter-node scope groups ranks by it; both scopes split their bytes
        # into intra- and inter-node traffic by it (one all-gather at start)
        self.layout = hierarchical.NodeLayout(tuple(preflight.node_layout()))
        self.scope = cfg.scope
        # the workers of the compressed exchange: every rank, or (inter-node scope) every node
        workers = self.layout.nodes if cfg.scope == "inter_node" else D.world_size()
        local_clip = 0.0
        if cfg.momentum_correction and engine.gradient_clipping() > 0:
            # DGC local clipping: the gradient is clipped on each worker before it enters the local momentum, and
            # DeepSpeed's own clipping (which would clip the exchanged momentum) is switched off for this engine
            local_clip = engine.gradient_clipping() * workers ** 0.5
            why = "compression momentum correction: clipping moves before the exchange (DGC local clipping)"
            patches.assign(engine._config, "gradient_clipping", 0.0, by=why)
            if hasattr(engine.optimizer, "clip_grad"):
                patches.assign(engine.optimizer, "clip_grad", 0.0, by=why)
            log.info("compression.momentum_correction: gradient clipping moves before the exchange (DGC local "
                     "clipping at %.4g = gradient_clipping x sqrt(%d workers))", local_clip, workers)
        beta2 = self.adam.beta2 if self.adam is not None else None
        # compact state: the residuals (and momentum-correction buffers) are kept packed by the masks, as the
        # rest of the state is (pruned coordinates are 0 in every one of them)
        self.compression = hierarchical.build(cfg, seed, self.layout, momentum=momentum, ema=ema,
                                              local_clip=local_clip, precondition_beta2=beta2,
                                              packed=store is not None)
        self.dense_bytes_per_step = dense_comm_bytes_per_step(engine, list(self.params.values()))
        # the senders' full masks (which coordinates are pruned), built from the sparsifier's shards
        self.mask_source = None if sparsifier is None else MaskSource(sparsifier, device=self._device(),
                                                                      replicate=replicate_masks)
        self._scale = 1.0  # the loss scale the last written averages carry (fp16)
        self._mask_epoch = 0
        # the local gradient of the accumulation window (stages 1/2): full fp32 tensors, from the first backward
        # of a window to the exchange, then released (a transient: transient_bytes_per_rank)
        self._stash: dict = {}
        self._touched: set = set()
        self.max_stash_bytes = 0
        self.store = store
        # RigL's growth window kept here (enable_local_window): each rank sums its own local dense gradient of the
        # sparsified tensors over the window's steps, which exchange compressed as usual; the update step exchanges
        # the sum once, dense, so growth scores the window's mean gradient for one dense exchange per update
        self.window_sums: dict | None = None
        self.window_steps = 0  # steps summed into the open window
        self.closed_window_steps = 0  # steps the last update step's exchanged sum covers (the sparsifier reads it)
        if store is not None and self.adam is not None:  # staged second moments follow a repack of the masters
            store.layout_followers.append(self.adam.follow)
        # stages 1/2: every rank's range of every tensor in its partition (fixed for the run). The average is
        # needed only over the own range, and the own contribution there is added locally, uncompressed
        self._owned = None if stage == 0 else self._partition_ranges()
        if stage == 0:
            patches.assign(engine, "enable_backward_allreduce", False,
                           by="gradient compression: the compressed exchange replaces the backward all-reduce")
        else:
            opt = engine.optimizer
            if not hasattr(opt, "reduce_independent_p_g_buckets_and_remove_grads"):
                raise ConfigError("compression.method", f"cannot take over the gradient reduction of "
                                                        f"{type(opt).__name__} (not a ZeRO 1/2/3 optimizer)")
            self._grad_for_reduction = getattr(opt, "get_gradient_for_reduction", lambda p: p.grad)
            patches.replace(opt, "reduce_independent_p_g_buckets_and_remove_grads", self._take_local_grad,
                            by="gradient compression: keep the local gradient, the exchange reduces it")

    def _device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def _partition_ranges(self) -> dict:
        """name -> [(start, length) of rank r's partition fragment, for every rank r] (one all-gather)."""
        # on the gradients' device: NCCL gathers only device tensors
        mine = torch.tensor([[self.views[n].mask_start, self.views[n].mask_len] for n in self.names],
                            dtype=torch.int64, device=self._device())
        gathered = [t.tolist() for t in D.all_gather_equal(mine)]
        owned = {}
        for i, n in enumerate(self.names):
            ranges = [tuple(r[i]) for r in gathered]
            covered = sorted((s, s + ln) for s, ln in ranges if ln)
            ends = [0] + [e for _, e in covered]
            if [s for s, _ in covered] != ends[:-1] or ends[-1] != _numel(self.params[n]):
                raise RuntimeError(f"ZeRO partitions of {n} do not tile it: {ranges}")
            owned[n] = ranges
        return owned

    # -- collecting the local gradient (stages 1/2) ------------------------------------------------------------
    @torch.no_grad()
    def _take_local_grad(self, param, *_) -> None:
        """Replaces DeepSpeed's bucketing + reduction: accumulate this rank's gradient, communicate nothing. At
        ZeRO-3 the hook sees the gathered parameter's full gradient; it is released here, as DeepSpeed's bucketing
        would release it (the stash is the rank's only copy until the exchange)."""
        name = self._name_of.get(id(param))
        g = self._grad_for_reduction(param)
        if name is None or g is None or _numel(param) == 0:
            return
        self._stash_grad(name, g)
        if self.stage >= 3:
            param.grad = None

    def _stash_grad(self, name: str, g) -> None:
        flat = g.detach().reshape(-1)
        buf = self._stash.get(name)
        if buf is None:
            buf = self._stash[name] = torch.empty(flat.numel(), dtype=torch.float32, device=flat.device)
        if name in self._touched:
            buf.add_(flat)
        else:
            buf.copy_(flat)
            self._touched.add(name)

    def local_grads(self) -> dict:
        """This rank's full local gradient of every trainable parameter (zeros where none was computed)."""
        out = {}
        for n in self.names:
            p = self.params[n]
            if self.stage == 0:
                if p.grad is None:  # unused this step; DeepSpeed's all-reduce would also treat it as zeros
                    p.grad = torch.zeros_like(p)
                out[n] = p.grad.detach().reshape(-1)
            elif n in self._touched:
                out[n] = self._stash[n]
            else:
                out[n] = torch.zeros(_numel(p), dtype=torch.float32, device=p.device)
        return out

    def grads_finite(self) -> bool:
        """The step's finiteness check, on the full local gradient (before it can enter a residual)."""
        return all(bool(torch.isfinite(g).all()) for g in self.local_grads().values())

    def skipped_step(self, plan) -> None:
        """A skipped step: forget the local gradients (the residuals stay untouched). An fp16 overflow is shown to
        DeepSpeed's loss scaler: the gradients it reads were never filled from the local ones."""
        self._release_stash()
        if plan.overflow:
            self._show_overflow()

    def _show_overflow(self) -> None:
        for v in self.views.values():  # one inf per rank: DeepSpeed reduces its overflow flag over the ranks
            g = v.grad()
            if g is not None and g.numel():
                g = g.clone()
                g[0] = float("inf")
                v.set_grad_(g)
                return

    def _loss_scale(self) -> float:
        return float(self.engine.optimizer.loss_scale) if self.fp16 else 1.0

    def _release_stash(self) -> None:
        self.max_stash_bytes = max(self.max_stash_bytes, sum(t.numel() * t.element_size()
                                                             for t in self._stash.values()))
        self._stash = {}
        self._touched.clear()

    # -- masks -------------------------------------------------------------------------------------------------
    def masks_changed(self) -> None:
        """Call after masks were replaced outside a mask update (a checkpoint load): refresh the replicated copy."""
        self._mask_epoch += 1

    def _refresh_masks(self, sparsifier) -> None:
        """Before the exchange: tell the mask source whether the masks changed (replicated mode re-gathers then;
        sharded mode builds each tensor's full mask during the exchange)."""
        if self.mask_source is not None:
            self.mask_source.refresh((sparsifier.updates_done, self._mask_epoch))

    @property
    def mask_sync_bytes(self) -> int:
        """Bytes handed to the masks' all-gathers so far (what ``mask_sync_bytes_per_step`` averages)."""
        return 0 if self.mask_source is None else self.mask_source.sync_bytes()

    # -- RigL's growth window -----------------------------------------------------------------------------------
    def enable_local_window(self) -> None:
        """Keep RigL's growth window in the exchange instead of exchanging every window step dense.

        Without it, every step of a window of ``grow_grad_steps`` > 1 exchanges the sparsified tensors dense (the
        sparsifier sums the reduced gradients). With it, a window step exchanges compressed like any other step and
        adds this rank's full local gradient of the sparsified tensors, pruned positions included, to
        ``window_sums`` (fp32, per rank); the update step sends ``window_sums`` + its own local gradient in its
        dense exchange, so the reduced value is the sum over the window of the ranks' mean gradient, which the
        sparsifier divides by the window's step count (``window_upstream``). The bytes are those of a window of 1;
        the cost is one fp32 copy of the sparsified tensors per rank, held across the window (``gradients`` in
        ``state_bytes_per_rank``) and checkpointed with the residuals."""
        if self.sparsifier is None:
            return
        # with compact state the store takes the update step's dense ranges as it does without a window
        self.window_sums = {}
        self.sparsifier.window_upstream = lambda: self.closed_window_steps

    def _window_names(self) -> list:
        return [v.name for v in self.sparsifier.views]

    def _add_to_window(self, local: dict) -> None:
        for n in self._window_names():
            g = local[n].float()
            if n in self.window_sums:
                self.window_sums[n].add_(g)
            else:
                self.window_sums[n] = g.clone()
        self.window_steps += 1

    def _close_window(self, local: dict) -> dict:
        """The update step's local gradients with the window's sums added (the sums are released)."""
        out = dict(local)
        for n in self._window_names():
            g = local[n].float()
            out[n] = self.window_sums.pop(n).add_(g) if n in self.window_sums else g
        # the update step's own gradient is part of its window; the sparsifier reads the count in this step
        self.closed_window_steps, self.window_steps = self.window_steps + 1, 0
        return out

    # -- the boundary ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reduce_gradients(self, plan) -> None:
        """Exchange compressed gradients and write the averages where DeepSpeed's reduction would have."""
        step, sparsifier = plan.step, self.sparsifier
        self._refresh_masks(sparsifier)
        dense, skip = (), ()
        windowed = self.window_sums is not None and plan.dense_grad
        # steps whose gradient of *pruned* positions is used (RigL's update step; with a growth window, the steps
        # before it too, unless the window is kept here): exchange the sparsified tensors uncompressed
        if plan.exchanges_dense(self.window_sums is not None):
            dense = {v.name for v in sparsifier.views}
        if plan.replaces_optimizer_step:  # the update replaces the step: nothing else is applied
            skip = [n for n in self.names if n not in dense]
        local = self.local_grads()
        self.exchange_overflowed = False
        scale = self._loss_scale()
        if scale != 1.0:  # fp16: residuals and momenta see unscaled values (the module docstring)
            local = {n: (g.div_(scale) if g.dtype == torch.float32 and self.stage else g.float().div_(scale))
                     for n, g in local.items()}
            saved = {k: t.clone() for k, t in self.compression.feedback.state_tensors().items()}
        pending = None  # a window step's local gradients, added to the window once the step is known to count
        if windowed and plan.mask_update:
            local = self._close_window(local)
        elif windowed:
            # before the exchange, which may clip the local gradients in place (DGC local clipping); fp16 waits for
            # the overflow check, so that a skipped step leaves the window as it was
            pending = {n: local[n].float().clone() for n in self._window_names()} if scale != 1.0 else None
            if pending is None:
                self._add_to_window(local)
        eligible = {} if self.mask_source is None else self.mask_source
        averaged = self.compression.run(local, eligible, step, dense, skip, owned=self._owned,
                                        dense_applied=not plan.replaces_optimizer_step)
        if self.mask_source is not None:
            self.mask_source.release()  # sharded: the last tensor's full mask; nothing stays between steps
        if scale != 1.0 and self._overflows(averaged, scale):
            self.compression.feedback.load_state_tensors(saved, self._device())
            self.exchange_overflowed = True
            self._release_stash()
            return
        if pending is not None:
            self._add_to_window(pending)
        self._scale = scale
        write = self._write_partition if self.store is None else self._write_compact
        fragments = []  # (master fragment, second-moment estimate, written average) for Adam momentum correction
        for n in self.names:
            staged = write(self.views[n], averaged.get(n), local[n], n in dense)
            if staged is not None:
                fragments.append(staged)
        if self.adam is not None:  # ZeRO-3 lends the optimizer each sub-group's flat master only for its step
            self.adam.stage(fragments, getattr(self.engine.optimizer, "fp32_partitioned_groups_flat", None)
                            if self.stage >= 3 else None)
        self._release_stash()

    # Both writers return what Adam momentum correction stages for ``v`` (None without it): the master, this
    # rank's part of the second-moment estimate the exchange keeps, and the written values the optimizer will
    # apply. ``dense_exchange``: ``v`` was exchanged dense this step (RigL's dense-gradient steps), so the written
    # values include pruned positions, which the optimizer does not apply (``before_step`` masks them; compact state
    # packs them away): the staged values exclude them too.
    def _write_partition(self, v, average, local, dense_exchange: bool):
        """Write this rank's range of ``average`` (None: not exchanged this step, zeros) into DeepSpeed's gradient
        of ``v`` (``param.grad`` at stage 0, the partition fragment at stages 1/2)."""
        g = v.grad()
        if g is None or g.numel() == 0:
            return None
        if average is not None:
            mine = average[v.mask_start: v.mask_start + g.numel()]
            v.set_grad_(mine * self._scale if self._scale != 1.0 else mine)
        else:
            v.set_grad_(torch.zeros_like(g))
        g = v.grad()  # (a ZeRO-3 view hands out a copy)
        if self.adam is None:
            return None
        written = g if self._scale == 1.0 else g.float() / self._scale  # as the optimizer will see it, unscaled
        if dense_exchange and self.sparsifier is not None and v.name in self.sparsifier.order:
            keep = self.sparsifier.mask(v.name)  # this rank's own range: its own bits, no collective
            written = g.masked_fill(~keep.to(g.device), 0)
        return v.master(), self._second_moment(v.name, local, v.mask_start, g.numel()), written

    def _overflows(self, averaged: dict, scale: float) -> bool:
        """fp16: whether, on any rank, the average over its own range times the loss scale leaves fp16's range
        (one all-reduce: all ranks then skip together)."""
        limit = torch.finfo(torch.float16).max / scale
        bad = 0
        for n, avg in averaged.items():
            v = self.views[n]
            mine = avg if self.stage == 0 else avg[v.mask_start: v.mask_start + v.mask_len]
            if mine.numel() and not bool((mine.abs() <= limit).all()):  # NaN fails the comparison too
                bad = 1
                break
        flag = torch.tensor([bad], dtype=torch.int64, device=self._device())
        return bool(D.all_reduce_max(flag)[0])

    def _write_compact(self, v, average, local, dense_exchange: bool):
        """Compact state: hand this rank's range of ``average`` to the store (packed by the mask, or dense on a
        dense-gradient step); a range not exchanged this step stays zero there. Momentum correction stages the
        packed master slice with the second moment and the written values packed by the same layout."""
        if v.group is None or v.mask_len == 0:
            return None
        store, i = self.store, v.group
        if average is not None:
            store.accept_grad(i, v.name, average.narrow(0, v.mask_start, v.mask_len), store.reduced_grad_dtype)
        if self.adam is None:
            return None
        written = store.grad_of(i, v.name)  # what was stored: packed, or the dense range on a dense step
        if written is None:
            written = torch.zeros(0)
        elif dense_exchange:
            written = store.pack_range(i, v.name, written)
        second = self._second_moment(v.name, local, v.mask_start, v.mask_len)
        return store.master_slice(i, v.name), store.pack_range(i, v.name, second), written

    def _second_moment(self, name: str, local: torch.Tensor, start: int, length: int) -> torch.Tensor:
        """The exchange's estimate of Adam's second moment for ``name`` over ``[start, start + length)``. A tensor
        that has not been compressed yet (only exchanged dense or skipped so far) falls back to one step's local
        gradient."""
        feedback = self.compression.feedback
        if name in feedback.second_moment:
            return feedback.second_moment_estimate(name, start, length)
        return local.narrow(0, start, length).float().square() * (1 - self.adam.beta2)

    # -- accounting and checkpoints ----------------------------------------------------------------------------
    def stats(self, steps: int) -> dict:
        """Per-rank means over ``steps`` optimizer steps (skipped steps move nothing)."""
        steps = max(1, steps)
        intra, inter = hierarchical.split_bytes(self.compression, self.layout)
        # DeepSpeed's dense reduction is one collective over the whole world: it crosses nodes when there are two
        dense_inter = float(self.dense_bytes_per_step) if self.layout.nodes > 1 else 0.0
        return {"comm_bytes_per_step": self.compression.total_bytes / steps,
                "dense_comm_bytes_per_step": float(self.dense_bytes_per_step),
                "intra_node_comm_bytes_per_step": intra / steps, "inter_node_comm_bytes_per_step": inter / steps,
                "dense_inter_node_comm_bytes_per_step": dense_inter,
                "mask_sync_bytes_per_step": self.mask_sync_bytes / steps,
                "mask_sync_received_bytes_per_step": (0 if self.mask_source is None
                                                      else self.mask_source.received_bytes / steps)}

    def layout_signature(self) -> str:
        """What this rank's residuals belong to: the scope and, between nodes, the node layout."""
        return "all" if self.scope == "all" else f"inter_node:{self.layout.signature()}"

    def bytes_held(self) -> dict:
        return {"masks": self.mask_bytes(), "compression_residuals": self.compression.feedback.buffers(),
                "gradients": list((self.window_sums or {}).values())}

    def mask_bytes(self) -> int:
        """Bytes of masks this rank keeps for sending beyond the sparsifier's own bits: the replicated full masks
        with ``sparsity.replicate_masks``, 0 when sharded (and at stage 0, where the sparsifier's masks are the
        full ones, counted there)."""
        return 0 if self.mask_source is None else self.mask_source.held_bytes()

    def state_tensors(self) -> dict:
        out = dict(self.compression.feedback.state_tensors())
        if self.window_sums is not None:  # an open growth window: its sums and step count
            out.update({f"{n}::{WINDOW_SUM}": t for n, t in self.window_sums.items()})
            out[f"::{WINDOW_STEPS}"] = torch.tensor([float(self.window_steps)])
        return {k: t.detach().cpu().contiguous() for k, t in out.items()}

    def load_state_tensors(self, tensors: dict) -> None:
        device = next(iter(self.params.values())).device
        kinds = {k: k.rsplit("::", 1)[1] for k in tensors}
        if self.window_sums is not None:
            self.window_sums = {k.rsplit("::", 1)[0]: t.to(device).float().clone() for k, t in tensors.items()
                                if kinds[k] == WINDOW_SUM}
            steps = [t for k, t in tensors.items() if kinds[k] == WINDOW_STEPS]
            self.window_steps = int(steps[0].reshape(-1)[0]) if steps else 0
        elif any(kinds[k] == WINDOW_SUM for k in tensors):
            raise ConfigError("sparsity.grow_grad_steps", "the checkpoint holds an open RigL growth window kept "
                                                          "by the compressed exchange, which this run does not keep "
                                                          "(the window resolves to 1 step here); resume with the "
                                                          "config it was trained with")
        self.compression.feedback.load_state_tensors(
            {k: t for k, t in tensors.items() if kinds[k] not in (WINDOW_SUM, WINDOW_STEPS)}, device)
