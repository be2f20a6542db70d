"""The sparse engine: a DeepSpeed engine whose step runs a list of components (:mod:`dist_sparse.step`).

:class:`SparseEngine` wraps an initialised DeepSpeed engine. It decides, once per step, what kind of step it is
(its :class:`~dist_sparse.step.StepSchedule` makes the :class:`~dist_sparse.step.StepPlan`), runs its components'
hooks at fixed points of DeepSpeed's step, and owns only the policy for steps that change nothing (a non-finite
loss or gradient on some rank; an fp16 overflow, which is DeepSpeed's loss scaler's to handle). The components:

========================  ==========================================================================================
``compression``           the compressed gradient exchange (optional; it owns the reduction: ``reduce_gradients``)
``sparsifier``            the masks: mask updates and gradient masking (``before_step``), masked masters after the
                          optimizer step, the masked forward of straight-through methods (``before_forward``)
``compact``               compact state's packed store (optional; it replaces DeepSpeed's ZeRO step itself, so it
                          acts through DeepSpeed's hooks and only reports here)
``accounting``            ``state_bytes_per_rank``, measured between the reduction and the step
========================  ==========================================================================================

:func:`attach` builds them on an engine (in that order), :func:`initialize` is ``deepspeed.initialize`` plus
:func:`attach` for a DeepSpeed config that carries a ``sparsity`` block.
"""

import contextlib

import torch

from dist_sparse import distributed as D
from dist_sparse.config import CompressionConfig, ConfigError, SparsityConfig, split_deepspeed_json
from dist_sparse.errors import DistSparseError
from dist_sparse.integration import patches
from dist_sparse.integration.accounting import StateAccounting
from dist_sparse.integration.deepspeed import import_deepspeed, init_distributed
from dist_sparse.integration.experts import build_layer_method
from dist_sparse.integration.views import build_views, inner_optimizer, trainable_names
from dist_sparse.parameterization import param_groups, resolved_at_attach, scaled_learning_rates
from dist_sparse.sparsifier import Sparsifier
from dist_sparse.step import StepSchedule


