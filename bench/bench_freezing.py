"""Freezing: backward work and optimizer state of frozen modules (docs/methods.md, the `freeze` section).

The training benchmark's model (char-level GPT-2, 4 layers, width 128, context 128, batch 8; 66 characters as
tinyshakespeare's tokenizer gives, random tokens: the data does not change the work), AdamW, ZeRO-2 on one CPU
rank, RigL 90% (ERK, no mask update inside the measured steps), three engines:

- `none`: nothing frozen;
- `freeze.modules`: the first half of the blocks (`transformer.h.0`, `transformer.h.1`) frozen before DeepSpeed
  starts (`requires_grad = False`: no gradient, no optimizer state);
- `freeze.schedule`: the same modules from step 1 (`[{modules: "transformer.h.[01]", step: 1}]`), reached after
  the warm-up step: no gradient from then on, their moments stay allocated in DeepSpeed's flat partitions.

Each engine runs full training steps, the three alternating step by step (`bench.common.interleaved`); the backward
(`engine.backward`, DeepSpeed's gradient hooks included) is timed inside every step by wall clock and by this
process's CPU time, and the weight-gradient tensors autograd accumulated in that backward are counted
(post-accumulate-grad hooks). The optimizer state is the engine's accounting (`state_bytes_per_rank`).

    python bench/bench_freezing.py [--rounds 5 --reps 6]
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import command_line, interleaved, machine_line, write_section  # noqa: E402

VOCAB, CONTEXT, BATCH = 66, 128, 8
HALF = "transformer.h.[01]"


def build(variant: str):
    import deepspeed
    from transformers import GPT2Config, GPT2LMHeadModel

    from dist_sparse.config import FreezeConfig, SparsityConfig
    from dist_sparse.freezing import freeze_modules
    from dist_sparse.integration.engine import attach

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=128, n_layer=4, n_head=4,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                       eos_token_id=0))
    if variant == "freeze.modules":
        freeze_modules(model, [HALF])
    config = {"train_micro_batch_size_per_gpu": BATCH, "gradient_clipping": 1.0,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01, "torch_adam": True}},
              "zero_optimization": {"stage": 2}}
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    sparsity = SparsityConfig(method="rigl", sparsity=0.9, distribution="erk", update_interval=10_000)
    freeze = FreezeConfig(schedule=[{"modules": HALF, "step": 1}]) if variant == "freeze.schedule" else None
    return attach(engine, model, sparsity, total_steps=100_000, seed=0, freeze=freeze)


class MissingGradZeros:
    """Bytes of zeros DeepSpeed's ZeRO-1/2 allocates, per optimizer, for the parameters of its partition that have
    no gradient when it flattens the partition's gradients at the step (``get_all_grad_tensors``)."""

    def __init__(self):
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        self.by_optimizer: dict = {}
        original = DeepSpeedZeroOptimizer.get_all_grad_tensors
        counts = self.by_optimizer

        def counting(opt, tensor_list, dtype):
            missing = [t for t in tensor_list if opt.get_param_gradient_attribute(t) is None]
            counts[id(opt)] = sum(t.numel() for t in missing) * torch.empty((), dtype=dtype).element_size()
            return original(opt, tensor_list, dtype)

        DeepSpeedZeroOptimizer.get_all_grad_tensors = counting


