"""Sparse training in a custom ``accelerate`` loop with a DeepSpeed plugin: one call after ``accelerator.prepare``.

::

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model = dist_sparse.accelerate.attach(accelerator, model, total_steps=steps)
    for batch in loader:
        loss = model(**batch).loss
        accelerator.backward(loss)     # our step runs here (accelerate calls the engine's backward and step)
        optimizer.step()               # accelerate's DeepSpeed wrapper: nothing left to do
        optimizer.zero_grad()

:func:`attach` is a thin adapter onto :func:`dist_sparse.integration.engine.attach`: it takes the DeepSpeed
engine ``prepare`` built, attaches the sparsifier (masks drawn and applied now), puts the returned
:class:`SparseEngine` in place of accelerate's engine reference (``accelerator.backward`` calls its ``backward``
and ``step``) and registers hooks so ``accelerator.save_state`` writes the masks and this run's sharded training
state into the checkpoint directory (``dist_sparse/`` plus ``sparsity_masks.safetensors``) and
``accelerator.load_state`` restores them after DeepSpeed loaded its own checkpoint. Use the returned engine in
place of the prepared model.

This module is ``dist_sparse.accelerate``; ``import accelerate`` below is the real package (absolute imports).
"""

import dataclasses
import logging
from pathlib import Path

from dist_sparse.config import CompressionConfig, ConfigError, SparsityConfig, _build, split_deepspeed_json
from dist_sparse.errors import CheckpointError

log = logging.getLogger("dist_sparse")

STATE_DIR = "dist_sparse"