class NonFiniteError(DistSparseError, RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient on some rank."""


class SparseEngine:
    """A DeepSpeed engine whose ``step()`` keeps the weights sparse and skips non-finite steps on all ranks.

    Everything else is the engine's own. ``param_views`` are views of every trainable parameter (checkpointing
    and the finiteness check use them); ``sparsifier.views`` those of the sparsified ones; ``components`` the
    step components in the order their hooks run.
    """

    def __init__(self, engine, sparsifier: Sparsifier, sparsity: SparsityConfig, max_skipped_steps: int = 5):
        sparse = {v.name: v for v in sparsifier.views}
        others = build_views(engine, [n for n in trainable_names(engine) if n not in sparse])
        self.__dict__.update(engine=engine, sparsifier=sparsifier, sparsity=sparsity, schedule=sparsifier.schedule,
                             param_views=sorted([*sparse.values(), *others], key=lambda v: v.name),
                             max_skipped_steps=max_skipped_steps, consecutive_skips=0, skipped_nonfinite=0,
                             _loss_finite=True, last_step_skipped=False, overflow_skips=0,
                             last_step_overflow=False, compact=None, compression=None, kernels=None,
                             param_gather=None, _plan=None, parameterization="standard")
        self.__dict__["accounting"] = StateAccounting(self)
        self.__dict__["components"] = [sparsifier, self.accounting]
        self.__dict__["inner_step"] = self._wrap_inner_step()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def __setattr__(self, name, value):
        if name in self.__dict__:
            self.__dict__[name] = value
        else:
            setattr(self.engine, name, value)

    # -- the components ------------------------------------------------------------------------------------------
    def add_component(self, component, before=None) -> None:
        """Insert ``component`` before the component ``before`` (default: before accounting, which measures what
        the others hold)."""
        anchor = self.accounting if before is None else before
        self.components.insert(self.components.index(anchor), component)

    def set_compact(self, store) -> None:
        """Compact state: its views replace the dense ones (same names, same ranges), its store holds the masked
        values (the sparsifier repacks through it) and is a component."""
        views = store.views
        self.sparsifier.views = [views[v.name] for v in self.sparsifier.views]
        self.sparsifier.store_in(store)
        self.__dict__["param_views"] = [views[v.name] for v in self.param_views]
        self.__dict__["compact"] = store
        self.add_component(store)

    def set_kernels(self, kernels) -> None:
        """Sparse kernels (``sparsity.kernel``): sparsified layers multiply by their active weights only; the
        component hands them each step's ``dense_grad`` and rebuilds their block indices after mask updates."""
        self.__dict__["kernels"] = kernels
        self.add_component(kernels)

    def set_param_gather(self, gather) -> None:
        """ZeRO-3: the parameter gathers are counted (and with ``sparsity.packed_gather`` packed) by ``gather``
        (:class:`~dist_sparse.integration.packed_gather.ParamGather`, installed on DeepSpeed's parameters)."""
        self.__dict__["param_gather"] = gather
        self.add_component(gather)

    def layer_kernel(self) -> dict:
        """name -> the kernel each sparsified layer runs (dense, block_sparse, semi_structured)."""
        chosen = self.kernels.layer_kernel() if self.kernels is not None else {}
        return {v.name: chosen.get(v.name, "dense") for v in self.sparsifier.views}

    def set_compression(self, reduction) -> None:
        """Gradient compression owns the reduction: first in the list, so the masks see averaged gradients."""
        self.__dict__["compression"] = reduction
        self.components.insert(0, reduction)
        if reduction.adam is not None:  # Adam momentum correction replaces the update rule
            self.inner_step[0] = reduction.adam.step

    @property
    def state_bytes(self):
        return self.accounting.last

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def training_state(self) -> dict:
        """What a checkpoint keeps of the step: each component's ``state_dict`` (under its name) and the skip
        policy's counters. Plain values; per-rank tensors are saved through the views."""
        out = {"consecutive_skips": self.consecutive_skips, "skipped_nonfinite": self.skipped_nonfinite,
               "overflow_skips": self.overflow_skips}
        for c in self.components:
            state = c.state_dict()
            if state:
                out[c.name] = state
        return out

    def load_training_state(self, state: dict) -> None:
        for c in self.components:
            if c.name in state:
                c.load_state_dict(state[c.name])
        for key in ("consecutive_skips", "skipped_nonfinite", "overflow_skips"):
            self.__dict__[key] = int(state.get(key, 0))

    # -- the step ------------------------------------------------------------------------------------------------
    def plan(self):
        """The :class:`StepPlan` of the step in progress (``global_steps`` optimizer steps done so far)."""
        step = self.engine.global_steps
        if self._plan is None or self._plan.step != step:
            self.__dict__["_plan"] = self.schedule.plan(step)
        return self._plan

    def _run(self, hook: str, plan) -> None:
        for c in self.components:
            getattr(c, hook)(plan)

    def __call__(self, *args, **kwargs):
        self._run("before_forward", self.plan())
        return self.engine(*args, **kwargs)

    def backward(self, loss, *args, **kwargs):
        self.__dict__["_loss_finite"] &= bool(torch.isfinite(loss.detach()).all())
        self._run("before_backward", self.plan())
        return self.engine.backward(loss, *args, **kwargs)

    def _grads_finite(self) -> bool:
        for c in self.components:  # a component that holds the local gradients (compression) checks them
            finite = getattr(c, "grads_finite", None)
            if finite is not None:
                return finite()
        for v in self.param_views:
            g = v.grad()
            if g is not None and g.numel() and not bool(torch.isfinite(g).all()):
                return False
        return True

    def _dynamic_loss_scale(self) -> bool:
        """fp16 with DeepSpeed's dynamic loss scaler: a gradient overflow is routine (the scaler lowers the scale)."""
        scaler = getattr(self.engine.optimizer, "loss_scaler", None)
        return bool(self.engine.fp16_enabled() and getattr(scaler, "dynamic", False))

    def step(self, *args, **kwargs):
        if not self.engine.is_gradient_accumulation_boundary():
            return self.engine.step(*args, **kwargs)
        plan = self.plan()
        # every rank learns whether any rank saw a non-finite loss or gradient, so all skip the same steps
        flags = torch.tensor([0 if self._loss_finite else 1, 0 if self._grads_finite() else 1], dtype=torch.int64)
        D.all_reduce_max(flags)
        loss_bad, grads_bad = bool(flags[0]), bool(flags[1])
        self.__dict__["_loss_finite"] = True
        self.__dict__["last_step_skipped"] = loss_bad or grads_bad
        self.__dict__["last_step_overflow"] = grads_bad and not loss_bad and self.engine.fp16_enabled()
        if self.last_step_overflow:
            return self._overflow_step(plan, *args, **kwargs)
        if loss_bad or grads_bad:
            self._count_failed_step("had a non-finite loss or gradient on some rank", "aborting")
            for v in self.param_views:  # the step still runs (DeepSpeed's own bookkeeping) but changes nothing
                g = v.grad()
                if g is not None:
                    g.zero_()
            self._skip(plan)
            return self.engine.step(*args, **kwargs)
        self._run("reduce_gradients", plan)
        if any(getattr(c, "exchange_overflowed", False) for c in self.components):
            # fp16: the exchanged gradient does not fit the loss scale on some rank (compression agreed on it)
            self.__dict__["last_step_skipped"] = self.__dict__["last_step_overflow"] = True
            return self._overflow_step(plan, *args, **kwargs)
        self.__dict__["consecutive_skips"] = 0
        self._run("before_step", plan)
        return self.engine.step(*args, **kwargs)

    def _skip(self, plan) -> None:
        plan.skipped = plan.skip_optimizer_step = True
        self._run("skipped_step", plan)

    def _count_failed_step(self, what: str, advice: str) -> None:
        """A skipped step that counts against ``train.max_skipped_steps``; raises once that many come in a row."""
        self.__dict__["consecutive_skips"] += 1
        self.__dict__["skipped_nonfinite"] += 1
        if self.consecutive_skips >= self.max_skipped_steps:
            raise NonFiniteError(f"{self.consecutive_skips} consecutive steps {what} "
                                 f"(train.max_skipped_steps={self.max_skipped_steps}); {advice}")

    def _overflow_step(self, plan, *args, **kwargs):
        """fp16: the loss is finite but the loss-scaled gradient overflowed. That is DeepSpeed's loss scaler's to
        handle: the gradients are left as they are, so DeepSpeed's step (or compact state's, which checks the same
        way) sees the overflow, skips the update and lowers the scale. Zeroing them, as a non-finite loss does,
        would hide the overflow from the scaler and the scale would never come down. The step changes nothing
        here either: no mask update (the components' ``before_step`` does not run), no optimizer step. With
        dynamic scaling the skips do not count against ``train.max_skipped_steps`` (DeepSpeed raises when the
        scale reaches its minimum); with a static scale every overflow is a failed step and counts."""
        self.__dict__["overflow_skips"] += 1
        if not self._dynamic_loss_scale():
            self._count_failed_step("overflowed with a static fp16 loss scale",
                                    "lower fp16.loss_scale or use dynamic scaling (fp16.loss_scale: 0)")
        plan.overflow = True  # a component holding the gradients (compression) shows it to DeepSpeed
        self._skip(plan)
        out = self.engine.step(*args, **kwargs)
        if not getattr(self.engine.optimizer, "overflow", True):  # DeepSpeed must have seen what every rank saw
            raise RuntimeError("a gradient overflow on some rank was not seen by DeepSpeed's loss scaler")
        return out

    def _wrap_inner_step(self) -> list:
        """Wrap the inner optimizer's ``step`` (skipped when the plan says so; the components' after-step hooks
        after it). Returns the one-element list holding the update rule the wrapper calls, so a component can
        replace the rule itself while the wrapping stays (compression's Adam momentum correction does)."""
        opt = inner_optimizer(self.engine)
        base = [opt.step]

        def step(*args, **kwargs):
            plan = self.plan()
            if plan.skip_optimizer_step:
                return None
            with scaled_learning_rates(opt):  # SμPar's per-layer rates, for this step only
                out = base[0](*args, **kwargs)
            self._run("after_optimizer_step", plan)
            return out

        patches.replace(opt, "step", step, by="sparsifier: skip replaced steps, mask the masters after each step")
        return base


