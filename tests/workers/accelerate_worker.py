"""Worker for tests/test_accelerate.py, run by ``accelerate launch --num_processes 2`` (CPU, gloo).

A custom accelerate loop with a DeepSpeed plugin whose config carries our ``sparsity`` block (RigL 80%, updates
every 2 steps, compact state), ZeRO stage argv[2]; ``dist_sparse.accelerate.attach`` after ``prepare``:
- ``accelerator.backward`` + ``optimizer.step`` drive our step: pruned weights 0 after every step, mask updates
  at the configured steps, masks sharded;
- ``accelerator.save_state`` after step 3 writes the masks and our state; the loop goes on to step 6, then
  ``load_state`` goes back to step 3 and steps 4..6 are run again: masks and weights must equal the first pass.
"""

import sys
from pathlib import Path

import deepspeed
import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, DummyOptim, InitProcessGroupKwargs

import dist_sparse.accelerate
from tests.hf_architectures import VOCAB, build
from tests.workers import finish


def batch(step: int, rank: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1000 * step + rank))


def snapshot(engine) -> dict:
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=engine.zero_optimization_stage() == 3):
        weights = {n: p.detach().clone().float() for n, p in params.items()}
    return {"masks": engine.sparsifier.full_masks(), "weights": weights, "updates": engine.sparsifier.updates_done}


def main():
    out, stage, work = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": stage},
          "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "weight_decay": 0.0, "torch_adam": True}},
          "sparsity": {"method": "rigl", "sparsity": 0.8, "update_interval": 2, "end_step": 6, "drop_fraction": 0.5,
                       "compact_state": True}}
    # gloo: accelerate picks the process-group backend from the GPU it finds, and finds none on a CPU machine
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds),
                              kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    model = build("qwen2", seed=0)
    optimizer = DummyOptim(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    engine = dist_sparse.accelerate.attach(accelerator, model, total_steps=8)
    rank = accelerator.process_index
    report = {"world": accelerator.num_processes, "type": type(engine).__name__, "compact": engine.compact is not None,
              "owned": sum(v.mask_len for v in engine.sparsifier.views), "total": engine.sparsifier.sparsified_numel(),
              "deepspeed_saw_block": "sparsity" in engine.engine.config}

    def step(i):
        x = batch(i, rank)
        loss = engine(input_ids=x, labels=x).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        s = snapshot(engine)
        s["pruned_nonzero"] = sum(int((s["weights"][n][~m] != 0).sum()) for n, m in s["masks"].items())
        return s

    first = {}
    for i in range(1, 7):
        first[i] = step(i)
        if i == 3:
            accelerator.save_state(str(work / "state"))
    accelerator.load_state(str(work / "state"))
    restored = snapshot(engine)
    report["restored_equal"] = all(torch.equal(restored["masks"][n], first[3]["masks"][n]) for n in restored["masks"]) \
        and all(torch.equal(restored["weights"][n], first[3]["weights"][n]) for n in restored["weights"])
    second = {i: step(i) for i in range(4, 7)}
    report["updates"] = [first[i]["updates"] for i in range(1, 7)]
    report["pruned_nonzero"] = [s["pruned_nonzero"] for s in [*first.values(), *second.values()]]
    report["resume_equal"] = [all(torch.equal(second[i]["masks"][n], first[i]["masks"][n]) for n in first[i]["masks"])
                              and all(torch.equal(second[i]["weights"][n], first[i]["weights"][n])
                                      for n in first[i]["weights"]) for i in range(4, 7)]
    report["saved_files"] = sorted(p.name for p in (work / "state").iterdir())
    finish(report, out)


if __name__ == "__main__":
    main()