class Steps:
    """Full training steps of one engine; each records its backward's wall-clock and CPU seconds and how many
    weight-gradient tensors autograd accumulated in it."""

    def __init__(self, engine, seed: int):
        self.engine = engine
        self.g = torch.Generator().manual_seed(seed)
        self.wall, self.cpu, self.grads = [], [], []
        self._count = 0
        for p in engine.module.parameters():
            if p.requires_grad:  # freeze.modules' parameters can get none (and never have a gradient)
                p.register_post_accumulate_grad_hook(self._seen)

    def _seen(self, _param) -> None:
        self._count += 1

    def __call__(self) -> None:
        x = torch.randint(0, VOCAB, (BATCH, CONTEXT), generator=self.g)
        loss = self.engine(input_ids=x, labels=x).loss
        self._count = 0
        w, c = time.perf_counter(), time.process_time()
        self.engine.backward(loss)
        self.wall.append(time.perf_counter() - w)
        self.cpu.append(time.process_time() - c)
        self.grads.append(self._count)
        self.engine.step()

    def reset(self) -> None:
        self.wall, self.cpu, self.grads = [], [], []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(args.threads)
    from dist_sparse.integration.deepspeed import init_distributed

    init_distributed()
    variants = ("none", "freeze.modules", "freeze.schedule")
    zeros = MissingGradZeros()
    engines = {v: build(v) for v in variants}
    steps = {v: Steps(e, seed=1) for v, e in engines.items()}
    load0 = os.getloadavg()[0]
    started = time.perf_counter()
    step_wall = interleaved(steps, args.rounds, args.reps)  # one warm-up step each: the schedule's step 1 is reached
    elapsed = time.perf_counter() - started
    load1 = os.getloadavg()[0]
    rows = {}
    for v in variants:
        s, e = steps[v], engines[v]
        measured = s.wall[1:], s.cpu[1:], s.grads[1:]  # the warm-up step (step 0: schedule not reached) left out
        held = e.state_bytes or {}
        rows[v] = {"bwd_wall": statistics.median(measured[0]), "bwd_cpu": statistics.median(measured[1]),
                   "grads": sorted(set(measured[2])), "warmup_grads": s.grads[0], "step_wall": step_wall[v],
                   "optimizer_state": held.get("optimizer_state", 0), "master_weights": held.get("master_weights", 0),
                   "gradients": held.get("gradients", 0),
                   "missing_grad_zeros": zeros.by_optimizer.get(id(e.optimizer), 0),  # of the engine's last step
                   "params": sum(1 for p in e.module.parameters()),
                   "trainable": sum(1 for p in e.module.parameters() if p.requires_grad)}
    base = rows["none"]
    lines = [
        "## Freezing: backward work and optimizer state of frozen modules",
        "",
        f"Command: `{command_line()}` ({elapsed:.0f} s). Machine: {machine_line()}.",
        "",
        f"char GPT-2 (4 layers, width 128, context 128, batch 8, vocabulary {VOCAB}), AdamW, ZeRO-2 on one CPU rank, "
        f"RigL 90% ERK (no mask update in the measured steps), {args.threads} torch thread(s). The three engines "
        f"alternate step by step (`interleaved`: {args.rounds} rounds of {args.reps} steps after one warm-up step "
        "each); the backward (`engine.backward`, DeepSpeed's gradient hooks included) is timed inside every step, "
        "medians over the measured steps. Frozen: the first half of the blocks (`transformer.h.0`, "
        "`transformer.h.1`), by `freeze.modules` before DeepSpeed starts, or by a `freeze.schedule` entry at step 1 "
        "(reached after the warm-up step). *weight-gradient tensors*: parameters autograd accumulated a gradient "
        "into in one backward (post-accumulate-grad hooks). Bytes: the engine's accounting (`state_bytes_per_rank`).",
        "",
        f"Note: the machine's 2 CPU cores were shared with other jobs during the run (1-minute load average "
        f"{load0:.1f} -> {load1:.1f}); wall-clock figures move with that load, CPU time less. The figure is the "
        "ratio of the interleaved medians.",
        "",
        "| frozen | weight-gradient tensors / parameters | backward wall | x none | backward CPU time | x none "
        "| step wall | optimizer state | master weights | gradients |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        r = rows[v]
        grads = "/".join(map(str, r["grads"]))
        lines.append(
            f"| `{v}` | {grads} / {r['params']} | {r['bwd_wall'] * 1e3:.1f} ms "
            f"| {r['bwd_wall'] / base['bwd_wall']:.2f} "
            f"| {r['bwd_cpu'] * 1e3:.1f} ms | **{r['bwd_cpu'] / base['bwd_cpu']:.2f}** | {r['step_wall'] * 1e3:.1f} ms "
            f"| {r['optimizer_state'] / 2**10:.0f} KiB | {r['master_weights'] / 2**10:.0f} KiB "
            f"| {r['gradients'] / 2**10:.0f} KiB |")
    sched = rows["freeze.schedule"]
    lines += [
        "",
        f"The schedule's engine computed {sched['warmup_grads']} weight gradients in its warm-up step (before step 1) "
        f"and {grads_text(sched['grads'])} after it, like `freeze.modules`. `freeze.modules` holds no optimizer "
        "state for the frozen blocks (not trainable when DeepSpeed builds its partitions); a reached schedule entry "
        "keeps their moments and masters allocated in DeepSpeed's flat partitions (which cannot shrink), never "
        "moved.",
    ]
    if sched["gradients"] > base["gradients"]:
        lines += ["", f"The schedule's engine also measured more gradient bytes than `none` "
                      f"({sched['gradients'] / 2**10:.0f} against {base['gradients'] / 2**10:.0f} KiB) between "
                      "backward and step. The difference is DeepSpeed's: at the step, ZeRO-1/2 flattens the "
                      "gradients of every parameter in its partition (`get_all_grad_tensors`), and for a parameter "
                      "without one (a frozen one still in the partition) it allocates zeros of the parameter's size, "
                      "every step (counted by wrapping that method: "
                      f"{sched['missing_grad_zeros'] / 2**10:.0f} KiB of zeros in the schedule engine's last step, "
                      f"{base['missing_grad_zeros'] / 2**10:.0f} KiB in `none`'s). "
                      "`freeze.modules` avoids it because the frozen parameters never enter DeepSpeed's partitions."]
    path = write_section("83_freezing", "\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {path}")


def grads_text(counts: list) -> str:
    return " or ".join(map(str, counts))


if __name__ == "__main__":
    main()