def attach(engine, model, sparsity: SparsityConfig, total_steps=None, seed=0, init_masks=None,
           max_skipped_steps: int = 5, compression: CompressionConfig | None = None,
           init_batches=None, freeze=None, kernel_tokens: int | None = None) -> SparseEngine:
    """Attach a sparsifier to an initialised DeepSpeed engine (masks drawn and applied now), compact state when
    ``sparsity.compact_state``, the compressed gradient exchange when ``compression`` is enabled and sparse kernels
    per ``sparsity.kernel`` (``kernel_tokens``: tokens per micro-batch, for ``auto``'s measurement).

    ``init_batches``: this rank's token batches (a list of [batch, seq] tensors) that pruning at initialization
    (``snip``, ``grasp``) and ``freeze.select: saliency`` score; ``synflow`` is data-free. ``freeze``: a
    ``FreezeConfig`` (fraction and schedule; ``freeze.modules`` is applied before DeepSpeed, by the caller)."""
    from dist_sparse.integration.hf import sparsifiable_parameters, stored_transposed

    patches.check_deepspeed_version()
    if isinstance(sparsity.method, type):  # the Python API may pass a registered method class
        sparsity.check("sparsity")
    names = sparsifiable_parameters(model, sparsity.params, sparsity.exclude) if sparsity.method != "none" else []
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    names = [n for n in names if n in trainable]  # frozen modules (freeze.modules) are not sparsified
    views = build_views(engine, names)
    # fused MoE experts: every expert's matrix is its own layer for the method's decisions
    method = build_layer_method(sparsity, {v.name: v.shape for v in views}, total_steps,
                                sparsity.seed if sparsity.seed is not None else seed, stored_transposed(model, names))
    if method is not None and method.dense_weights and any(v.model_is_master for v in views):
        raise ConfigError("sparsity.method", f"{method.name!r} trains dense weights through a masked forward, which "
                                             "needs master weights apart from the model's (ZeRO stage >= 1, or "
                                             "bf16/fp16); at ZeRO-0 in fp32 the model's weights are the masters")
    if init_masks is None and sparsity.init_masks is not None:
        from dist_sparse.masks.io import load_masks

        init_masks = load_masks(sparsity.init_masks)
    if method is not None and getattr(method, "needs_init_scores", False) and init_masks is None:
        _score_at_init(engine, model, method, views, init_batches)
    sparsifier = Sparsifier(method, views, schedule=StepSchedule(method))
    if method is not None or init_masks is not None:
        sparsifier.initialize(init_masks)
    if freeze is not None and freeze.fraction > 0:  # FreezeNet: before any step, at the initial values
        saliency = None
        if freeze.select == "saliency":
            from dist_sparse.methods.pai import RangeScores, connection_sensitivity

            if not init_batches:
                raise ConfigError("freeze.select", "saliency scores training batches: pass init_batches to attach()")
            batches = [b.to(engine.device) for b in init_batches]
            if engine.zero_optimization_stage() == 3:  # the partitions' SNIP scores (of the masked weights)
                from dist_sparse.methods.pai import partition_sensitivity

                _check_same_count(batches, "freeze.select")
                with _backward_without_step(engine) as backward:
                    saliency = partition_sensitivity(backward, views, model, batches)
            else:
                saliency = {n: RangeScores.whole(t) for n, t in
                            connection_sensitivity(model, [v.name for v in views], batches).items()}
        sparsifier.freeze_fraction(freeze.fraction, freeze.select, sparsity.seed if sparsity.seed is not None
                                   else seed, saliency)
    wrapped = SparseEngine(engine, sparsifier, sparsity, max_skipped_steps)
    wrapped.parameterization = resolved_at_attach(model, sparsity)  # supar: the optimizer's groups carry lr_scale
    if freeze is not None and freeze.schedule:
        from dist_sparse.freezing import ProgressiveFreezing

        wrapped.add_component(ProgressiveFreezing(model, freeze.schedule, wrapped.param_views, sparsifier))
    compressed = compression is not None and compression.enabled
    if sparsity.compact_state:  # master weights, moments and gradients only for active weights
        wrapped.set_compact(_compact_store(engine, wrapped, reduce_gradients=not compressed))
    elif method is not None and not method.dense_weights:
        # masked-dense: DeepSpeed's gradient norm over the active values only, summed the way compact state sums
        # them, so the two compute the same clip coefficient bit for bit on any CPU (a straight-through method
        # applies the pruned positions' gradients too: DeepSpeed's own norm over all of them is the right one)
        _install_masked_grad_norm(engine, sparsifier)
    if compressed and wrapped.compact is not None and sparsifier.frozen:  # also refused by the config check
        raise ConfigError("freeze.fraction", "with sparsity.compact_state is not supported with gradient "
                                             "compression yet (its exchange follows the active layout, not the "
                                             "trainable one)")
    if compressed:
        from dist_sparse.integration.ds_compression import CompressedReduction

        wrapped.set_compression(CompressedReduction(engine, wrapped.param_views, inner_optimizer(engine),
                                                    compression, seed, store=wrapped.compact,
                                                    sparsifier=sparsifier,
                                                    replicate_masks=sparsity.replicate_masks))
    if sparsity.packed_gather and (method is None or engine.zero_optimization_stage() != 3):
        # also refused by the config check; this guards attach() called directly
        raise ConfigError("sparsity.packed_gather", "needs ZeRO stage 3 and a sparsity method that keeps masks "
                                                    f"(stage {engine.zero_optimization_stage()}, method "
                                                    f"{sparsity.method!r})")
    shards = None
    if engine.zero_optimization_stage() == 3 and sparsity.packed_gather and wrapped.compact is not None:
        # packed shards come with the packed gather under compact state (docs/memory.md): the gather reads the
        # active values, so the dense low-precision shard of a sparsified parameter is not kept
        wrapped.compact.enable_packed_shards(sparsity.packed_gather)
        shards = wrapped.compact.shards
    if engine.zero_optimization_stage() == 3:  # every ZeRO-3 run counts its parameter gathers (summary.json)
        from dist_sparse.integration.packed_gather import ParamGather

        wrapped.set_param_gather(ParamGather(engine, sparsifier if sparsity.packed_gather else None, shards))
    from dist_sparse.integration.kernels import build_kernels

    kernels = build_kernels(engine, model, sparsifier, sparsity, kernel_tokens)
    if kernels is not None:
        wrapped.set_kernels(kernels)
        if wrapped.compact is not None and engine.zero_optimization_stage() in (1, 2):
            # the block-sparse layers' weights held as their active blocks (docs/kernels.md): nothing reads the
            # dense weight of such a layer any more, and compact state's masters are packed already
            wrapped.compact.enable_packed_weights(kernels)
            if wrapped.compact.packed_weights is not None:
                kernels.hold(wrapped.compact.packed_weights)
    default_grow_window(wrapped, sparsity)
    return wrapped


