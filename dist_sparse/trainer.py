"""The training loop, top to bottom: data -> engine forward/backward/step -> sparsifier -> metrics -> checkpoint.

Run on every rank (``dist-sparse train`` starts the ranks). All mask logic happens inside ``engine.step()`` (see
:class:`dist_sparse.integration.deepspeed.SparseEngine`); this file only drives the loop and reports.
"""

import copy
import logging
import math
import os
import time
import warnings
from pathlib import Path

import torch

from dist_sparse import checkpoint
from dist_sparse import distributed as D
from dist_sparse.config import Config
from dist_sparse.data import TextData
from dist_sparse.errors import CheckpointError, DistSparseError
from dist_sparse.faults import Faults
from dist_sparse.integration import deepspeed as ds_integration
from dist_sparse.integration import hf
from dist_sparse.masks.io import save_masks
from dist_sparse.metrics import MetricsLogger, StepTimer, max_over_ranks, peak_rss_mb, rss_anon_mb, write_json_atomic
from dist_sparse.prepared import WindowSampler, training_data, vocab_size

log = logging.getLogger("dist_sparse")

DEFAULT_OPTIMIZER = {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 0.1}}


def deepspeed_config(cfg: Config) -> dict:
    """The user's DeepSpeed config with the defaults a run needs filled in (the user's values always win)."""
    ds = copy.deepcopy(cfg.deepspeed)
    ds.setdefault("train_micro_batch_size_per_gpu", 8)
    ds.setdefault("gradient_accumulation_steps", 1)
    ds.setdefault("optimizer", copy.deepcopy(DEFAULT_OPTIMIZER))
    ds.setdefault("steps_per_print", 10**9)  # we log ourselves
    ds.setdefault("zero_optimization", {"stage": 0})
    if D.backend_for_device() == "gloo":
        # DeepSpeed's fused Adam needs CUDA; on CPU use torch's implementation of the same optimizer
        ds["optimizer"].setdefault("params", {}).setdefault("torch_adam", True)
    return ds


