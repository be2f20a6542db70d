"""The only module that imports deepspeed: initialisation, access to each rank's partition, the step hooks.

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

The hooks: :class:`SparseEngine.step` runs ``Sparsifier.before_step`` at the gradient-accumulation boundary (after
DeepSpeed reduced the gradients into partitions, before it computes the norm for clipping), and the inner torch
optimizer's ``step`` is wrapped so that ``Sparsifier.after_optimizer_step`` masks the fp32 master weights before
DeepSpeed copies them into the model (and, for update steps that replace the optimizer step, the step is skipped).
"""

import math
import os

import torch

from dist_sparse import distributed as D
from dist_sparse.config import CompressionConfig, SparsityConfig, split_deepspeed_json
from dist_sparse.errors import DistSparseError
from dist_sparse.sparsifier import Sparsifier

_STATE_KEYS = ("exp_avg", "exp_avg_sq", "momentum_buffer")


def _import_deepspeed():
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    import deepspeed

    return deepspeed


def init_distributed(timeout_s: float = 600.0) -> None:
    """Start the process group the way DeepSpeed does (env vars, or MPI discovery), gloo on CPU, NCCL on GPU."""
    deepspeed = _import_deepspeed()
    if D.is_initialized():
        return
    D.discover_mpi_env()
    if "RANK" not in os.environ:  # a single process without a launcher
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    # The rendezvous store outlives a torchrun restart; without a per-attempt key prefix a restarted rank reads
    # the dead attempt's addresses and gloo's connect fails ("Connection refused").
    import torch.distributed as dist

    backend = D.backend_for_device()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # DeepSpeed creates its data-parallel groups with new_group() and no timeout, which falls back to torch's
    # module default (30 min): set that default too, so a hung peer fails every collective within timeout_s.
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = D.timeout(timeout_s)
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = D.timeout(timeout_s)
    store, rank, world = next(dist.rendezvous("env://", timeout=D.timeout(timeout_s)))
    store = dist.PrefixStore(f"dist_sparse/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world,
                            timeout=D.timeout(timeout_s))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=D.timeout(timeout_s))


# ----------------------------------------------------------------------------------------------------------------
# views: one per sparsified parameter, the only place that knows where DeepSpeed keeps things


class _View:
    model_needs_full_mask = False
    replicated = False  # True: every rank holds the whole tensor (and the whole mask)

    def __init__(self, name, param):
        self.name = name
        self.param = param
        self.shape = tuple(getattr(param, "ds_shape", param.shape))
        self.numel = math.prod(self.shape)

    def __repr__(self):
        return (f"{type(self).__name__}({self.name}, mask=[{self.mask_start}, +{self.mask_len}), "
                f"score=[{self.score_start}, +{self.score_len}))")


class ReplicatedView(_View):
    """ZeRO stage 0: full tensors on every rank."""

    replicated = True

    def __init__(self, name, param, master, inner_optimizer, rank, world):
        super().__init__(name, param)
        self.master_param = master
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

    def mul_master_(self, mask):
        self.master().masked_fill_(~mask, 0)

    def zero_state_(self, positions):
        for key, value in self.inner.state.get(self.master_param, {}).items():
            if key in _STATE_KEYS and torch.is_tensor(value) and value.numel() == self.numel:
                value.view(-1).masked_fill_(positions, 0)

    def zero_model_(self, mask, full_mask=None):
        if self.param is not self.master_param:
            self.param.data.view(-1).masked_fill_(~mask.to(self.param.device), 0)

    def state(self, key):
        value = self.inner.state.get(self.master_param, {}).get(key)
        return value.view(-1) if torch.is_tensor(value) and value.numel() == self.numel else None

    def model(self):
        return self.param.data.view(-1)


class FragmentView(_View):
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
        for key in _STATE_KEYS:
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


class Stage3View(_View):
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

    def mul_master_(self, mask):
        w = self.opt.get_local_fp32_param(self.param).view(-1)
        w[: self.mask_len].masked_fill_(~mask.to(w.device), 0)
        self.opt.set_local_hp_param(w, self.param)

    def zero_state_(self, positions):
        for key in _STATE_KEYS:
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
        return None  # partitioned: the shard is refreshed from the master weights (see load_model_weights)


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


_ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _optimizer_params(engine) -> list:
    """The tensors the inner optimizer steps. ZeRO-3 empties ``param_groups`` between steps and keeps its fp32
    sub-group partitions in ``fp32_partitioned_groups_flat``."""
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if flats is not None:
        return list(flats)
    return [p for group in inner_optimizer(engine).param_groups for p in group["params"]]


def ensure_optimizer_state(engine) -> list:
    """Create Adam's state (zero moments, step 0) where the optimizer has not created it yet, so a checkpoint can
    be loaded into a fresh engine. Returns the state keys. Only Adam-family optimizers are supported."""
    opt = inner_optimizer(engine)
    name = type(opt).__name__
    if "adam" not in name.lower():
        raise NotImplementedError(f"checkpoint/resume supports Adam-family optimizers, not {name}")
    for p in _optimizer_params(engine):
        state = opt.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            for key in _ADAM_KEYS:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return list(_ADAM_KEYS)


def optimizer_step_count(engine) -> float:
    opt = inner_optimizer(engine)
    for p in _optimizer_params(engine):
        step = opt.state.get(p, {}).get("step")
        if step is not None:
            return float(step)
    for group in opt.param_groups:
        if "step" in group:
            return float(group["step"])
    return 0.0


def set_optimizer_step_count(engine, value: float) -> None:
    opt = inner_optimizer(engine)
    for group in opt.param_groups:
        if "step" in group:
            group["step"] = type(group["step"])(value)
    for p in _optimizer_params(engine):
        state = opt.state.get(p)
        if state is not None and "step" in state:
            if torch.is_tensor(state["step"]):
                state["step"].fill_(value)
            else:
                state["step"] = type(state["step"])(value)


def refresh_partitioned_model(views) -> None:
    """ZeRO-3: write each rank's model shard from its fp32 master shard (other stages load the model directly)."""
    for v in views:
        if isinstance(v, Stage3View):
            shard = v.param.ds_tensor.data.view(-1)[: v.mask_len]
            shard.copy_(v.master().to(shard.dtype))


ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")


def engine_counters(engine) -> dict:
    return {k: int(getattr(engine, k)) for k in ENGINE_COUNTERS if hasattr(engine, k)}


def set_engine_counters(engine, counters: dict) -> None:
    for k, v in counters.items():
        setattr(engine, k, int(v))


# the state of DeepSpeed's loss scaler (fp16): without it a resumed run starts again from the initial scale and
# overflows its way down, so its losses differ from an uninterrupted run's
_SCALER_KEYS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def loss_scaler_state(engine) -> dict | None:
    """The fp16 loss scaler's state (None without fp16 loss scaling)."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if not engine.fp16_enabled() or scaler is None:
        return None
    return {k: getattr(scaler, k) for k in _SCALER_KEYS if hasattr(scaler, k)}


def set_loss_scaler_state(engine, state: dict | None) -> None:
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if state is None or scaler is None or not engine.fp16_enabled():
        return
    for k, v in state.items():
        if k in _SCALER_KEYS:
            setattr(scaler, k, v)


# ----------------------------------------------------------------------------------------------------------------
# the engine wrapper and initialize()


class NonFiniteError(DistSparseError, RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient on some rank."""