def default_grow_window(engine: SparseEngine, sparsity: SparsityConfig) -> None:
    """RigL's unset ``grow_grad_steps``: grow on the dense gradient averaged over the whole update interval where
    that costs no extra exchange or backward work (measured better, docs/benchmarks.md "RigL's default recipe"),
    else the paper's update-step batch.

    Free: DeepSpeed's masked-dense state without compression (every step reduces the dense gradient anyway), and
    the compressed exchange, which keeps the window itself: each rank sums its local dense gradient and the update
    step's one dense exchange sends the sum (``CompressedReduction.enable_local_window``). Not free: compact state
    (without compression its packed reduction would reduce the window's steps dense; with it the local sums, full
    fp32 tensors per rank, would outweigh the packed state) and the block-sparse kernels' dW (dense on the window's
    steps), so there it is 1. Any window under compression, set explicitly or not, is kept in the exchange."""
    from dist_sparse.methods import RigL

    method = engine.sparsifier.base_method
    if not isinstance(method, RigL):
        return
    if sparsity.grow_grad_steps is None:
        free = (engine.compact is None and all(kind == "dense" for kind in engine.layer_kernel().values()))
        method.grow_grad_steps = sparsity.update_interval if free else 1
    if engine.compression is not None and method.grow_grad_steps > 1:
        engine.compression.enable_local_window()


