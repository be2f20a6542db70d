"""Worker for tests/test_hf_trainer.py (torchrun, CPU, gloo, 2 ranks): the Hugging Face Trainer with a DeepSpeed
config carrying our ``sparsity`` block and :class:`dist_sparse.hf_trainer.SparsityCallback`.

argv: comma-separated cases ``STAGE:MODE`` (mode ``dense``: masked-dense state; ``compact``:
``sparsity.compact_state`` plus top-k gradient compression; ``compress``: top-k compression on the masked-dense
state; ``held``: compact state with 8x8 blocks on the block-sparse kernels, the weights held as blocks), report
path, work directory. One launch runs every case (process start-up dominates a case), each in its own subdirectory;
the report holds, per rank, case -> results. Per case:

1. run A (Llama; Mixtral at ZeRO-3): 8 steps (RigL 80%, mask updates every 2 steps until step 6), a Trainer
   checkpoint at step 4. After every step a probe checks the model's pruned weights are exactly 0 (gathered at
   ZeRO-3) and records the mask-update count; Trainer's log history must carry our metrics; ``save_model`` at the
   end writes the weights and the masks;
2. run B: a fresh model and Trainer resumed from A's ``checkpoint-4`` to step 8: its masks and weights must equal
   A's after every step from 5 on, and at the end;
3. a DeepSpeed config without the block: SparsityCallback refuses it.
"""

import sys
from pathlib import Path

import deepspeed
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from dist_sparse import distributed as D
from dist_sparse.errors import ConfigError
from dist_sparse.hf_trainer import SparsityCallback
from tests.hf_architectures import VOCAB, build
from tests.workers import finish

STEPS = 8


class Tokens(torch.utils.data.Dataset):
    """Fixed random token windows (the same on every rank; the Trainer's sampler splits them)."""

    def __init__(self, n=64, seq=16):
        g = torch.Generator().manual_seed(7)
        self.x = torch.randint(1, VOCAB, (n, seq), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def gathered(engine):
    if engine.zero_optimization_stage() < 3:  # through the state dict: weights held as blocks are densified there
        return {n: t.detach().clone().float() for n, t in engine.module.state_dict().items()
                if n in dict(engine.module.named_parameters())}
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=engine.zero_optimization_stage() == 3):
        return {n: p.detach().clone().float() for n, p in params.items()}


class Probe(TrainerCallback):
    def __init__(self, cb):
        self.cb = cb
        self.steps = {}

    def on_step_end(self, args, state, control, **kwargs):
        engine = self.cb.engine
        sp = engine.sparsifier
        masks = sp.full_masks()
        weights = gathered(engine.engine)
        self.steps[state.global_step] = {
            "pruned_nonzero": sum(int((weights[n][~m] != 0).sum()) for n, m in masks.items()),
            "updates": sp.updates_done,
            "masks": {n: m.clone() for n, m in masks.items()},
            "weights": weights,
            "wrapped": type(self.cb.trainer.accelerator.deepspeed_engine_wrapped.engine).__name__,
        }


def ds_config(stage: int, mode: str, with_block: bool = True) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "gradient_clipping": "auto",
           "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
           "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}}}
    if with_block:
        cfg["sparsity"] = {"method": "rigl", "sparsity": 0.8, "distribution": "erk", "update_interval": 2,
                           "end_step": 6, "drop_fraction": 0.5, "compact_state": mode == "compact",
                           "grow_grad_steps": 1}  # the modes compare; the default window differs between them
        if mode in ("compact", "compress"):
            cfg["compression"] = {"method": "topk", "density": 0.25}
        if mode == "held":  # compact state + block-sparse kernels: the weights held as their active blocks
            cfg["sparsity"].update(compact_state=True, pattern="block:8x8", kernel="block_sparse")
    return cfg


def cpu_deepspeed_state() -> None:
    """Start accelerate's distributed state for DeepSpeed over gloo. transformers + accelerate choose the
    process-group backend from the GPU they find; on a CPU-only machine they find none and run every rank as its
    own world of one. A pre-configured state (``use_configured_state``) is accelerate's way to choose it."""
    import os

    from accelerate.state import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    del os.environ["ACCELERATE_USE_DEEPSPEED"]


def make_trainer(out: Path, ds: dict, steps: int = STEPS):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # a new Trainer, a new DeepSpeed plugin (the process group stays)
    # ZeRO-3 trains the mixture of experts: the callback registers its expert blocks as ZeRO-3 leaves
    model = build("mixtral" if ds["zero_optimization"]["stage"] == 3 else "llama", seed=0)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=2, max_steps=steps, save_steps=4,
                             save_strategy="steps", logging_steps=1, learning_rate=1e-2, lr_scheduler_type="constant",
                             weight_decay=0.0, max_grad_norm=1.0, report_to=[], seed=0, deepspeed=ds,
                             disable_tqdm=True, dataloader_num_workers=0, save_only_model=False,
                             accelerator_config={"use_configured_state": True})
    return Trainer(model=model, args=args, train_dataset=Tokens())


def summarize(probe) -> dict:
    return {str(k): {"pruned_nonzero": v["pruned_nonzero"], "updates": v["updates"], "wrapped": v["wrapped"]}
            for k, v in probe.steps.items()}


def main():
    cases, out, work = sys.argv[1].split(","), sys.argv[2], Path(sys.argv[3])
    cpu_deepspeed_state()
    reports = {}
    for case in cases:
        stage, mode = case.split(":")
        reports[case] = run_case(int(stage), mode, work / f"zero{stage}-{mode}")
    finish(reports, out)