def param_groups(model) -> list:
    """Weight decay on matrices (and embeddings), none on biases and norms (the usual GPT recipe)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def set_threads(cfg: Config) -> None:
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))


@torch.no_grad()
def evaluate(engine, data: TextData, batches: int, micro_batch: int) -> float:
    """Mean validation loss over a fixed, world-size independent set of batches (split across ranks)."""
    engine.eval()
    rank, world = D.rank(), D.world_size()
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(math.ceil(batches / world)):
        j = i * world + rank
        x = data.batch("val", j % batches, 0, 0, micro_batch).to(engine.device)
        loss = engine(input_ids=x, labels=x).loss  # every rank runs the forward: ZeRO-3 gathers collectively
        if j < batches:
            total += torch.tensor([float(loss), 1.0], dtype=torch.float64)
    D.all_reduce_sum(total)
    engine.train()
    return float(total[0] / total[1])


class PeerTimeoutError(DistSparseError, RuntimeError):
    """A collective did not complete within ``train.dist_timeout_s``: a peer hung or died."""


def train(cfg: Config, resume: str | None = None) -> dict:
    """Train on every rank; returns the summary (also written to ``<output_dir>/summary.json`` by rank 0).

    ``resume``: a checkpoint directory or ``auto`` (the newest committed one under ``<output_dir>/checkpoints``).
    """
    set_threads(cfg)
    # DeepSpeed's ZeRO all-gathers call torch's deprecated all_gather_into_tensor every step, and torch warns on
    # every call: thousands of identical lines per rank that bury the training log
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    ds_integration.init_distributed(cfg.train.dist_timeout_s)
    try:
        summary = _train(cfg, resume)
        D.shutdown()
        return summary
    except RuntimeError as exc:
        text = str(exc)
        if "imed out" in text or "Timeout" in text or "timeout" in text:
            raise PeerTimeoutError(f"a collective did not finish within train.dist_timeout_s="
                                   f"{cfg.train.dist_timeout_s:g}s: a peer rank hung or died ({text[:300]})") from exc
        raise


def _resume_target(cfg: Config, resume: str | None, ckpt_root: Path):
    """Which checkpoint to start from. A torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) resumes from the newest
    committed checkpoint when one exists; an explicit target that is missing or uncommitted is an error."""
    if resume is None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        found = checkpoint.committed_checkpoints(ckpt_root)
        if found:
            log.info("restart %s: resuming from the newest committed checkpoint %s",
                     os.environ["TORCHELASTIC_RESTART_COUNT"], found[-1])
            return found[-1]
        log.info("restart %s: no committed checkpoint yet under %s, starting from step 0",
                 os.environ["TORCHELASTIC_RESTART_COUNT"], ckpt_root)
        return None
    return checkpoint.resolve(resume, ckpt_root) if resume is not None else None


def _train(cfg: Config, resume: str | None) -> dict:
    rank, world = D.rank(), D.world_size()
    is_main = rank == 0
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format="[dist_sparse] %(message)s")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    out_dir = Path(cfg.train.output_dir)
    ckpt_root = out_dir / "checkpoints"
    resume_path = _resume_target(cfg, resume, ckpt_root)  # before any work: a bad target fails fast
    faults = Faults.from_env(rank)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "config.json", cfg.to_dict())

    # same seed on every rank: identical initial weights everywhere (ZeRO partitions them afterwards)
    torch.manual_seed(cfg.train.seed)
    data = training_data(cfg)  # prepared shards (memory-mapped) or text
    model = hf.build_causal_lm(cfg.model, vocab_size(data), cfg.attention)
    ds_config = deepspeed_config(cfg)
    deepspeed = ds_integration._import_deepspeed()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=ds_config)
    engine = ds_integration.attach(engine, model, cfg.sparsity, total_steps=cfg.train.steps, seed=cfg.train.seed,
                                   max_skipped_steps=cfg.train.max_skipped_steps, compression=cfg.compression)
    sparsifier = engine.sparsifier
    start_step = 0
    if resume_path is not None:
        start_step = restore(engine, resume_path)
        if is_main:
            log.info("resumed from %s at step %d", resume_path, start_step)
    micro, accum = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    tokens_per_step = world * micro * accum * cfg.model.block_size
    # which windows each (step, rank, micro-batch) reads; its position is saved with every checkpoint
    sampler = WindowSampler(data, cfg.data.sampling, cfg.model.block_size, cfg.train.seed, world, micro, accum)
    sampler.load_state_dict(checkpoint.read_trainer_state(resume_path).get("data") if resume_path else None,
                            start_step)

    densities = sparsifier.layer_density() if sparsifier.views else {}
    # sizes from the model itself (a pretrained checkpoint overrides the model section's sizes)
    n_layer, n_embd = model.config.num_hidden_layers, model.config.hidden_size
    dense_flops = hf.training_flops_per_token(model, {}, cfg.model.block_size, n_layer, n_embd)

    def flops_for(dens: dict) -> tuple:
        """(FLOPs per token at these densities, extra FLOPs of a dense-gradient step); they change only with masks."""
        return (hf.training_flops_per_token(model, dens, cfg.model.block_size, n_layer, n_embd),
                2.0 * sum(v.numel * (1.0 - dens[v.name]) for v in sparsifier.views))

    sparse_flops, dense_grad_extra = flops_for(densities)
    if is_main:
        n_params = hf.count_parameters(model)
        log.info("model %s: %.2fM parameters, %d sparsified tensors (%.2fM weights), method=%s sparsity=%.2f "
                 "distribution=%s, ZeRO-%d, %d ranks, data: %s", cfg.model.type, n_params / 1e6,
                 len(sparsifier.views), sparsifier.sparsified_numel() / 1e6, cfg.sparsity.method,
                 cfg.sparsity.sparsity, cfg.sparsity.distribution, engine.zero_optimization_stage(), world,
                 data.source)

    metrics = MetricsLogger(out_dir, cfg.train.tensorboard, enabled=is_main)
    progress = None
    if is_main and cfg.train.progress:
        from tqdm import tqdm

        progress = tqdm(total=cfg.train.steps, desc=f"train {cfg.sparsity.method}", unit="step", dynamic_ncols=True)

    if progress is not None:
        progress.update(start_step)
    timer, flops_sum, last_loss, val_loss = StepTimer(), 0.0, float("nan"), None
    fetch_timer = StepTimer()  # the data loader's share of each step, timed directly
    for step in range(start_step, cfg.train.steps):
        faults.maybe("kill", step)
        faults.maybe("hang", step)
        t0 = time.perf_counter()
        is_update = sparsifier.method is not None and sparsifier.method.is_update_step(step)
        uses_dense_grad = sparsifier.method is not None and sparsifier.uses_dense_grad(step)
        loss_sum, fetch = 0.0, 0.0
        for m in range(accum):
            t_fetch = time.perf_counter()
            x = sampler.batch(step, rank, m).to(engine.device)
            fetch += time.perf_counter() - t_fetch
            loss = engine(input_ids=x, labels=x).loss
            if faults.active("nan", step):
                loss = loss * float("nan")
            engine.backward(loss)
            engine.step()
            loss_sum += float(loss.detach())
        if engine.last_step_overflow:  # fp16: routine while the loss scaler finds its level
            log.info("step %d skipped: fp16 gradient overflow, loss scale now %g", step, engine.optimizer.loss_scale)
        elif engine.last_step_skipped:
            log.warning("step %d skipped on every rank: non-finite loss or gradient (%d in a row)", step,
                        engine.consecutive_skips)
        timer.add(time.perf_counter() - t0)
        fetch_timer.add(fetch)
        last_loss = loss_sum / accum

        # estimated training FLOPs of this step relative to dense (a RigL update step, and with grow_grad_steps > 1
        # the steps of its window, compute a dense gradient)
        flops_sum += sparse_flops + (dense_grad_extra if uses_dense_grad else 0.0)
        if is_update:
            densities = sparsifier.layer_density()
            sparse_flops, dense_grad_extra = flops_for(densities)

        done = step + 1
        if cfg.train.save_interval and done % cfg.train.save_interval == 0 and done != cfg.train.steps:
            save_checkpoint(engine, ckpt_root, done, cfg, faults, data_state=sampler.state_dict(done))
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{last_loss:.3f}")
        if done % cfg.train.eval_interval == 0 and done != cfg.train.steps:
            val_loss = evaluate(engine, data, cfg.train.eval_batches, micro)
            metrics.log(done, {"val_loss": val_loss})
        if done % cfg.train.log_interval == 0 or done == cfg.train.steps:
            record = {"loss": last_loss, "lr": engine.get_lr()[0], "step_seconds": timer.times[-1],
                      "tokens_per_second": tokens_per_step / timer.times[-1],
                      "flops_relative_to_dense": flops_sum / ((done - start_step) * dense_flops),
                      "peak_rss_mb": peak_rss_mb(), "tokens_seen": sampler.tokens_seen(done)}
            if sparsifier.views:
                record["sparsity"] = 1.0 - sum(densities[v.name] * v.numel for v in sparsifier.views) / max(
                    1, sparsifier.sparsified_numel())
                record["layer_density"] = densities
            if sparsifier.last_update is not None:
                record["mask_update"] = sparsifier.last_update
            metrics.log(done, record)

    if progress is not None:
        progress.close()
    val_loss = evaluate(engine, data, cfg.train.eval_batches, micro)
    summary = {
        "final_val_loss": val_loss,
        "final_train_loss": last_loss,
        "steps": cfg.train.steps,
        "world_size": world,
        "zero_stage": engine.zero_optimization_stage(),
        "method": cfg.sparsity.method,
        "distribution": cfg.sparsity.distribution,
        "target_sparsity": cfg.sparsity.sparsity if cfg.sparsity.method != "none" else 0.0,
        "achieved_sparsity": sparsifier.achieved_sparsity() if sparsifier.views else 0.0,
        "layer_density": sparsifier.layer_density() if sparsifier.views else {},
        "median_step_seconds": timer.median(),
        "tokens_per_second": tokens_per_step / timer.median(),
        "peak_rss_mb": max_over_ranks(peak_rss_mb()),
        "flops_relative_to_dense": flops_sum / (max(1, cfg.train.steps - start_step) * dense_flops),
        "skipped_steps": engine.skipped_nonfinite,
        "fp16_overflow_steps": engine.overflow_skips,  # skipped by DeepSpeed's loss scaler (fp16 only)
        "resumed_from": str(resume_path) if resume_path is not None else None,
        "mask_updates": sparsifier.updates_done,
        "sparsified_parameters": sparsifier.sparsified_numel(),
        "total_parameters": hf.count_parameters(model),
        "data": data.source,
        "data_sampling": cfg.data.sampling,
        "tokens_seen": sampler.tokens_seen(cfg.train.steps),  # training tokens read, over all runs of a resume chain
        "data_epochs": sampler.epochs(cfg.train.steps),  # passes over the training tokens (fractional)
        "median_data_fetch_seconds": fetch_timer.median(),  # rank 0's batch fetch per step (all micro-batches)
        "rss_anon_mb": max_over_ranks(rss_anon_mb()),  # anonymous resident memory at the end, max over ranks
        **_comm_summary(engine, cfg.train.steps - start_step),
        **state_bytes_summary(engine),  # issue 7: memory accounting (a collective)
    }
    metrics.log(cfg.train.steps, {"final_val_loss": val_loss})
    metrics.close()
    save_checkpoint(engine, ckpt_root, cfg.train.steps, cfg, faults, data_state=sampler.state_dict(cfg.train.steps))
    if cfg.train.save_final_model:
        save_final(engine, model, sparsifier, data, out_dir / "final")
    if is_main:
        write_json_atomic(out_dir / "summary.json", summary)
    D.barrier()
    return summary


def _comm_summary(engine, steps: int) -> dict:
    """Gradient bytes per optimizer step and rank (issue 3): measured by the compressed exchange; without
    compression DeepSpeed's own reduction moves exactly ``dense_comm_bytes_per_step`` (the same formula)."""
    from dist_sparse.integration.ds_compression import dense_comm_bytes_per_step

    comp = engine.compression
    if comp is None:
        params = [p for p in engine.module.parameters() if p.requires_grad]
        dense = float(dense_comm_bytes_per_step(engine.engine, params)) if D.world_size() > 1 else 0.0
        return {"comm_bytes_per_step": dense, "dense_comm_bytes_per_step": dense, "compression": "none"}
    stats = comp.stats(steps)
    totals = torch.tensor([stats["comm_bytes_per_step"], stats["mask_sync_bytes_per_step"]], dtype=torch.float64)
    D.all_reduce_sum(totals)  # mean over ranks (equal for top-k/random-k; threshold pads to the longest anyway)
    return {"comm_bytes_per_step": float(totals[0]) / D.world_size(),
            "dense_comm_bytes_per_step": stats["dense_comm_bytes_per_step"],
            "mask_sync_bytes_per_step": float(totals[1]) / D.world_size(),
            "compression": comp.compression.cfg.method}