def _score_at_init(engine, model, method, views: list, init_batches) -> None:
    """Pruning at initialization: the method's scores of the initial parameters, before any optimizer step (every
    rank scores its own batches). At ZeRO 0-2 of the whole parameters (gradients averaged over ranks inside
    ``score``), at ZeRO-3 of each rank's partition (DeepSpeed's reduced gradient of a backward without a step)."""
    from dist_sparse.methods import SynFlow
    from dist_sparse.methods.pai import RangeScores, zero3_refusal_message

    zero3 = engine.zero_optimization_stage() == 3
    if zero3 and zero3_refusal_message(type(method)) is not None:  # also refused by the config check
        raise ConfigError("sparsity.method", zero3_refusal_message(type(method)))
    if hasattr(method, "stacks"):
        raise ConfigError("sparsity.method", f"{method.name!r} does not support fused expert tensors "
                                             f"({', '.join(sorted(method.stacks))}); exclude them")
    if isinstance(method, SynFlow):
        init_batches = []  # data-free
    elif not init_batches:
        raise ConfigError("sparsity.init_batches", f"{method.name!r} scores training batches at step 0: pass "
                                                   "init_batches to attach() / initialize() (dist-sparse train does)")
    batches = [b.to(engine.device) for b in init_batches[: method.init_batches]]
    if zero3:
        _check_same_count(batches, "sparsity.init_batches")
        with _backward_without_step(engine) as backward:
            method.init_scores = method.score_partitions(backward, views, model, batches)
    else:
        names = [v.name for v in views]
        method.init_scores = {n: RangeScores.whole(t) for n, t in method.score(model, names, batches).items()}


