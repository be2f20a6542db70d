"""The optimizer-side training state of a DeepSpeed engine that checkpoints need: Adam's state, its step count,
the engine's counters and the fp16 loss scaler. Reads DeepSpeed's attributes; does not import deepspeed."""

import torch

from dist_sparse.integration.views import ADAM_KEYS, Stage3View, inner_optimizer


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
            for key in ADAM_KEYS:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return list(ADAM_KEYS)


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