def run_case(stage: int, mode: str, work: Path) -> dict:
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # nothing of the previous case's DeepSpeed config stays registered
    report = {}

    # run A: uninterrupted, a checkpoint at step 4
    trainer = make_trainer(work / "a", ds_config(stage, mode))
    cb = SparsityCallback(trainer)
    report["world"] = [trainer.args.world_size, trainer.accelerator.num_processes]
    report["deepspeed_sees_block"] = any("sparsity" in d for d in (trainer.args.hf_deepspeed_config.config,
                                                                    trainer.accelerator.state.deepspeed_plugin
                                                                    .deepspeed_config))
    probe_a = Probe(cb)
    trainer.add_callback(probe_a)
    trainer.train()
    report["a"] = summarize(probe_a)
    report["engine_config_has_block"] = "sparsity" in cb.engine.engine.config
    report["compact"] = cb.engine.compact is not None
    report["compression"] = cb.engine.compression is not None
    held = getattr(cb.engine.compact, "packed_weights", None)
    report["held"] = len(held.held) if held is not None else 0
    report["leaves"] = sorted({type(m).__name__ for m in trainer.model.modules() if getattr(m, "_z3_leaf", False)})
    report["owned"] = sum(v.mask_len for v in cb.engine.sparsifier.views)
    report["total"] = cb.engine.sparsifier.sparsified_numel()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    report["logged_steps"] = [h["step"] for h in logged]
    report["logged_keys"] = sorted(set.intersection(*(set(h) for h in logged)))
    report["logged_updates"] = [h["sparsity/mask_updates"] for h in logged]
    report["logged_sparsity"] = [h["sparsity"] for h in logged]
    report["logged_flops"] = [h["sparsity/flops_relative_to_dense"] for h in logged]
    # what they must be: RigL keeps every layer's density, so each step is r = sparse / dense, and the update step
    # at engine step 2 (the Trainer's step 3) also computes the dense gradient of the pruned positions
    from dist_sparse.integration import hf

    dens = cb.engine.sparsifier.layer_density()
    cfg = trainer.model.config
    dense = hf.training_flops_per_token(trainer.model, {}, 16, cfg.num_hidden_layers, cfg.hidden_size)
    r = hf.training_flops_per_token(trainer.model, dens, 16, cfg.num_hidden_layers, cfg.hidden_size) / dense
    extra = 2.0 * sum(v.numel * (1.0 - dens[v.name]) for v in cb.engine.sparsifier.views) / dense
    report["expected_flops"] = [r, r, r + extra / 3]
    final = work / "a" / "final"
    trainer.save_model(str(final))
    D.barrier()
    # from_pretrained would load through ZeRO-3 (a collective) while the Trainer's DeepSpeed config is registered;
    # run B registers its own
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    if D.rank() == 0:
        from transformers import AutoModelForCausalLM

        from dist_sparse.masks.io import load_masks

        # by the loaded model's names: transformers writes fused experts in their per-expert on-disk layout
        loaded = {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(final).named_parameters()}
        end = probe_a.steps[STEPS]
        masks = load_masks(final)
        report["saved_names_missing"] = sorted(set(end["masks"]) - set(loaded))
        report["saved_masks_equal"] = set(masks) == set(end["masks"]) and all(
            torch.equal(masks[n], end["masks"][n]) for n in masks)
        report["saved_pruned_nonzero"] = sum(int((loaded[n][~m] != 0).sum()) for n, m in masks.items())
        report["saved_weights_equal"] = all(torch.equal(loaded[n].float(), end["weights"][n]) for n in end["weights"])
        ckpt = work / "a" / "checkpoint-4"
        report["checkpoint_files"] = sorted(p.name for p in ckpt.iterdir())
        report["checkpoint_masks_equal"] = all(torch.equal(load_masks(ckpt)[n], probe_a.steps[4]["masks"][n])
                                               for n in end["masks"])

    # run B: resumed from A's checkpoint at step 4
    trainer_b = make_trainer(work / "b", ds_config(stage, mode))
    cb_b = SparsityCallback(trainer_b)
    probe_b = Probe(cb_b)
    trainer_b.add_callback(probe_b)
    trainer_b.train(resume_from_checkpoint=str(work / "a" / "checkpoint-4"))
    report["b"] = summarize(probe_b)
    report["resume_masks_equal"] = {str(s): all(torch.equal(probe_b.steps[s]["masks"][n], probe_a.steps[s]["masks"][n])
                                                for n in probe_a.steps[s]["masks"]) for s in probe_b.steps}
    report["resume_weights_equal"] = {
        str(s): all(torch.equal(probe_b.steps[s]["weights"][n], probe_a.steps[s]["weights"][n])
                    for n in probe_a.steps[s]["weights"]) for s in probe_b.steps}
    report["resume_weights_maxdiff"] = {
        str(s): max(float((probe_b.steps[s]["weights"][n] - probe_a.steps[s]["weights"][n]).abs().max())
                    for n in probe_a.steps[s]["weights"]) for s in probe_b.steps}

    # TrainingArguments reused for another Trainer: the block (removed from the processed config) is found again
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    reused = SparsityCallback(Trainer(model=build("llama"), args=trainer_b.args, train_dataset=Tokens()))
    report["args_reused"] = [reused.sparsity.method, reused.sparsity.sparsity]

    # a DeepSpeed config without the block: refused
    try:
        SparsityCallback(make_trainer(work / "c", ds_config(stage, mode, with_block=False)))
        report["missing_block"] = None
    except ConfigError as exc:
        report["missing_block"] = [exc.key, str(exc)]
    D.barrier()
    return report


if __name__ == "__main__":
    main()