def _check_same_count(batches: list, key: str) -> None:
    """ZeRO-3 scoring: DeepSpeed reduces every backward across ranks, so every rank must score as many batches (a
    rank with fewer would leave the others waiting in the reduction)."""
    counts = torch.tensor([len(batches), -len(batches)], dtype=torch.int64)
    D.all_reduce_max(counts)
    if int(counts[0]) != -int(counts[1]):
        raise ConfigError(key, f"at ZeRO-3 every rank scores the same number of batches (each backward is reduced "
                               f"across ranks); the ranks hold between {-int(counts[1])} and {int(counts[0])}")


@contextlib.contextmanager
def _backward_without_step(engine):
    """ZeRO-3 scoring at step 0: yields ``backward(x)``, one batch's forward and backward through the engine, so
    DeepSpeed gathers each module's parameters, reduce-scatters (averages) the gradient into every rank's fp32
    partition and accumulates it over the calls, as over a step's micro-batches. No step is taken; on leaving, every
    gradient DeepSpeed accumulated is cleared (the partitions zeroed, its micro-step counter and the lp ``.grad``
    reset, as DeepSpeed's own overflow clean-up does) and every parameter is released to its shard, so the first
    training step starts from the state of an engine that never scored."""
    zo = engine.optimizer
    if not engine.managed_gradient_accumulation():  # backward() would only accumulate locally, unreduced
        raise ConfigError("sparsity.method", "scoring at ZeRO-3 reads DeepSpeed's reduced gradient after backward; "
                                             "deepspeed.managed_gradient_accumulation: false reduces only in step()")
    # fp16: DeepSpeed multiplies the loss by its loss scale; dividing by it first leaves the partitions the
    # unscaled gradient (exactly, for the dynamic scaler's powers of two), as the ZeRO 0-2 scorer takes it
    # (autograd, no loss scale)
    scale = float(getattr(zo, "loss_scale", 1.0) or 1.0)

    def backward(x):
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss / scale, scale_wrt_gas=False)  # the mean over batches is the scorer's

    try:
        yield backward
    finally:
        for v in build_views(engine, trainable_names(engine)):
            g = v.grad()
            if g is not None:
                v.set_grad_(torch.zeros_like(g))
        zo.zero_grad(set_to_none=True)
        if hasattr(zo, "averaged_gradients"):
            zo.averaged_gradients = {}
        # persistent parameters (below stage3_param_persistence_threshold) stay gathered after a backward, and the
        # mask is written to the shards (Stage3View.zero_model_): the next forward must gather them again, masked
        zo._partition_all_parameters()


def _compact_store(engine, sparse_engine, reduce_gradients: bool):
    """Compact state's store for the engine's ZeRO stage (masks already drawn and applied). ``reduce_gradients``
    False: gradient compression owns the reduction and hands the store the averaged ranges."""
    if engine.zero_optimization_stage() == 3:
        from dist_sparse.integration.compact_zero3 import CompactZero3State

        return CompactZero3State(engine, sparse_engine.sparsifier, sparse_engine.param_views, reduce_gradients,
                                 replicate_masks=sparse_engine.sparsity.replicate_masks)
    from dist_sparse.integration.compact_zero import CompactZeroState

    return CompactZeroState(engine, sparse_engine.sparsifier, sparse_engine.param_views, reduce_gradients,
                            replicate_masks=sparse_engine.sparsity.replicate_masks)


