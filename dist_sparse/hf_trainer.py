"""Sparse training under the Hugging Face ``Trainer``: one callback onto the same engine ``dist-sparse train`` uses.

Usage (the DeepSpeed config ``ds.json`` carries our ``sparsity`` block, and optionally ``compression``)::

    trainer = Trainer(model=model, args=TrainingArguments(..., deepspeed="ds.json"), train_dataset=data)
    SparsityCallback(trainer)          # registers itself with the trainer
    trainer.train()

Without the callback nothing of ours runs: DeepSpeed ignores top-level keys it does not know, so the block alone
trains dense, silently. With it:

- construction (before any engine exists): the ``sparsity``/``compression`` blocks are validated like
  ``dist_sparse.initialize`` does (a missing ``sparsity`` block is a ConfigError) and removed from the DeepSpeed
  config dicts the Trainer and accelerate hand to ``deepspeed.initialize`` (``args.hf_deepspeed_config``, the
  accelerate plugin's), so DeepSpeed never sees keys that are not its own; under ZeRO-3 the fused MoE expert
  modules are registered as leaf modules;
- ``on_train_begin`` (the Trainer has built the DeepSpeed engine and, on resume, loaded DeepSpeed's checkpoint):
  :func:`dist_sparse.integration.engine.attach` on that engine, which is put in place of accelerate's engine
  reference, so ``accelerator.backward`` (which calls the engine's ``backward`` and ``step``) runs our
  :class:`SparseEngine` step: masks sharded like the optimizer state, pruned weights exactly 0 after every step,
  mask updates at the method's steps (``global_steps``), the non-finite step skip. On resume, the callback's own
  checkpoint state (below) is restored on top: masks, fp32 master weights, Adam moments, sparsifier state,
  compression residuals, exactly as ``dist-sparse train --resume`` does;
- every Trainer checkpoint (``checkpoint-N/``) gets ``sparsity_masks.safetensors`` and ``dist_sparse/`` (this
  run's sharded training state in dist_sparse's checkpoint format, docs/reliability.md); ``save_model`` writes the
  model (its pruned weights are 0) and ``sparsity_masks.safetensors``;
- Trainer's training logs (``trainer.state.log_history`` and every ``report_to`` backend) gain ``sparsity``,
  ``sparsity/density``, ``sparsity/churn`` (of the latest mask update), ``sparsity/mask_updates``,
  ``sparsity/flops_relative_to_dense`` and ``sparsity/skipped_steps``.

Compact state and gradient compression work at ZeRO-1/2. ZeRO-3 with compact state is refused: the Trainer resumes
through DeepSpeed's own checkpoint before any callback runs, and at ZeRO-3 that checkpoint stores the fp32
sub-group partitions compact state replaces by packed tensors, which DeepSpeed cannot load back
(``_rigid_load_state_dict`` copies them into dense ones). Compression at ZeRO-3 is refused as everywhere.
"""

import copy
import dataclasses
import logging
from pathlib import Path

from transformers import TrainerCallback

from dist_sparse import distributed as D
from dist_sparse.config import ConfigError, split_deepspeed_json
from dist_sparse.errors import CheckpointError

log = logging.getLogger("dist_sparse")