def state_bytes_summary(engine) -> dict:
    """``state_bytes_per_rank``: per category, the maximum over ranks of the bytes measured on a non-update step
    (``total``: the largest rank total); ``state_bytes_by_rank`` every rank's own; ``transient_bytes_per_rank``
    the dense gradient a compact run materialises on mask-update steps, the packed master a ZeRO-3 fp32
    compact run materialises inside the step, compact state's packed exchange buffer and gradient compression's
    local-gradient stash (docs/memory.md). A collective."""
    store = getattr(engine, "compact", None)
    mine = {"state": engine.state_bytes, "dense_grad": store.transient_dense_grad_bytes if store else 0,
            # issue 7, ZeRO-3 fp32: the packed master exists only inside the step (a transient)
            "master": getattr(store, "transient_master_bytes", 0) if store else 0}
    # issue 7, compact state: bytes handed to the gradient reduction (packed on most steps) and its buffer
    reduction = getattr(store, "reduction", None)
    mine["reduce"] = reduction.stats() if reduction is not None else None
    mine["reduce_buffer"] = reduction.max_buffer_bytes if reduction is not None else 0
    # gradient compression (ZeRO-1/2): the fp32 local gradient stashed from backward to the exchange
    mine["stash"] = getattr(engine.compression, "max_stash_bytes", 0)
    ranks = D.all_gather_object(mine)
    reduce = _grad_reduce_summary(engine, [r["reduce"] for r in ranks])
    measured = [r["state"] for r in ranks if r["state"] is not None]
    if not measured:
        return {"state_bytes_per_rank": None, "state_bytes_by_rank": None, "transient_bytes_per_rank": None,
                "compact_state": engine.sparsity.compact_state, **reduce}
    return {
        "state_bytes_per_rank": {k: max(r[k] for r in measured) for k in measured[0]},
        "state_bytes_by_rank": [r["state"] for r in ranks],
        "transient_bytes_per_rank": {"dense_gradient_on_update_steps": max(r["dense_grad"] for r in ranks),
                                     "packed_master_during_step": max(r["master"] for r in ranks),
                                     "packed_gradient_exchange": max(r["reduce_buffer"] for r in ranks),
                                     "compression_local_gradient": max(r["stash"] for r in ranks)},
        "compact_state": engine.sparsity.compact_state,
        **reduce,
    }