class SparseEngine:
    """A DeepSpeed engine whose ``step()`` keeps the weights sparse and skips non-finite steps on all ranks.

    Everything else is the engine's own. ``param_views`` are views of every trainable parameter (checkpointing
    and the finiteness check use them); ``sparsifier.views`` those of the sparsified ones.
    """

    def __init__(self, engine, sparsifier: Sparsifier, sparsity: SparsityConfig, max_skipped_steps: int = 5):
        sparse = {v.name: v for v in sparsifier.views}
        others = build_views(engine, [n for n in trainable_names(engine) if n not in sparse])
        self.__dict__.update(engine=engine, sparsifier=sparsifier, sparsity=sparsity,
                             param_views=sorted([*sparse.values(), *others], key=lambda v: v.name),
                             max_skipped_steps=max_skipped_steps, consecutive_skips=0, skipped_nonfinite=0,
                             _loss_finite=True, last_step_skipped=False, compact=None, state_bytes=None,
                             overflow_skips=0, last_step_overflow=False,  # fp16 loss-scale overflows
                             compression=None)  # issue 3: a ds_compression.CompressedReduction, set by attach()
        self.__dict__["inner_step"] = _wrap_inner_step(engine, sparsifier)

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def __setattr__(self, name, value):
        if name in self.__dict__:
            self.__dict__[name] = value
        else:
            setattr(self.engine, name, value)

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss, *args, **kwargs):
        self.__dict__["_loss_finite"] &= bool(torch.isfinite(loss.detach()).all())
        return self.engine.backward(loss, *args, **kwargs)

    def _grads_finite(self) -> bool:
        if self.compression is not None:  # compressed: check the full local gradient, before it enters a residual
            return self.compression.local_finite()
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
        # every rank learns whether any rank saw a non-finite loss or gradient, so all skip the same steps
        flags = torch.tensor([0 if self._loss_finite else 1, 0 if self._grads_finite() else 1], dtype=torch.int64)
        D.all_reduce_max(flags)
        loss_bad, grads_bad = bool(flags[0]), bool(flags[1])
        self.__dict__["_loss_finite"] = True
        self.__dict__["last_step_skipped"] = loss_bad or grads_bad
        self.__dict__["last_step_overflow"] = grads_bad and not loss_bad and self.engine.fp16_enabled()
        if self.last_step_overflow:
            return self._overflow_step(*args, **kwargs)
        if loss_bad or grads_bad:
            self._count_failed_step("had a non-finite loss or gradient on some rank", "aborting")
            for v in self.param_views:  # the step still runs (DeepSpeed's own bookkeeping) but changes nothing
                g = v.grad()
                if g is not None:
                    g.zero_()
            self.sparsifier.skip_optimizer_step = True
            if self.compression is not None:  # residuals stay untouched on a skipped step
                self.compression.discard()
            return self.engine.step(*args, **kwargs)
        self.__dict__["consecutive_skips"] = 0
        step = self.engine.global_steps
        if self.compression is not None:  # issue 3: the compressed exchange replaces DeepSpeed's reduction
            self.compression.reduce(step, self.sparsifier)
        self.sparsifier.before_step(step)
        method = self.sparsifier.method
        if method is None or not method.is_update_step(step):
            # memory accounting (issue 7): gradients exist only between backward and the step, so measure here
            from dist_sparse.integration.accounting import measure

            residuals = None if self.compression is None else self.compression.compression.feedback.buffers()
            self.__dict__["state_bytes"] = measure(self, residuals)
        return self.engine.step(*args, **kwargs)

    def _count_failed_step(self, what: str, advice: str) -> None:
        """A skipped step that counts against ``train.max_skipped_steps``; raises once that many come in a row."""
        self.__dict__["consecutive_skips"] += 1
        self.__dict__["skipped_nonfinite"] += 1
        if self.consecutive_skips >= self.max_skipped_steps:
            raise NonFiniteError(f"{self.consecutive_skips} consecutive steps {what} "
                                 f"(train.max_skipped_steps={self.max_skipped_steps}); {advice}")

    def _overflow_step(self, *args, **kwargs):
        """fp16: the loss is finite but the loss-scaled gradient overflowed. That is DeepSpeed's loss scaler's to
        handle: the gradients are left as they are, so DeepSpeed's step (or compact state's, which checks the same
        way) sees the overflow, skips the update and lowers the scale. Zeroing them, as a non-finite loss does,
        would hide the overflow from the scaler and the scale would never come down. The step changes nothing
        here either: no mask update (``before_step`` is not called), no optimizer step. With dynamic scaling the
        skips do not count against ``train.max_skipped_steps`` (DeepSpeed raises when the scale reaches its
        minimum); with a static scale every overflow is a failed step and counts."""
        self.__dict__["overflow_skips"] += 1
        if not self._dynamic_loss_scale():
            self._count_failed_step("overflowed with a static fp16 loss scale",
                                    "lower fp16.loss_scale or use dynamic scaling (fp16.loss_scale: 0)")
        self.sparsifier.skip_optimizer_step = True
        out = self.engine.step(*args, **kwargs)
        if not getattr(self.engine.optimizer, "overflow", True):  # DeepSpeed must have seen what every rank saw
            raise RuntimeError("a gradient overflow on some rank was not seen by DeepSpeed's loss scaler")
        return out


