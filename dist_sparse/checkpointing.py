"""The checkpointer of a training run: what ``dist-sparse train`` saves at a step and restores on resume, gathered
from the engine (its components' ``state_dict``, every view's range of weights, moments and masks) and written by
:mod:`dist_sparse.checkpoint` (per-rank safetensors, manifest, commit marker). Also the final export."""

import logging
from pathlib import Path

import torch

from dist_sparse import checkpoint
from dist_sparse import distributed as D
from dist_sparse.config import Config
from dist_sparse.errors import CheckpointError
from dist_sparse.integration import hf, optim_state
from dist_sparse.integration.engine import gathered_state_dict
from dist_sparse.masks.io import save_masks

log = logging.getLogger("dist_sparse")


def save_final(engine, model, sparsifier, data, final_dir: Path) -> None:
    """Rank 0 writes a Hugging Face checkpoint (safetensors), the tokenizer and the masks; atomically."""
    masks = sparsifier.full_masks()  # collective
    state = gathered_state_dict(engine)  # collective at ZeRO-3
    if D.rank() != 0:
        return
    if sparsifier.masked_forward:  # dense master weights trained through a masked forward: export what it ran
        state = {k: (v * masks[k].to(v.device, v.dtype).reshape(v.shape) if k in masks else v) for k, v in
                 (state if state is not None else model.state_dict()).items()}
    writers = [data.tokenizer.save]  # tokenizer files next to the weights: from_pretrained finds both
    if masks:
        writers.append(lambda d: save_masks(d, masks))
    hf.save_pretrained_atomic(model, final_dir, state_dict=hf.to_cpu_state_dict(state), writers=writers)


@torch.no_grad()
def _apply_own_masks(engine) -> None:
    """After a rewind: the engine's masks over the loaded state (masters, moments, the model's copy)."""
    sp = engine.sparsifier
    for v in sp.views:
        mask = sp.mask(v.name).to(v.master().device)
        v.mul_master_(mask)
        v.zero_state_(~mask)
        v.zero_model_(mask, sp.full_mask(v.name) if v.model_needs_full_mask else None)


def save_checkpoint(engine, root: Path, step: int, cfg: Config, faults=None, data_state=None) -> Path:
    """Every rank writes its shard; rank 0 the model, trainer state, manifest and commit marker (see checkpoint)."""
    state_keys = optim_state.ensure_optimizer_state(engine)
    model_state = None
    if engine.zero_optimization_stage() < 3 and D.rank() == 0:
        model_state = engine.module.state_dict()
    scheduler = getattr(engine, "lr_scheduler", None)
    trainer_state = {
        "world_size": D.world_size(),
        "zero_stage": engine.zero_optimization_stage(),
        "optimizer_step": optim_state.optimizer_step_count(engine),
        "engine": optim_state.engine_counters(engine),
        "lr_scheduler": scheduler.state_dict() if scheduler is not None else None,
        **engine.training_state(),  # the step components' state_dict and the skip counters
        "loss_scaler": optim_state.loss_scaler_state(engine),  # fp16: resume at the same scale
        "config": cfg.to_dict(),
        "parameterization": engine.parameterization,  # SμPar's learning rates must continue as they were
        "data": data_state,  # the data position (WindowSampler.state_dict): a resume continues the same sequence
    }
    if engine.compression is not None:  # the residuals below belong to this scope and node layout
        trainer_state["compression_layout"] = engine.compression.layout_signature()
    extra = None
    if engine.compression is not None:  # this rank's error-feedback residuals (per-rank files)
        extra = {compression_file(D.rank()): (engine.compression.state_tensors(),
                                              {"world_size": str(D.world_size()), "rank": str(D.rank())})}
    return checkpoint.save(root, step, engine.param_views, engine.sparsifier, state_keys, model_state,
                           trainer_state, fault=faults, extra_files=extra)


def compression_file(rank: int) -> str:
    return f"compression_rank_{rank:05d}.safetensors"


def _restore_compression(engine, path: Path, saved_world: int, saved_layout: str) -> None:
    """Residuals are per-rank sums of what that rank did not send: they cannot be resharded meaningfully. On the
    same world size, scope and node layout each rank reloads its own; otherwise (or when the checkpoint has none)
    they restart at 0."""
    comp = engine.compression
    comp.masks_changed()  # the masks were just loaded: refresh the replicated copy the sender uses
    name = compression_file(D.rank())
    has = torch.tensor([1 if (path / name).is_file() else 0], dtype=torch.int64)
    D.all_reduce_sum(has)
    if saved_world != D.world_size() or int(has[0]) != D.world_size():
        log.warning("error-feedback residuals restart at 0: the checkpoint %s (written by %d ranks, resumed on %d)",
                    "has none" if int(has[0]) == 0 else "cannot be resharded", saved_world, D.world_size())
        return
    if saved_layout != comp.layout_signature():
        log.warning("error-feedback residuals restart at 0: the checkpoint's were kept for compression scope %s, "
                    "this run exchanges as %s", saved_layout, comp.layout_signature())
        return
    checkpoint.verify(path, [name])
    from safetensors.torch import load_file

    comp.load_state_tensors(load_file(str(path / name)))


def restore(engine, path: Path, rewind: bool = False) -> int:
    """Load a committed checkpoint into a freshly initialised engine; returns the step to continue from.

    ``rewind`` (lottery tickets, Frankle et al. 2020): the checkpoint is another run's; its weights, moments,
    learning-rate schedule, data position and step are taken, but the masks are the engine's own (drawn from
    ``sparsity.init_masks``): pruned positions' weights and moments are zeroed after the load."""
    state_keys = optim_state.ensure_optimizer_state(engine)
    state = checkpoint.load(path, engine.param_views, None if rewind else engine.sparsifier, state_keys)
    saved = state.get("parameterization", "standard")  # checkpoints from before SμPar trained standard
    if saved != engine.parameterization and not rewind:
        raise CheckpointError(path, f"the checkpoint was trained with sparsity.parameterization={saved!r}, this "
                                    f"run resolves it to {engine.parameterization!r}: set "
                                    f"sparsity.parameterization={saved} to continue it as it was trained")
    if engine.zero_optimization_stage() < 3:
        missing, unexpected = engine.module.load_state_dict(checkpoint.load_model_state(path), strict=False)
        if missing or unexpected:
            raise CheckpointError(path / checkpoint.MODEL_FILE, f"model weights do not match the model: missing "
                                  f"{missing[:3]}, unexpected {unexpected[:3]}")
    else:
        optim_state.refresh_partitioned_model(engine.param_views)
    if state["world_size"] != D.world_size():
        log.warning("checkpoint written by %d ranks, resuming on %d: masks, master weights and Adam moments are "
                    "resharded by range (exact); per-rank RNG states are not carried over", state["world_size"],
                    D.world_size())
    else:
        checkpoint.restore_rng(state)
    optim_state.set_optimizer_step_count(engine, state["optimizer_step"])
    optim_state.set_engine_counters(engine, state["engine"])
    scheduler = getattr(engine, "lr_scheduler", None)
    if scheduler is not None and state.get("lr_scheduler") is not None:
        scheduler.load_state_dict(state["lr_scheduler"])
    if rewind:
        _apply_own_masks(engine)
    else:
        engine.load_training_state(state)
    if engine.compression is not None:
        # checkpoints from before the inter-node scope hold flat-scope residuals
        _restore_compression(engine, path, int(state["world_size"]), state.get("compression_layout", "all"))
    optim_state.set_loss_scaler_state(engine, state.get("loss_scaler"))
    return int(state["step"])