def _grad_reduce_summary(engine, per_rank: list) -> dict:
    """``grad_reduce_bytes_per_step`` (issue 7; not the compression keys): bytes a rank hands to the gradient
    reduction collectives per optimizer step. Measured where compact state reduces packed gradients
    (``grad_reduce`` splits it into packed and dense steps); otherwise DeepSpeed's dense reduction, every gradient
    element once per reduction in the communication dtype (stages 2/3 reduce every micro-batch)."""
    from dist_sparse.integration.ds_compression import dense_comm_bytes_per_step

    params = [p for p in engine.module.parameters() if p.requires_grad]
    dense = float(dense_comm_bytes_per_step(engine.engine, params))
    if not per_rank or per_rank[0] is None:
        return {"grad_reduce_bytes_per_step": dense,
                "grad_reduce": {"measured": False, "dense_deepspeed_bytes_per_step": dense}}
    worst = max(per_rank, key=lambda r: r["grad_reduce_bytes_per_step"])
    return {"grad_reduce_bytes_per_step": worst["grad_reduce_bytes_per_step"],
            "grad_reduce": {"measured": True, **{k: v for k, v in worst.items() if k != "grad_reduce_bytes_per_step"},
                            "dense_deepspeed_bytes_per_step": dense}}


def save_final(engine, model, sparsifier, data, final_dir: Path) -> None:
    """Rank 0 writes a Hugging Face checkpoint (safetensors), the tokenizer and the masks; atomically."""
    masks = sparsifier.full_masks()  # collective
    state = ds_integration.gathered_state_dict(engine)  # collective at ZeRO-3
    if D.rank() != 0:
        return
    writers = [data.tokenizer.save]  # tokenizer files next to the weights: from_pretrained finds both
    if masks:
        writers.append(lambda d: save_masks(d, masks))
    hf.save_pretrained_atomic(model, final_dir, state_dict=hf.to_cpu_state_dict(state), writers=writers)