def _wrap_inner_step(engine, sparsifier: Sparsifier) -> list:
    """Wrap the inner optimizer's ``step`` (skipped on update steps that replace it; masters masked after it).
    Returns the one-element list holding the step the wrapper calls, so a component can replace the update rule
    itself while the wrapping stays (gradient compression's Adam momentum correction does)."""
    opt = inner_optimizer(engine)
    base = [opt.step]

    def step(*args, **kwargs):
        if sparsifier.skip_optimizer_step:
            return None
        out = base[0](*args, **kwargs)
        sparsifier.after_optimizer_step()
        return out

    opt.step = step
    return base


def attach(engine, model, sparsity: SparsityConfig, total_steps=None, seed=0, init_masks=None,
           max_skipped_steps: int = 5, compression: CompressionConfig | None = None) -> SparseEngine:
    """Attach a sparsifier to an initialised DeepSpeed engine (masks drawn and applied now), and the compressed
    gradient exchange when ``compression`` is enabled (docs/compression.md)."""
    from dist_sparse.integration.hf import sparsifiable_parameters

    names = sparsifiable_parameters(model, sparsity.params, sparsity.exclude) if sparsity.method != "none" else []
    views = build_views(engine, names)
    from dist_sparse.integration.experts import build_layer_method  # fused experts: one layer per expert matrix

    method = build_layer_method(sparsity, {v.name: v.shape for v in views}, total_steps,
                                sparsity.seed if sparsity.seed is not None else seed)
    sparsifier = Sparsifier(method, views)
    if init_masks is None and sparsity.init_masks is not None:
        from dist_sparse.masks.io import load_masks

        init_masks = load_masks(sparsity.init_masks)
    if method is not None or init_masks is not None:
        sparsifier.initialize(init_masks)
    wrapped = SparseEngine(engine, sparsifier, sparsity, max_skipped_steps)
    compressed = compression is not None and compression.enabled
    if sparsity.compact_state:  # issue 7: masters, moments and gradients only for active weights
        from dist_sparse.integration import compact_zero

        # with compression the compressed exchange owns the gradient reduction and writes into the compact store
        compact_zero.enable(engine, wrapped, reduce_gradients=not compressed)
    if compressed:
        from dist_sparse.integration.ds_compression import CompressedReduction

        wrapped.__dict__["compression"] = CompressedReduction(engine, wrapped.param_views, inner_optimizer(engine),
                                                              compression, seed, store=wrapped.compact)
        if wrapped.compression.adam is not None:  # Adam momentum correction replaces the update rule
            wrapped.inner_step[0] = wrapped.compression.adam.step
    return wrapped


def initialize(model, config, model_parameters=None, optimizer=None, lr_scheduler=None, training_data=None,
               total_steps=None, seed=0, **kwargs):
    """Like ``deepspeed.initialize``, for a DeepSpeed config (path or dict) that also carries a ``sparsity`` block
    (and optionally a ``compression`` block).

    The ``sparsity`` (and ``compression``) block is validated and stripped before DeepSpeed sees the config. Returns
    ``(engine, optimizer, training_dataloader, lr_scheduler)`` where ``engine`` is a :class:`SparseEngine`: use it
    exactly like a DeepSpeed engine (``engine(batch)``, ``engine.backward(loss)``, ``engine.step()``).
    """
    ds_config, sparsity, compression = split_deepspeed_json(config)
    deepspeed = _import_deepspeed()
    init_distributed()
    engine, opt, loader, sched = deepspeed.initialize(
        model=model, model_parameters=model_parameters if model_parameters is not None else model.parameters(),
        optimizer=optimizer, lr_scheduler=lr_scheduler, training_data=training_data, config=ds_config, **kwargs)
    return (attach(engine, model, sparsity, total_steps=total_steps, seed=seed, compression=compression), opt, loader,
            sched)


def gathered_state_dict(engine) -> dict | None:
    """The full model state dict on rank 0 (``None`` elsewhere); at stage 3 the shards are gathered."""
    if engine.zero_optimization_stage() == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()
        return sd if D.rank() == 0 else None
    return engine.module.state_dict() if D.rank() == 0 else None