def _install_masked_grad_norm(engine, sparsifier) -> None:
    """Replace the ZeRO optimizer's ``get_grad_norm_direct`` with one that hands DeepSpeed's own norm only the
    trainable values of each sparsified gradient (active and not frozen, in mask order: the layout compact state
    packs them in) and each
    parameter's shard without ZeRO-3's padding. The pruned values are zeros, so the norm is the same number up to
    the order of the summation; what changes is that the order no longer depends on where the zeros sit, which on
    CPUs with wide bf16/fp32 kernels is what made masked-dense and compact state clip differently."""
    zo = engine.optimizer
    if not hasattr(zo, "get_grad_norm_direct"):
        return  # stage 0 / DeepSpeed's bf16 optimizer: no partitioned norm to align with compact state
    masked = {id(v.param): v for v in sparsifier.views}
    lengths = {id(v.param): v.mask_len for v in build_views(engine, trainable_names(engine)) if v.mask_len}

    def active(g, p):
        v = masked.get(id(p))
        n = lengths.get(id(p))
        flat = g.reshape(-1)
        if n is not None and flat.numel() > n:  # ZeRO-3's padded last shard
            flat = flat.narrow(0, 0, n)
        if v is None or flat.numel() != v.mask_len:
            return flat
        return flat[sparsifier.trainable_mask(v.name).to(flat.device)]  # frozen weights: not packed either

    original = zo.get_grad_norm_direct

    def get_grad_norm_direct(gradients, params, norm_type=2):
        # ZeRO-1/2 interleaves alignment padding (``_zero_padding``) with the parameters' gradients; DeepSpeed
        # skips it when it pairs gradients with parameters, and so must this
        grads = [g for g in gradients if not getattr(g, "_zero_padding", False)]
        return original([active(g, p) for g, p in zip(grads, params)], params, norm_type)

    patches.replace(zo, "get_grad_norm_direct", get_grad_norm_direct,
                    by="masked-dense sparsity: the norm over active values, as compact state computes it")


def initialize(model, config, model_parameters=None, optimizer=None, lr_scheduler=None, training_data=None,
               total_steps=None, seed=0, init_batches=None, **kwargs):
    """Like ``deepspeed.initialize``, for a DeepSpeed config (path or dict) that also carries a ``sparsity`` block
    (and optionally a ``compression`` block).

    The ``sparsity`` (and ``compression``) block is validated and stripped before DeepSpeed sees the config. Returns
    ``(engine, optimizer, training_dataloader, lr_scheduler)`` where ``engine`` is a :class:`SparseEngine`: use it
    exactly like a DeepSpeed engine (``engine(batch)``, ``engine.backward(loss)``, ``engine.step()``). When DeepSpeed
    builds the optimizer from the config, its parameter groups follow ``sparsity.parameterization`` (SμPar splits
    them by learning-rate scale and rescales the sparsified layers' initial weights: dist_sparse/parameterization.py).
    """
    ds_config, sparsity, compression = split_deepspeed_json(config)
    deepspeed = import_deepspeed()
    init_distributed()
    if model_parameters is None:
        model_parameters = model.parameters()
    if optimizer is None:  # DeepSpeed builds it from the config: SμPar's groups where it applies
        model_parameters = param_groups(model, sparsity, (ds_config.get("optimizer") or {}).get("type"),
                                        model_parameters)
    engine, opt, loader, sched = deepspeed.initialize(
        model=model, model_parameters=model_parameters, optimizer=optimizer, lr_scheduler=lr_scheduler,
        training_data=training_data, config=ds_config, **kwargs)
    return (attach(engine, model, sparsity, total_steps=total_steps, seed=seed, compression=compression,
                   init_batches=init_batches), opt, loader, sched)


def gathered_state_dict(engine) -> dict | None:
    """The full model state dict on rank 0 (``None`` elsewhere); at stage 3 the shards are gathered."""
    if engine.zero_optimization_stage() == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()
        return sd if D.rank() == 0 else None
    return engine.module.state_dict() if D.rank() == 0 else None
