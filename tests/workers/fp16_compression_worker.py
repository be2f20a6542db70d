"""Worker for tests/test_compression_deepspeed.py::test_fp16_compression (torchrun, 2 CPU ranks, gloo): gradient
compression under DeepSpeed's fp16 loss scaler at one ZeRO stage (DeepSpeed's CPU fp16 check lifted,
:func:`tests.workers.allow_cpu_fp16`). Records, per step, the loss scale, whether the step overflowed and whether
the residuals changed; rank 0 writes a JSON report to argv[2].

- ``dynamic``: dynamic scaling from 2^20 with hysteresis 1: the first steps overflow in backward (a local inf);
- ``static256`` / ``static4096``: static scales on the same data: residuals held unscaled agree across scales;
- ``inject``: static 256, the exchanged average of step 3 made too large for fp16 on rank 1 (an overflow found
  after the exchange): the buffers are restored, the step is skipped on both ranks and DeepSpeed sees it.
"""

import sys

import torch

import dist_sparse
from tests.workers import allow_cpu_fp16, finish, tiny_gpt2, tiny_rigl_config

STEPS = 6


def run(stage: int, fp16: dict, inject_step: int | None = None) -> dict:
    model = tiny_gpt2()
    config = tiny_rigl_config(stage, fp16={"enabled": True, **fp16},
                              compression={"method": "topk", "density": 0.1, "error_feedback": True})
    # the dense learning rate everywhere: the two static-scale runs are compared through their fp16 rounding, which
    # SμPar's 5x rate on the sparse layers (density 0.2) amplifies over the steps; what is tested is the scaling
    config["sparsity"]["parameterization"] = "standard"
    engine, _, _, _ = dist_sparse.initialize(model=model, config=config, total_steps=STEPS, seed=3)
    comp = engine.compression
    rank = torch.distributed.get_rank()
    if inject_step is not None:
        original = comp.compression.run

        def run_and_inflate(*a, **k):  # what a too-large error-feedback release would give on rank 1
            out = original(*a, **k)
            if engine.global_steps == inject_step and rank == 1:
                for t in out.values():
                    t.mul_(1e30)
            return out

        comp.compression.run = run_and_inflate
    report = {"scale": [], "overflow": [], "residual_unchanged": [], "ds_overflow": [], "residuals": [],
              "losses": [], "mc": comp.adam is not None}
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(STEPS):
        before = {k: t.clone() for k, t in comp.state_tensors().items()}
        report["scale"].append(float(engine.engine.optimizer.loss_scale))
        x = torch.randint(0, 48, (2, 16), generator=g)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        after = comp.state_tensors()
        report["losses"].append(float(loss))
        report["overflow"].append(bool(engine.last_step_overflow))
        report["ds_overflow"].append(bool(getattr(engine.engine.optimizer, "overflow", False)))
        report["residual_unchanged"].append(set(after) == set(before) and all(
            torch.equal(after[k], before[k]) for k in after))
        report["residuals"].append({k: t.tolist() for k, t in after.items() if k.endswith("::residual")})
    report["final_scale"] = float(engine.engine.optimizer.loss_scale)
    return report


def runs_at(stage: int) -> dict:
    """The four fp16 runs at one ZeRO stage (call :func:`allow_cpu_fp16` first)."""
    return {"dynamic": run(stage, {"loss_scale": 0, "initial_scale_power": 20, "hysteresis": 1,
                                   "loss_scale_window": 1000}),
            "static256": run(stage, {"loss_scale": 256}),
            "static4096": run(stage, {"loss_scale": 4096}),
            "inject": run(stage, {"loss_scale": 256}, inject_step=3)}


def main():
    """argv: comma-separated ZeRO stages (one process group runs them all: start-up dominates), report path.
    (tests/test_compression_deepspeed.py runs these through compression_worker.py's launch, see there.)"""
    stages, out = [int(x) for x in sys.argv[1].split(",")], sys.argv[2]
    allow_cpu_fp16()
    finish({str(stage): runs_at(stage) for stage in stages}, out)


if __name__ == "__main__":
    main()