OUR_BLOCKS = ("sparsity", "compression")
STATE_DIR = "dist_sparse"  # inside each checkpoint-N/
_BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def split_trainer_deepspeed_config(ds: dict, where: str = "TrainingArguments.deepspeed") -> tuple:
    """Validate our blocks in a Trainer's DeepSpeed config (a dict, ``"auto"`` values allowed where the Trainer
    fills them in); returns ``(SparsityConfig, CompressionConfig)``. A config without a ``sparsity`` block, or a
    combination the Trainer cannot serve, is a ConfigError."""
    if not isinstance(ds, dict) or "sparsity" not in ds:
        raise ConfigError("sparsity", f"the DeepSpeed config given as {where} has no 'sparsity' block; "
                                      "SparsityCallback trains sparse only from that block (add e.g. "
                                      '"sparsity": {"method": "rigl", "sparsity": 0.9})')
    checked = {k: v for k, v in copy.deepcopy(ds).items() if not (k in _BATCH_KEYS and v == "auto")}
    for flag in ("fp16", "bf16"):  # the Trainer resolves "auto" from its own arguments
        if isinstance(checked.get(flag), dict) and checked[flag].get("enabled") == "auto":
            checked[flag] = {**checked[flag], "enabled": False}
    zero = checked.get("zero_optimization") or {}
    if isinstance(zero, dict) and zero.get("stage") == "auto":
        raise ConfigError("deepspeed.zero_optimization.stage", "must be set (0..3) for SparsityCallback, not 'auto'")
    _, sparsity, compression = split_deepspeed_json(checked)
    stage = int(zero.get("stage", 0)) if isinstance(zero, dict) else 0
    if sparsity.compact_state and stage == 3:
        raise ConfigError("sparsity.compact_state", "under the Hugging Face Trainer needs ZeRO stage 1 or 2, not 3: "
                          "the Trainer resumes through DeepSpeed's own checkpoint before any callback runs, and at "
                          "ZeRO-3 that checkpoint holds the fp32 sub-group partitions that compact state replaces "
                          "by packed tensors, which DeepSpeed cannot load back into dense ones; use stage 2, or "
                          "dist-sparse train (its own checkpoints) for compact state at ZeRO-3")
    return sparsity, compression


def _deepspeed_dicts(trainer) -> list:
    """Every DeepSpeed config dict that may reach ``deepspeed.initialize`` (the same dict, mostly)."""
    found = []
    hf_cfg = getattr(trainer.args, "hf_deepspeed_config", None)
    plugins = [getattr(trainer.args, "deepspeed_plugin", None),
               getattr(getattr(trainer.accelerator, "state", None), "deepspeed_plugin", None)]
    for holder in [hf_cfg, *plugins, *(getattr(p, "hf_ds_config", None) for p in plugins)]:
        for attr in ("config", "deepspeed_config"):
            d = getattr(holder, attr, None)
            if isinstance(d, dict) and all(d is not f for f in found):
                found.append(d)
    return found


def _original_config(given) -> dict | None:
    """``TrainingArguments.deepspeed`` as the user gave it (a dict, or a JSON file), when it carries the block."""
    if isinstance(given, dict):
        return copy.deepcopy(given) if "sparsity" in given else None
    if isinstance(given, (str, Path)) and Path(given).is_file():
        from dist_sparse.config import read_file

        raw = read_file(Path(given))
        return raw if isinstance(raw, dict) and "sparsity" in raw else None
    return None


class _RunConfig:
    """What a dist_sparse checkpoint records of the run's config (``trainer.json``'s ``config``)."""

    def __init__(self, sparsity, compression, ds: dict):
        self.sparsity, self.compression, self.ds = sparsity, compression, ds

    def to_dict(self) -> dict:
        return {"sparsity": dataclasses.asdict(self.sparsity), "compression": dataclasses.asdict(self.compression),
                "deepspeed": self.ds, "trainer": "transformers.Trainer"}


