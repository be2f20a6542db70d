"""Worker scripts run under torchrun by the tests; each ends with :func:`finish`."""

import json
import os

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dist_sparse import distributed as D


def tiny_gpt2():
    """The workers' model: a 2-layer, width-32 GPT-2 over 48 tokens, initialised from seed 0 (same on every rank)."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=48, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0))


def tiny_rigl_config(stage: int, **extra) -> dict:
    """The workers' ``dist_sparse.initialize`` config: micro-batch 2, AdamW, RigL 80% updating every 2 steps until
    step 5, ZeRO ``stage``; ``extra`` adds or replaces top-level blocks (fp16, compression, ...)."""
    return {"train_micro_batch_size_per_gpu": 2,
            "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "weight_decay": 0.1, "torch_adam": True}},
            "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": stage},
            "sparsity": {"method": "rigl", "sparsity": 0.8, "distribution": "erk", "update_interval": 2,
                         "grow_grad_steps": 1,  # explicit: the default differs with compact state, compression, kernels
                         "start_step": 0, "end_step": 5, "drop_fraction": 0.5}, **extra}


def tiny_step(engine, g: torch.Generator) -> float:
    """One training step of :func:`tiny_gpt2` on a random batch of 2 x 16 tokens drawn from ``g``; the loss."""
    x = torch.randint(0, 48, (2, 16), generator=g)
    loss = engine(input_ids=x, labels=x).loss
    engine.backward(loss)
    engine.step()
    return float(loss)


def allow_cpu_fp16() -> None:
    """Let DeepSpeed's CPU accelerator run fp16. It declines fp16 unless oneDNN reports fp16 hardware (CPUs with
    AVX512-FP16 / AMX-FP16; this machine has neither), although torch computes fp16 on any CPU, in software. The
    fp16 tests lift only that capability check, in the worker process, so DeepSpeed's own fp16 ZeRO optimizers and
    dynamic loss scaler run here unchanged. Call before ``deepspeed.initialize``."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu" and not acc.is_fp16_supported():
        type(acc).is_fp16_supported = lambda self: True


def finish(results, out: str) -> None:
    """Gather every rank's results, have rank 0 write them (a JSON list, one entry per rank) to ``out``, leave the
    process group cleanly (a barrier, its threads joined) and end the rank without interpreter teardown, as
    launched training ranks do (:func:`dist_sparse.distributed.exit_rank`): C++ teardown occasionally aborted a
    worker that had already written its report. Call it last."""
    gathered = D.all_gather_object(results)
    if D.rank() == 0:
        tmp = f"{out}.tmp"
        with open(tmp, "w") as f:
            json.dump(gathered, f)
        os.replace(tmp, out)
    D.shutdown()
    D.exit_rank(0)


def train_steps(engine, steps: int, vocab: int, shape: tuple, seed: int):
    """``steps`` optimizer steps of a causal LM on random tokens (a generator seeded with ``seed``, one per rank);
    yields each step's loss after the step."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, vocab, shape, generator=g)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        yield float(loss)