def _blocks_from(accelerator) -> tuple:
    """The ``sparsity``/``compression`` blocks of the DeepSpeed plugin's config, validated."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    ds = getattr(plugin, "deepspeed_config", None)
    if not isinstance(ds, dict) or "sparsity" not in ds:
        raise ConfigError("sparsity", "no sparsity given to dist_sparse.accelerate.attach and the DeepSpeed plugin's "
                                      "config has no 'sparsity' block (pass sparsity=..., or add the block to the "
                                      "DeepSpeed config)")
    from dist_sparse.hf_trainer import split_trainer_deepspeed_config  # the same "auto"-tolerant checks

    return split_trainer_deepspeed_config(ds, where="the accelerate DeepSpeed plugin's config")


def _as_config(value, cls, key: str):
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return _build(cls, value, key)
    if isinstance(value, (str, Path)):  # a DeepSpeed config file carrying the block
        _, sparsity, compression = split_deepspeed_json(value)
        return sparsity if cls is SparsityConfig else compression
    raise ConfigError(key, f"expected a dict, a {cls.__name__} or a DeepSpeed config path, got {type(value).__name__}")


class _RunConfig:
    def __init__(self, sparsity, compression):
        self.sparsity, self.compression = sparsity, compression

    def to_dict(self) -> dict:
        return {"sparsity": dataclasses.asdict(self.sparsity), "compression": dataclasses.asdict(self.compression),
                "trainer": "accelerate"}


def attach(accelerator, model, sparsity=None, *, total_steps: int | None = None, seed: int = 0, compression=None,
           init_masks=None, max_skipped_steps: int = 5):
    """Attach sparse training to the DeepSpeed engine ``accelerator.prepare`` returned; returns the engine to use
    in place of ``model``.

    - ``accelerator``: the ``accelerate.Accelerator`` (with a DeepSpeed plugin) that prepared ``model``;
    - ``model``: what ``accelerator.prepare`` returned for the model (a DeepSpeed engine);
    - ``sparsity``: a dict or ``SparsityConfig`` (the keys of the ``sparsity`` section), a path of a DeepSpeed
      config carrying the block, or None: the ``sparsity`` block of the plugin's DeepSpeed config;
    - ``total_steps``: optimizer steps of the run (sets the default end of mask updates, 0.75 of it; without it
      ``sparsity.end_step`` is required for methods that update masks);
    - ``seed``: mask randomness when ``sparsity.seed`` is not set;
    - ``compression``: gradient compression (dict or ``CompressionConfig``; None: the plugin config's
      ``compression`` block when ``sparsity`` came from there, else off);
    - ``init_masks``: ``{name: bool tensor}`` to start from (else ``sparsity.init_masks``);
    - ``max_skipped_steps``: consecutive non-finite steps before training aborts.

    Compact state and compression work at ZeRO-1/2; compact state at ZeRO-3 is refused here, because
    ``load_state`` hands DeepSpeed's own checkpoint to the engine first, and at ZeRO-3 that checkpoint holds the
    fp32 sub-group partitions compact state replaces by packed tensors."""
    from dist_sparse.config import check_compact_state, check_compression_with_deepspeed
    from dist_sparse.integration import engine as ds_engine
    from dist_sparse.integration.experts import unregistered_zero3_experts

    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if wrapped is None:
        raise ConfigError("accelerate", "dist_sparse.accelerate.attach needs an Accelerator with a DeepSpeed plugin, "
                                        "called after accelerator.prepare(model, ...)")
    engine = wrapped.engine
    if model is not engine:
        raise ValueError("dist_sparse.accelerate.attach: pass the model accelerator.prepare returned (its DeepSpeed "
                         f"engine), got a {type(model).__name__}")
    if sparsity is None:
        sparsity_cfg, from_plugin = _blocks_from(accelerator)
        compression = from_plugin if compression is None else compression
    else:
        sparsity_cfg = _as_config(sparsity, SparsityConfig, "sparsity")
    compression_cfg = _as_config(compression, CompressionConfig, "compression") or CompressionConfig()
    # what the combination checks read, from the engine itself (the plugin config may still say "auto")
    plugin_ds = getattr(accelerator.state.deepspeed_plugin, "deepspeed_config", None) or {}
    zero = {**(plugin_ds.get("zero_optimization") or {}), "stage": engine.zero_optimization_stage()}
    opt_type = (plugin_ds.get("optimizer") or {}).get("type") or type(ds_engine.inner_optimizer(engine)).__name__
    ds = {"zero_optimization": zero, "optimizer": {"type": opt_type}, "bf16": {"enabled": engine.bfloat16_enabled()},
          "fp16": {"enabled": engine.fp16_enabled()}}
    check_compact_state(sparsity_cfg, ds)
    check_compression_with_deepspeed(compression_cfg, ds)
    stage = engine.zero_optimization_stage()
    if sparsity_cfg.compact_state and stage == 3:
        raise ConfigError("sparsity.compact_state", "with accelerate needs ZeRO stage 1 or 2, not 3: load_state "
                          "hands DeepSpeed's own checkpoint to the engine first, and at ZeRO-3 that checkpoint holds "
                          "the fp32 sub-group partitions compact state replaces by packed tensors")
    if stage == 3:
        missing = unregistered_zero3_experts(engine.module)
        if missing:
            raise ConfigError("accelerate", f"ZeRO-3 with fused MoE experts ({missing[0]}, ...): call "
                                            "dist_sparse.integration.experts.register_zero3_leaves(model) before "
                                            "accelerator.prepare, so DeepSpeed fetches each expert block as a unit")
    sparse = ds_engine.attach(engine, engine.module, sparsity_cfg, total_steps=total_steps, seed=seed,
                                   init_masks=init_masks, max_skipped_steps=max_skipped_steps,
                                   compression=compression_cfg)
    wrapped.engine = sparse  # accelerator.backward -> SparseEngine.backward and .step
    run_config = _RunConfig(sparsity_cfg, compression_cfg)

    def save_hook(models, weights, output_dir):
        from dist_sparse import checkpointing
        from dist_sparse import distributed as D
        from dist_sparse.masks.io import MASK_FILE, save_masks

        out = Path(output_dir)
        masks = sparse.sparsifier.full_masks()  # a collective: save_state runs on every process
        if D.rank() == 0 and masks:
            save_masks(out / MASK_FILE, masks)
        checkpointing.save_checkpoint(sparse, out / STATE_DIR, int(sparse.global_steps), run_config)

    def load_hook(models, input_dir):
        from dist_sparse import checkpoint, checkpointing

        root = Path(input_dir) / STATE_DIR
        if not root.is_dir():
            raise CheckpointError(root, "no dist_sparse training state in this accelerate checkpoint (saved before "
                                        "dist_sparse.accelerate.attach?); masks cannot be restored")
        step = checkpointing.restore(sparse, checkpoint.resolve("auto", root))
        log.info("dist_sparse.accelerate: restored masks and sparse training state of step %d from %s", step, root)

    # accelerate calls the save hook after DeepSpeed's save_checkpoint, the load hook after its load_checkpoint
    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    return sparse


__all__ = ["attach"]
