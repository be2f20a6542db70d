"""The training loop, top to bottom: data -> engine forward/backward/step -> sparsifier -> metrics -> checkpoint.

Run on every rank (``dist-sparse train`` starts the ranks). All mask logic happens inside ``engine.step()`` (see
:class:`dist_sparse.integration.engine.SparseEngine` and its step components); this file only drives the loop.
Checkpoints are :mod:`dist_sparse.checkpointing`, the end-of-run byte counts :mod:`dist_sparse.reporting`.
"""

import copy
import logging
import math
import os
import shutil
import time
import warnings
from pathlib import Path

import torch

from dist_sparse import checkpoint, preflight, reporting, stopping
from dist_sparse import distributed as D
from dist_sparse.checkpointing import restore, save_checkpoint, save_final
from dist_sparse.config import Config
from dist_sparse.cpu_memory import keep_freed_memory
from dist_sparse.data import TextData
from dist_sparse.errors import ConfigError, DistSparseError
from dist_sparse.faults import Faults
from dist_sparse.freezing import freeze_counts, freeze_modules
from dist_sparse.integration import hf
from dist_sparse.integration.deepspeed import import_deepspeed, init_distributed
from dist_sparse.integration.engine import attach
from dist_sparse.integration.experts import register_zero3_leaves
from dist_sparse.integration.kernels import kernel_work
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