def save_checkpoint(engine, root: Path, step: int, cfg: Config, faults=None, data_state=None) -> Path:
    """Every rank writes its shard; rank 0 the model, trainer state, manifest and commit marker (see checkpoint)."""
    state_keys = ds_integration.ensure_optimizer_state(engine)
    model_state = None
    if engine.zero_optimization_stage() < 3 and D.rank() == 0:
        model_state = engine.module.state_dict()
    scheduler = getattr(engine, "lr_scheduler", None)
    trainer_state = {
        "world_size": D.world_size(),
        "zero_stage": engine.zero_optimization_stage(),
        "optimizer_step": ds_integration.optimizer_step_count(engine),
        "engine": ds_integration.engine_counters(engine),
        "lr_scheduler": scheduler.state_dict() if scheduler is not None else None,
        "sparsifier": engine.sparsifier.state_dict(),
        "consecutive_skips": engine.consecutive_skips,
        "skipped_nonfinite": engine.skipped_nonfinite,
        "overflow_skips": engine.overflow_skips,
        "loss_scaler": ds_integration.loss_scaler_state(engine),  # fp16: resume at the same scale
        "config": cfg.to_dict(),
        "data": data_state,  # the data position (WindowSampler.state_dict): a resume continues the same sequence
    }
    extra = None
    if engine.compression is not None:  # issue 3: this rank's error-feedback residuals
        extra = {compression_file(D.rank()): (engine.compression.state_tensors(),
                                              {"world_size": str(D.world_size()), "rank": str(D.rank())})}
    return checkpoint.save(root, step, engine.param_views, engine.sparsifier, state_keys, model_state,
                           trainer_state, fault=faults, extra_files=extra)


