"""Worker for tests/test_compression_deepspeed.py (run under torchrun, CPU, gloo).

For one ZeRO stage, trains a tiny GPT-2 through ``dist_sparse.initialize`` with and without compression on the same
data and records, on every rank, what the equivalence tests compare:
- the partition gradient a rank holds when the optimizer step starts (``view.grad()``) at every boundary,
  the losses and the final fp32 master weights, and the final masks;
- how many gradient collectives DeepSpeed itself issued during ``backward`` (must be 0 when compressed);
- for compressed runs with a sparse method: the indices each rank sent, checked against the full masks;
- bytes counted by the exchange vs the analytic size of what was sent.
Rank 0 writes a JSON report to argv[2].
"""

import sys

import torch
import torch.distributed as dist

import dist_sparse
from dist_sparse.compression import sketch
from dist_sparse.compression.exchange import payload_elements
from tests.workers import finish, tiny_gpt2

STEPS = 7
# these runs compare the plain exchange with DeepSpeed's reduction: momentum correction (on by default with AdamW)
# is switched off explicitly; the runs that test it switch it on
NO_MC = {"momentum_correction": False}
_COLLECTIVES = ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_gather",
                "all_gather_into_tensor", "broadcast")


class CollectiveCounter:
    """Counts torch.distributed collectives issued while ``active`` (DeepSpeed's comm layer calls these)."""

    def __init__(self):
        self.count, self.active = 0, False
        for name in _COLLECTIVES:
            original = getattr(dist, name)

            def wrapped(*a, _original=original, **k):
                if self.active:
                    self.count += 1
                return _original(*a, **k)

            setattr(dist, name, wrapped)


COUNTER = CollectiveCounter()