class SparsityCallback(TrainerCallback):
    """Sparse training for a Hugging Face ``Trainer`` whose DeepSpeed config carries a ``sparsity`` block.

    ``SparsityCallback(trainer)`` validates the block, registers the callback first in the trainer's callback list
    (so the reporting callbacks see our log keys) and wraps ``trainer.train`` (to know the checkpoint a run resumes
    from), ``trainer.save_model`` (masks next to the weights; the sharded state in checkpoints) and
    ``trainer.log`` (our metrics). ``max_skipped_steps``: consecutive non-finite steps before training aborts
    (``train.max_skipped_steps`` of ``dist-sparse train``)."""

    def __init__(self, trainer=None, max_skipped_steps: int = 5):
        if not hasattr(trainer, "callback_handler") or not hasattr(trainer, "accelerator"):
            # Trainer(callbacks=[SparsityCallback]) builds it without arguments: a callback's events never see the
            # trainer's DeepSpeed engine or save_model, which sparse training must reach
            raise TypeError("SparsityCallback needs the transformers.Trainer it drives: build the trainer, then "
                            "call SparsityCallback(trainer) (it registers itself; not via callbacks=)")
        if not getattr(trainer, "is_deepspeed_enabled", False):
            raise ConfigError("TrainingArguments.deepspeed", "SparsityCallback needs a DeepSpeed config "
                                                             "(TrainingArguments(deepspeed='ds.json')) carrying the "
                                                             "'sparsity' block")
        if any(isinstance(cb, SparsityCallback) for cb in trainer.callback_handler.callbacks):
            raise ValueError("this trainer already has a SparsityCallback")
        dicts = _deepspeed_dicts(trainer)
        source = next((d for d in dicts if "sparsity" in d), None)
        if source is None:  # TrainingArguments reused after an earlier callback removed the block: the original
            source = _original_config(trainer.args.deepspeed) or (dicts[0] if dicts else None)
        self.sparsity, self.compression = split_trainer_deepspeed_config(source)
        self.ds_config = {k: v for k, v in source.items() if k not in OUR_BLOCKS}
        for d in dicts:  # DeepSpeed's config parser must never see keys that are not its own
            for key in OUR_BLOCKS:
                d.pop(key, None)
        self.trainer = trainer
        self.max_skipped_steps = max_skipped_steps
        self.engine = None  # the SparseEngine, from on_train_begin
        self._base = None  # the DeepSpeed engine it wraps
        self._resume = None
        self._seq_len = None
        self._metrics = {}
        stage = int((self.ds_config.get("zero_optimization") or {}).get("stage", 0))
        if stage == 3:
            from dist_sparse.integration.experts import register_zero3_leaves

            register_zero3_leaves(trainer.model)
        trainer.callback_handler.callbacks.insert(0, self)
        self._wrap_trainer(trainer)
        trainer.model.register_forward_pre_hook(self._record_seq_len, with_kwargs=True)

    # -- the trainer's methods we extend -----------------------------------------------------------------------
    def _wrap_trainer(self, trainer) -> None:
        train, save_model, log_fn = trainer.train, trainer.save_model, trainer.log

        def wrapped_train(resume_from_checkpoint=None, *args, **kwargs):
            self._resume = resume_from_checkpoint
            if isinstance(resume_from_checkpoint, bool):
                from transformers.trainer_utils import get_last_checkpoint

                self._resume = get_last_checkpoint(trainer.args.output_dir) if resume_from_checkpoint else None
            return train(resume_from_checkpoint, *args, **kwargs)

        def wrapped_save_model(output_dir=None, _internal_call=False):
            save_model(output_dir, _internal_call=_internal_call)
            self._save_sparse(Path(output_dir or trainer.args.output_dir), checkpoint=_internal_call)

        def wrapped_log(logs, *args, **kwargs):
            if self.engine is not None and ("loss" in logs or "train_loss" in logs):
                logs.update(self._metrics)
            return log_fn(logs, *args, **kwargs)

        trainer.train, trainer.save_model, trainer.log = wrapped_train, wrapped_save_model, wrapped_log

    def _record_seq_len(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and hasattr(ids, "shape") and len(ids.shape) >= 2:
            self._seq_len = int(ids.shape[-1])

    def _save_sparse(self, out: Path, checkpoint: bool) -> None:
        """Masks beside the weights (every rank gathers: a collective) and, for a checkpoint, the sharded state."""
        if self.engine is None:
            return
        from dist_sparse import checkpointing
        from dist_sparse.masks.io import MASK_FILE, save_masks

        masks = self.engine.sparsifier.full_masks()
        if self.trainer.args.should_save and masks:
            out.mkdir(parents=True, exist_ok=True)
            save_masks(out / MASK_FILE, masks)
        if checkpoint:
            step = int(self.trainer.state.global_step)
            checkpointing.save_checkpoint(self.engine, out / STATE_DIR, step,
                                        _RunConfig(self.sparsity, self.compression, self.ds_config))

    # -- events --------------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer.callback_handler.callbacks.count(self) > 1:
            raise ValueError("SparsityCallback was added to the trainer twice (SparsityCallback(trainer) registers "
                             "it already; do not pass it to add_callback or callbacks=)")
        base = trainer.model_wrapped
        if base is self._base and self.engine is not None:
            return
        if type(base).__name__ != "DeepSpeedEngine":
            raise ConfigError("TrainingArguments.deepspeed", f"SparsityCallback found no DeepSpeed engine (the "
                                                             f"trained model is a {type(base).__name__})")
        from dist_sparse.integration import engine as ds_engine

        engine = ds_engine.attach(base, trainer.model, self.sparsity, total_steps=state.max_steps,
                                       seed=args.seed, max_skipped_steps=self.max_skipped_steps,
                                       compression=self.compression)
        wrapped = trainer.accelerator.deepspeed_engine_wrapped
        if wrapped is None or wrapped.engine is not base:
            raise RuntimeError("accelerate's DeepSpeed engine is not the Trainer's: cannot route backward/step")
        wrapped.engine = engine  # accelerator.backward -> SparseEngine.backward and .step
        self.engine, self._base = engine, base
        if self._resume is not None:
            self._restore(Path(self._resume))
        self._flops_sum, self._flops_steps, self._seen_updates = 0.0, 0, -1
        self._refresh_metrics(done_step=None)

    def _restore(self, checkpoint_dir: Path) -> None:
        from dist_sparse import checkpoint, checkpointing

        root = checkpoint_dir / STATE_DIR
        if not root.is_dir():
            raise CheckpointError(root, "no dist_sparse training state in this Trainer checkpoint (was it written "
                                        "without SparsityCallback?); masks and sparse state cannot be restored")
        step = checkpointing.restore(self.engine, checkpoint.resolve("auto", root))
        if step != int(self.trainer.state.global_step):
            raise CheckpointError(root, f"holds step {step}, the Trainer resumes at step "
                                        f"{self.trainer.state.global_step}")
        log.info("SparsityCallback: restored masks and sparse training state of step %d from %s", step, root)

    def on_step_end(self, args, state, control, **kwargs):
        if self.engine is not None:
            self._refresh_metrics(done_step=self.engine.global_steps - 1)

    def _refresh_metrics(self, done_step) -> None:
        """Every rank runs this after each optimizer step (the densities are a collective when masks changed); the
        log wrapper only reads the cached values, so logging adds no collective. The step just done counts at the
        densities it ran with (those before a mask update at its end), as in ``dist-sparse train``."""
        sp = self.engine.sparsifier
        if not sp.views:
            self._metrics = {}
            return
        if done_step is not None:
            self._update_flops()  # the sequence length is known from the first forward on
            # RigL's update step (and its growth window) computes the dense gradient too
            extra = self._dense_grad_flops if self.engine.schedule.plan(done_step).dense_grad else 0.0
            self._flops_sum += (self._sparse_flops + extra) / self._dense_flops
            self._flops_steps += 1
        if sp.updates_done != self._seen_updates:
            self._seen_updates = sp.updates_done
            self._densities = sp.layer_density()
        self._update_flops()
        total = sp.sparsified_numel()
        density = sum(self._densities[v.name] * v.numel for v in sp.views) / max(1, total)
        self._metrics = {"sparsity": 1.0 - density, "sparsity/density": density,
                         "sparsity/mask_updates": sp.updates_done,
                         "sparsity/skipped_steps": self.engine.skipped_nonfinite}
        if sp.last_update is not None:
            self._metrics["sparsity/churn"] = sp.last_update["churn"]
        if self._flops_steps:
            self._metrics["sparsity/flops_relative_to_dense"] = self._flops_sum / self._flops_steps

    def _update_flops(self) -> None:
        """FLOPs per token at the cached densities; they change only with the masks or the sequence length."""
        from dist_sparse.integration import hf

        sp, model = self.engine.sparsifier, self.trainer.model
        seq = self._seq_len or int(getattr(model.config, "max_position_embeddings", 0) or 0)
        key = (seq, self._seen_updates)
        if getattr(self, "_flops_key", None) == key:
            return
        n_layer, n_embd = model.config.num_hidden_layers, model.config.hidden_size
        self._flops_key = key
        self._dense_flops = hf.training_flops_per_token(model, {}, seq, n_layer, n_embd)
        self._sparse_flops = hf.training_flops_per_token(model, self._densities, seq, n_layer, n_embd)
        self._dense_grad_flops = 2.0 * sum(v.numel * (1.0 - self._densities[v.name]) for v in sp.views)

    def on_train_end(self, args, state, control, **kwargs):
        if self.engine is not None and D.rank() == 0:
            log.info("SparsityCallback: %d mask updates, sparsity %.4f", self.engine.sparsifier.updates_done,
                     self._metrics.get("sparsity", 0.0))


__all__ = ["SparsityCallback", "split_trainer_deepspeed_config"]