def compression_file(rank: int) -> str:
    return f"compression_rank_{rank:05d}.safetensors"


def _restore_compression(engine, path: Path, saved_world: int) -> None:
    """Residuals are per-rank sums of what that rank did not send: they cannot be resharded meaningfully. On the
    same world size each rank reloads its own; otherwise (or when the checkpoint has none) they restart at 0."""
    comp = engine.compression
    comp.masks_changed()  # the masks were just loaded: refresh the replicated copy the sender uses
    name = compression_file(D.rank())
    has = torch.tensor([1 if (path / name).is_file() else 0], dtype=torch.int64)
    D.all_reduce_sum(has)
    if saved_world != D.world_size() or int(has[0]) != D.world_size():
        log.warning("error-feedback residuals restart at 0: the checkpoint %s (written by %d ranks, resumed on %d)",
                    "has none" if int(has[0]) == 0 else "cannot be resharded", saved_world, D.world_size())
        return
    checkpoint.verify(path, [name])
    from safetensors.torch import load_file

    comp.load_state_tensors(load_file(str(path / name)))


def restore(engine, path: Path) -> int:
    """Load a committed checkpoint into a freshly initialised engine; returns the step to continue from."""
    state_keys = ds_integration.ensure_optimizer_state(engine)
    state = checkpoint.load(path, engine.param_views, engine.sparsifier, state_keys)
    if engine.zero_optimization_stage() < 3:
        missing, unexpected = engine.module.load_state_dict(checkpoint.load_model_state(path), strict=False)
        if missing or unexpected:
            raise CheckpointError(path / checkpoint.MODEL_FILE, f"model weights do not match the model: missing "
                                  f"{missing[:3]}, unexpected {unexpected[:3]}")
    else:
        ds_integration.refresh_partitioned_model(engine.param_views)
    if state["world_size"] != D.world_size():
        log.warning("checkpoint written by %d ranks, resuming on %d: masks, master weights and Adam moments are "
                    "resharded by range (exact); per-rank RNG states are not carried over", state["world_size"],
                    D.world_size())
    else:
        checkpoint.restore_rng(state)
    ds_integration.set_optimizer_step_count(engine, state["optimizer_step"])
    ds_integration.set_engine_counters(engine, state["engine"])
    scheduler = getattr(engine, "lr_scheduler", None)
    if scheduler is not None and state.get("lr_scheduler") is not None:
        scheduler.load_state_dict(state["lr_scheduler"])
    engine.sparsifier.load_state_dict(state["sparsifier"])
    if engine.compression is not None:
        _restore_compression(engine, path, int(state["world_size"]))
    engine.consecutive_skips = state.get("consecutive_skips", 0)
    engine.skipped_nonfinite = state.get("skipped_nonfinite", 0)
    engine.overflow_skips = state.get("overflow_skips", 0)
    ds_integration.set_loss_scaler_state(engine, state.get("loss_scaler"))
    return int(state["step"])