def run(stage: int, compression: dict | None, method: str, gas: int, nan_step: int | None = None,
        optimizer: dict | None = None, same_data: bool = False, clipping: float = 1.0, grow: int = 1) -> dict:
    model = tiny_gpt2()
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": gas,
        "optimizer": optimizer or {"type": "AdamW", "params": {"lr": 0.01, "weight_decay": 0.1, "torch_adam": True}},
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage},
        "gradient_clipping": clipping,
        "sparsity": {"method": method, "sparsity": 0.8, "distribution": "erk", "update_interval": 2,
                     "grow_grad_steps": grow,  # explicit: the default differs with compact state and kernels
                     "start_step": 0, "end_step": 6, "drop_fraction": 0.5},
    }
    if compression is not None:
        config["compression"] = compression
    engine, _, _, _ = dist_sparse.initialize(model=model, config=config, total_steps=STEPS, seed=3)
    sp, comp = engine.sparsifier, engine.compression
    rank = dist.get_rank()
    report = {"grads": [], "losses": [], "ds_collectives_in_backward": 0, "sent_pruned": 0, "sent_total": 0,
              "bytes_match": [], "dense_step_sent": [], "grow_scores": [], "grow_steps": [], "dense_exchanged": [],
              "window_state": []}
    original_before, original_update = sp.before_step, sp._update

    def recording_update(step):  # what growth scores: the window's mean gradient (empty: the update step's own)
        report["grow_scores"].append({n: (t / sp.grad_sum_steps).tolist() for n, t in sp.grad_sums.items()})
        report["grow_steps"].append(sp.grad_sum_steps)
        original_update(step)

    sp._update = recording_update
    if comp is not None:
        original_run = comp.compression.run

        def recording_run(grads, eligible, step, dense=(), *args, **kwargs):
            report["dense_exchanged"].append(sorted(dense))
            return original_run(grads, eligible, step, dense, *args, **kwargs)

        comp.compression.run = recording_run

    def recording_before_step(plan):  # the sparsifier's step hook (the engine hands it the step's plan)
        step = plan.step
        if comp is not None:
            items = comp.compression.last_sent
            masks = {n: m.reshape(-1) for n, m in sp.full_masks().items()}  # a collective (masks stay sharded)
            update = sp.method is not None and sp.method.is_update_step(step)
            expected = 0
            for name, idx in items.items():
                mask = None if update else masks.get(name)
                n_pos = comp.params[name].numel() if mask is None else int(mask.sum())
                if comp._owned is not None:  # ZeRO-1/2: the own partition range is added locally, never sent
                    start, length = comp._owned[name][rank]
                    n_pos -= length if mask is None else int(mask[start: start + length].sum())
                expected += payload_elements(int(idx.numel()), n_pos) * 4
                if mask is not None:
                    report["sent_pruned"] += int((~mask[idx]).sum())
                    report["sent_total"] += int(idx.numel())
            # payloads are padded to the longest (ranks that keep different own ranges send different counts);
            # threshold adds a count header
            longest = torch.tensor([expected // 4], dtype=torch.int64)
            dist.all_reduce(longest, op=dist.ReduceOp.MAX)
            header = 0 if comp.compression.compressor.fixed_count else 4 * len(items)
            expected = header + 4 * int(longest)
            report["bytes_match"].append([comp.compression.exchange.last_bytes, expected])
            report["dense_step_sent"].append([update, sorted(items)])
        original_before(plan)
        # what the optimizer step will see (pruned positions zeroed by the sparsifier in both runs)
        report["grads"].append({v.name: v.grad().float().tolist() for v in engine.param_views})

    sp.before_step = recording_before_step
    g = torch.Generator().manual_seed(100 + (0 if same_data else rank))  # same_data: local gradient == average
    for step in range(STEPS):
        residual = {k: t.clone() for k, t in comp.state_tensors().items()} if comp is not None else None
        for _ in range(gas):
            x = torch.randint(0, 48, (2, 16), generator=g)
            loss = engine(input_ids=x, labels=x).loss
            if step == nan_step and rank == 1:  # one rank's gradient becomes non-finite
                loss = loss * float("nan")
            COUNTER.active = True
            engine.backward(loss)
            COUNTER.active = False
            engine.step()
            report["losses"].append(float(loss))
        if step == nan_step:
            after = comp.state_tensors()
            report["nan_step_skipped"] = engine.last_step_skipped
            report["residual_untouched"] = set(after) == set(residual) and all(
                torch.equal(after[k], residual[k]) for k in after)
            report["residual_nonzero"] = sum(int((t != 0).sum()) for t in after.values())
        if comp is not None and comp.window_sums is not None:  # the window kept in the exchange, checkpointed
            saved = comp.state_tensors()
            comp.load_state_tensors(saved)
            again = comp.state_tensors()
            report["window_state"].append([sorted(k for k in saved if "grow_window" in k),
                                           set(saved) == set(again) and all(torch.equal(saved[k], again[k])
                                                                            for k in saved)])
    if comp is not None and comp.compression.feedback.momentum is not None:
        report["dgc"] = {"momentum": comp.compression.feedback.momentum, "adam": comp.adam is not None,
                         "local_clip": comp.compression.local_clip, "ds_clipping": engine.gradient_clipping(),
                         "optimizer_momentum": [grp.get("momentum") for grp in engine.optimizer.param_groups],
                         "momenta": len(comp.compression.feedback.velocity_momentum)}
    report["ds_collectives_in_backward"] = COUNTER.count
    COUNTER.count = 0
    report["master"] = {v.name: v.master().float().tolist() for v in engine.param_views}
    report["masks"] = {n: m.reshape(-1).tolist() for n, m in sp.full_masks().items()}
    if comp is not None:
        report["stats"] = comp.stats(STEPS)
        report["sparsified"] = sorted(v.name for v in sp.views)
    return report


def main():
    """argv: comma-separated ZeRO stages (one process group runs them all: start-up dominates), report path, and
    optionally comma-separated ZeRO stages for fp16_compression_worker.py's fp16 runs, which then run in this launch
    too (after the fp32 runs, as DeepSpeed's CPU fp16 check is lifted for the rest of the process), reported under
    ``fp16-STAGE``."""
    stages, out = [int(x) for x in sys.argv[1].split(",")], sys.argv[2]
    results = {str(stage): runs_at(stage) for stage in stages}
    if len(sys.argv) > 3:
        from tests.workers import allow_cpu_fp16
        from tests.workers.fp16_compression_worker import runs_at as fp16_runs_at

        allow_cpu_fp16()
        results.update({f"fp16-{stage}": fp16_runs_at(stage) for stage in map(int, sys.argv[3].split(","))})
    finish(results, out)


def runs_at(stage: int) -> dict:
    runs = {}
    for gas in (1, 2):
        runs[f"dense_gas{gas}"] = run(stage, None, "none", gas)
        runs[f"topk1_gas{gas}"] = run(stage, {"method": "topk", "density": 1.0, **NO_MC}, "none", gas)
    runs["rigl"] = run(stage, None, "rigl", 1)
    runs["rigl_topk1"] = run(stage, {"method": "topk", "density": 1.0, **NO_MC}, "rigl", 1)
    runs["rigl_topk"] = run(stage, {"method": "topk", "density": 0.1, **NO_MC}, "rigl", 1)
    # RigL's growth window: uncompressed, the sparsifier sums the reduced gradients; compressed, each rank sums its
    # local gradient and the update step exchanges the sum (the same mean, another summation order)
    runs["rigl_window"] = run(stage, None, "rigl", 1, grow=2)
    runs["rigl_window_topk1"] = run(stage, {"method": "topk", "density": 1.0, **NO_MC}, "rigl", 1, grow=2)
    runs["static_threshold"] = run(stage, {"method": "threshold", "density": 0.1, "min_tensor_size": 40, **NO_MC},
                                   "static", 1)
    runs["nan"] = run(stage, {"method": "randomk", "density": 0.1, **NO_MC}, "static", 2, nan_step=3)
    runs["dgc"] = run(stage, {"method": "topk", "density": 0.1, "momentum_correction": True, "warmup_steps": 3},
                      "rigl", 1, optimizer={"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}})
    # Adam momentum correction: with the same batch on both ranks the local gradient equals the average, so at
    # density 1.0 (and exact energies) it must reproduce uncompressed DeepSpeed with plain torch AdamW
    # (no clipping here: with momentum correction it moves before the exchange, at gradient_clipping x sqrt(N))
    runs["static_same_data"] = run(stage, None, "static", 1, same_data=True, clipping=0.0)
    buckets = sketch.BUCKETS
    sketch.BUCKETS = 1 << 40  # sketches as large as the tensors: the energy of the average is exact
    try:
        runs["adam_mc_same_data"] = run(stage, {"method": "topk", "density": 1.0, "momentum_correction": True},
                                        "static", 1, same_data=True, clipping=0.0)
    finally:
        sketch.BUCKETS = buckets
    runs["adam_mc"] = run(stage, {"method": "topk", "density": 0.1, "momentum_correction": True}, "rigl", 1)
    return runs


if __name__ == "__main__":
    main()