def weight_decay_groups(model) -> list:
    """Weight decay on matrices (and embeddings), none on biases and norms (the usual GPT recipe)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def optimizer_type(ds_config: dict) -> str:
    return str((ds_config.get("optimizer") or {}).get("type", "AdamW"))


def param_groups(model, cfg: Config, ds_config: dict) -> list:
    """The optimizer's groups: weight decay as above, split by SμPar's learning-rate scale when it applies (which
    also rescales the sparsified layers' initial weights; dist_sparse/parameterization.py)."""
    from dist_sparse.parameterization import param_groups as sparse_groups

    return sparse_groups(model, cfg.sparsity, optimizer_type(ds_config), weight_decay_groups(model),
                         pretrained=cfg.model.pretrained is not None)


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


def train(cfg: Config, resume: str | None = None, rewind: bool = False) -> dict:
    """Train on every rank; returns the summary (also written to ``<output_dir>/summary.json`` by rank 0).

    ``resume``: a checkpoint directory or ``auto`` (the newest committed one under ``<output_dir>/checkpoints``).
    ``rewind``: ``resume`` is another run's checkpoint whose whole training state is taken with this config's
    masks (``sparsity.init_masks``) applied; the rewound state is saved at once in this run's checkpoints.
    """
    set_threads(cfg)
    if D.backend_for_device() == "gloo":  # DIST_SPARSE_CPU_MALLOC=keep: every CPU run keeps freed memory
        keep_freed_memory(training=True)
    # DeepSpeed's ZeRO all-gathers call torch's deprecated all_gather_into_tensor every step, and torch warns on
    # every call: thousands of identical lines per rank that bury the training log
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    init_distributed(cfg.train.dist_timeout_s)
    try:
        summary = _train(cfg, resume, rewind)
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
    if resume is not None:
        return checkpoint.resolve(resume, ckpt_root)
    found = checkpoint.committed_checkpoints(ckpt_root)
    if found and not cfg.train.overwrite_output_dir:
        raise ConfigError("train.output_dir", f"{ckpt_root} holds checkpoints of an earlier run (newest: "
                                              f"{found[-1].name}); continue it with --resume auto, choose another "
                                              "train.output_dir, or set train.overwrite_output_dir=true to delete "
                                              "them and start again")
    if ckpt_root.exists() and cfg.train.overwrite_output_dir:
        D.barrier()  # every rank has looked before rank 0 deletes
        if D.rank() == 0:
            shutil.rmtree(ckpt_root)
            log.info("train.overwrite_output_dir: deleted the earlier run's checkpoints under %s", ckpt_root)
        D.barrier()
    return None


def _train(cfg: Config, resume: str | None, rewind: bool = False) -> dict:
    rank, world = D.rank(), D.world_size()
    is_main = rank == 0
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format="[dist_sparse] %(message)s")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    out_dir = Path(cfg.train.output_dir)
    ckpt_root = out_dir / "checkpoints"
    resume_path = _resume_target(cfg, resume, ckpt_root)  # before any work: a bad target fails fast
    faults = Faults.from_env(rank)
    # multi-node: placement logged per rank, same config and install everywhere, a shared checkpoint directory
    topology = preflight.run(cfg, ckpt_root)
    # SIGTERM/SIGUSR1 from here on stop at a step boundary (or end the rank if none comes within the timeout)
    stopper = stopping.Stopper(cfg.train.time_limit, grace_s=cfg.train.dist_timeout_s)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "config.json", cfg.to_dict())

    # same seed on every rank: identical initial weights everywhere (ZeRO partitions them afterwards)
    torch.manual_seed(cfg.train.seed)
    data = training_data(cfg)  # prepared shards (memory-mapped) or text
    model = hf.build_causal_lm(cfg.model, vocab_size(data), cfg.attention)
    freeze_modules(model, cfg.freeze.modules)  # no gradient, no optimizer state, not sparsified
    ds_config = deepspeed_config(cfg)
    if cfg.zero_stage == 3:  # fused MoE experts are fetched as one unit (before the engine registers its hooks)
        register_zero3_leaves(model)
    deepspeed = import_deepspeed()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, cfg, ds_config),
                                           config=ds_config)
    micro, accum = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    # which windows each (step, rank, micro-batch) reads; its position is saved with every checkpoint
    sampler = WindowSampler(data, cfg.data.sampling, cfg.model.block_size, cfg.train.seed, world, micro, accum)
    # pruning at initialization scores the first training batches of this rank's stream (SNIP's mini-batch)
    init_batches = [sampler.batch(i, rank, 0) for i in range(cfg.sparsity.init_batches)] \
        if cfg.sparsity.method in ("snip", "grasp") or cfg.freeze.select == "saliency" else None
    engine = attach(engine, model, cfg.sparsity, total_steps=cfg.train.steps, seed=cfg.train.seed,
                    max_skipped_steps=cfg.train.max_skipped_steps, compression=cfg.compression,
                    init_batches=init_batches, freeze=cfg.freeze,
                    kernel_tokens=ds_config["train_micro_batch_size_per_gpu"] * cfg.model.block_size)
    sparsifier = engine.sparsifier
    stopper.device = engine.device
    start_step = 0
    if resume_path is not None:
        start_step = restore(engine, resume_path, rewind=rewind)
        if is_main:
            log.info("%s from %s at step %d", "rewound" if rewind else "resumed", resume_path, start_step)
    tokens_per_step = world * micro * accum * cfg.model.block_size
    sampler.load_state_dict(checkpoint.read_trainer_state(resume_path).get("data") if resume_path else None,
                            start_step)

    if rewind:  # the rewound state is this run's first checkpoint (a resume of this run starts from it)
        save_checkpoint(engine, ckpt_root, start_step, cfg, faults, data_state=sampler.state_dict(start_step))
    densities = sparsifier.layer_density() if sparsifier.views else {}
    # sizes from the model itself (a pretrained checkpoint overrides the model section's sizes)
    n_layer, n_embd = model.config.num_hidden_layers, model.config.hidden_size
    dense_flops = hf.training_flops_per_token(model, {}, cfg.model.block_size, n_layer, n_embd)

    def flops_for(dens: dict) -> tuple:
        """(FLOPs per token at these densities, extra FLOPs of a dense-gradient step); they change only with masks."""
        return (hf.training_flops_per_token(model, dens, cfg.model.block_size, n_layer, n_embd),
                2.0 * sum(v.numel * (1.0 - dens[v.name]) for v in sparsifier.views))

    sparse_flops, dense_grad_extra = flops_for(densities)

    def kernel_flops(dense_grad: bool) -> float:
        """FLOPs per token the kernels really do: masked layers on dense kernels cost the dense product; block-sparse
        layers their active blocks in the forward and dX, and in dW too except on dense-gradient steps."""
        fwd, dw = kernel_work(engine, dense_grad)
        return (2.0 * hf.training_flops_per_token(model, fwd, cfg.model.block_size, n_layer, n_embd)
                + hf.training_flops_per_token(model, dw, cfg.model.block_size, n_layer, n_embd)) / 3.0

    kernel_flops_by_plan = {g: kernel_flops(g) for g in (False, True)}
    if is_main:
        n_params = hf.count_parameters(model)
        log.info("model %s: %.2fM parameters, %d sparsified tensors (%.2fM weights), method=%s sparsity=%.2f "
                 "distribution=%s, ZeRO-%d, %d ranks, data: %s", cfg.model.source, n_params / 1e6,
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
    kernel_flops_sum = 0.0
    last_saved = start_step
    fetch_timer = StepTimer()  # the data loader's share of each step, timed directly
    for step in range(start_step, cfg.train.steps):
        faults.maybe("kill", step)
        faults.maybe("hang", step)
        faults.maybe("sigterm", step)
        faults.maybe("sigusr1", step)
        t0 = time.perf_counter()
        plan = engine.schedule.plan(step)  # what kind of step this is (the step's components decide the same way)
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
        flops_sum += sparse_flops + (dense_grad_extra if plan.dense_grad else 0.0)
        kernel_flops_sum += kernel_flops_by_plan[plan.dense_grad]
        if plan.mask_update:
            densities = sparsifier.layer_density()
            sparse_flops, dense_grad_extra = flops_for(densities)
            kernel_flops_by_plan = {g: kernel_flops(g) for g in (False, True)}

        done = step + 1
        if cfg.train.save_interval and done % cfg.train.save_interval == 0 and done != cfg.train.steps:
            t_save = time.perf_counter()
            save_checkpoint(engine, ckpt_root, done, cfg, faults, data_state=sampler.state_dict(done))
            stopper.saved(time.perf_counter() - t_save)  # the time limit keeps room for one more save
            last_saved = done
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
        reason = stopper.agree(timer.times[-1])  # a collective: every rank stops at the same step
        if reason is not None and done != cfg.train.steps:
            if progress is not None:
                progress.close()
            metrics.close()
            return _stop(engine, ckpt_root, done, cfg, faults, stopper, reason, saved=last_saved == done,
                         data_state=sampler.state_dict(done))

    stopper.finishing()  # the run ends anyway: a late signal neither stops it nor ends it before its final save
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
        # RigL's growth window as resolved (an unset sparsity.grow_grad_steps depends on the state and kernels)
        "grow_grad_steps": getattr(sparsifier.base_method, "grow_grad_steps", None),
        "parameterization": engine.parameterization,  # standard | supar (the resolved sparsity.parameterization)
        "target_sparsity": cfg.sparsity.sparsity if cfg.sparsity.method != "none" else 0.0,
        "achieved_sparsity": sparsifier.achieved_sparsity() if sparsifier.views else 0.0,
        "layer_density": sparsifier.layer_density() if sparsifier.views else {},
        "median_step_seconds": timer.median(),
        "tokens_per_second": tokens_per_step / timer.median(),
        "peak_rss_mb": max_over_ranks(peak_rss_mb()),
        "flops_relative_to_dense": flops_sum / (max(1, cfg.train.steps - start_step) * dense_flops),
        # what the kernels multiply (the figure above counts the masks' density whatever the kernel)
        "kernel_flops_relative_to_dense": kernel_flops_sum / (max(1, cfg.train.steps - start_step) * dense_flops),
        "layer_kernel": engine.layer_kernel(),
        "skipped_steps": engine.skipped_nonfinite,
        "fp16_overflow_steps": engine.overflow_skips,  # skipped by DeepSpeed's loss scaler (fp16 only)
        "resumed_from": str(resume_path) if resume_path is not None else None,
        "mask_updates": sparsifier.updates_done,
        **freeze_counts(engine, model),  # trainable_parameters, frozen_parameters (a collective)
        "sparsified_parameters": sparsifier.sparsified_numel(),
        "total_parameters": hf.count_parameters(model),
        "data": data.source,
        "data_sampling": cfg.data.sampling,
        "tokens_seen": sampler.tokens_seen(cfg.train.steps),  # training tokens read, over all runs of a resume chain
        "data_epochs": sampler.epochs(cfg.train.steps),  # passes over the training tokens (fractional)
        "median_data_fetch_seconds": fetch_timer.median(),  # rank 0's batch fetch per step (all micro-batches)
        "rss_anon_mb": max_over_ranks(rss_anon_mb()),  # anonymous resident memory at the end, max over ranks
        **reporting.comm_summary(engine, cfg.train.steps - start_step),
        **reporting.param_gather_summary(engine, cfg.train.steps - start_step),  # ZeRO-3 only (a collective)
        **reporting.state_bytes_summary(engine),  # memory accounting (a collective)
        **topology,  # nodes, ranks_per_node (host -> rank count)
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


def _stop(engine, ckpt_root: Path, step: int, cfg: Config, faults, stopper, reason: str, saved: bool,
          data_state=None) -> dict:
    """A stop every rank agreed on: a committed checkpoint at this step (unless the save interval just wrote one),
    then rank 0 records the stop in ``stop.json``; the caller exits with the stop's exit code (stopping.py)."""
    t_save = time.perf_counter()
    path = checkpoint.step_dir(ckpt_root, step) if saved else save_checkpoint(engine, ckpt_root, step, cfg, faults,
                                                                              data_state=data_state)
    ranks = D.all_gather_object(stopper.describe())
    if D.rank() == 0:
        record = stopping.write_record(cfg.train.output_dir, reason, step, path, ranks, cfg.train.time_limit)
        log.warning("stopped at step %d of %d (%s%s): committed checkpoint %s written in %.1fs; continue with "
                    "--resume auto", step, cfg.train.steps, reason,
                    f": {', '.join(record['signals'])}" if record["signals"] else "", path,
                    time.perf_counter() - t_save)
    D.barrier()
    return {"stopped": {"reason": reason, "step": step, "checkpoint": str(path)}}
