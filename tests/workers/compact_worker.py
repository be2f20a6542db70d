"""Worker for tests/test_compact_state.py (torchrun, CPU, gloo): compact state vs masked-dense DeepSpeed.

For each ZeRO stage (argv[1], comma-separated) and each of its cases (argv[3]: a precision, a method (RigL, or
magnitude pruning), a number of gradient accumulation steps and a ZeRO-3 ``sub_group_size``), trains the same tiny
GPT-2 twice from the same seed and batches, with mask updates every 4 steps: once masked-dense
(``compact_state: false``), once compact. Records per step the loss, and for the compact run:
- at every mask update, whether survivors kept master weights and Adam moments bit for bit, and regrown weights
  start at 0 with zero moments (RigL: the update replaces the optimizer step, so nothing moves them in that step;
  magnitude pruning steps after the update, so there only pruned positions are checked);
- measured state bytes vs the count from the masks (packed master = 4 B per active weight, moments 8 B, packed
  gradient = the low-precision size per active weight, masks 1 bit per weight of the rank's range);
- pruned model weights are exactly 0 after every step.
Rank 0 writes a JSON report to argv[2].
"""

import json
import sys

import deepspeed
import torch

import dist_sparse
from dist_sparse.integration.views import inner_optimizer
from dist_sparse.masks.packing import packed_nbytes
from tests.workers import allow_cpu_fp16, finish, tiny_gpt2

STEPS = 20


def build(stage: int, compact: bool, dtype: str, method: str, gas: int = 1, sub_group_size: int = 0,
          compression: dict | None = None, clipping: float | None = None, grow_grad_steps: int = 1):
    model = tiny_gpt2()
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": gas,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "weight_decay": 0.1, "torch_adam": True}},
        "zero_optimization": {"stage": stage, **({"sub_group_size": sub_group_size} if sub_group_size else {})},
        # clipped at every precision (fp16 included): compact state and masked-dense compute the norm with
        # DeepSpeed's own function over the same active values, so they clip identically
        "gradient_clipping": clipping if clipping is not None else 1.0,
        "sparsity": {"method": method, "sparsity": 0.8, "distribution": "erk", "update_interval": 4,
                     "start_step": 0, "end_step": 17, "drop_fraction": 0.5, "compact_state": compact,
                     "grow_grad_steps": grow_grad_steps},
    }
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    elif dtype == "fp16":
        # dynamic loss scaling from 2^20: the first steps overflow (skipped, the scale comes down), and a short
        # window raises it again so that it overflows later too (steps are skipped after training has begun)
        config["fp16"] = {"enabled": True, "initial_scale_power": 20, "loss_scale_window": 4}
    if compression is not None:  # tests/workers/compact_compression_worker.py
        config["compression"] = compression
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay}, {"params": rest, "weight_decay": 0.0}]
    engine, _, _, _ = dist_sparse.initialize(model=model, config=config, model_parameters=groups,
                                             total_steps=STEPS, seed=3)
    return engine


def snapshot(engine):
    """name -> (mask, dense master, dense moments) of this rank's range."""
    out = {}
    for v in engine.sparsifier.views:
        out[v.name] = (engine.sparsifier.mask(v.name).clone(), v.master().clone(),
                       {k: v.state(k).clone() for k in ("exp_avg", "exp_avg_sq") if v.state(k) is not None})
    return out


def check_repack(before, after) -> dict:
    ok_survivors, ok_regrown, regrown, survivors = True, True, 0, 0
    for name, (old_mask, old_w, old_s) in before.items():
        new_mask, new_w, new_s = after[name]
        keep, born = old_mask & new_mask, new_mask & ~old_mask
        survivors += int(keep.sum())
        regrown += int(born.sum())
        ok_survivors &= torch.equal(new_w[keep], old_w[keep])
        ok_regrown &= bool((new_w[born] == 0).all()) and bool((new_w[~new_mask] == 0).all())
        for k in old_s:
            ok_survivors &= torch.equal(new_s[k][keep], old_s[k][keep])
            ok_regrown &= bool((new_s[k][born] == 0).all())
    return {"survivors_exact": bool(ok_survivors), "regrown_zero": bool(ok_regrown), "regrown": regrown,
            "survivors": survivors}


def expected_bytes(engine) -> dict:
    """The compact run's state bytes from the masks alone (ZeRO-3: the weights are the shards, compared with the
    dense run's in the test instead)."""
    store = engine.compact
    lp_bytes = store.lp_parts[0].element_size()
    active = 0
    for v in engine.param_views:
        if v.group is None:
            continue
        if v.name in engine.sparsifier.order:
            active += int(engine.sparsifier.mask(v.name).sum())
        else:
            active += v.mask_len
    n_groups = len(store.parts)
    started = bool(store.opt.state)  # Adam creates its state in the first step (before it: none)
    # ZeRO-3 fp32: the lp shard holds the master values, the packed master exists only inside the step
    master = 0 if getattr(store, "master_in_lp", False) else 4 * active
    out = {"master_weights": master,
           "optimizer_state": (8 * active + 4 * n_groups) if started else 0,  # + Adam's step scalars
           "gradients": lp_bytes * active,
           "masks": sum(packed_nbytes(v.mask_len) for v in engine.sparsifier.views)}
    # masks stay sharded (issue 18): only the rank's own bits between steps; with sparsity.replicate_masks the
    # packed reduction also keeps the full masks of every sparsified parameter (1 bit per weight)
    if engine.sparsity.replicate_masks and store.reduction is not None:
        out["masks"] += sum(packed_nbytes(v.numel) for v in engine.sparsifier.views)
    if engine.zero_optimization_stage() < 3:
        out["weights"] = sum(t.numel() * t.element_size() for t in engine.optimizer.bit16_groups_flat)
    return out


def expected_reduce_bytes(engine, dense: bool, gas: int) -> int:
    """Bytes handed to the gradient reduction in one step, from the masks: the packed all-reduce carries every
    active weight of the model once (element size of the communication dtype); a dense step is DeepSpeed's
    reduction of every gradient element, once per micro-batch at stages 2 and 3."""
    itemsize = 2 if engine.bfloat16_enabled() or engine.fp16_enabled() else 4
    params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    numel = {n: p.ds_numel if hasattr(p, "ds_numel") else p.numel() for n, p in params.items()}
    if dense:
        reductions = gas if engine.zero_optimization_stage() >= 2 else 1
        return itemsize * sum(numel.values()) * reductions
    masks = engine.sparsifier.full_masks()  # a collective: every rank calls this
    active = sum(int(masks[n].sum()) if n in masks else numel[n] for n in params)
    # bf16 with accumulation at stages 2/3: every micro-batch is reduced (packed), as DeepSpeed rounds each
    per_micro = gas > 1 and itemsize == 2 and engine.zero_optimization_stage() >= 2
    return itemsize * active * (gas if per_micro else 1)


def dense_master_freed(engine) -> bool:
    """No dense fp32 master partition is referenced by DeepSpeed any more."""
    store, zo = engine.compact, engine.optimizer
    if engine.zero_optimization_stage() < 3:  # the slot aliases the lp partition
        return all(t.data_ptr() == lp.data_ptr() for t, lp in zip(zo.single_partition_of_fp32_groups, store.lp_parts))
    # ZeRO-3: the slot holds the packed master (no storage between steps when it lives in the lp shard)
    return all(t is m and t.numel() == (0 if store.master_in_lp else part.numel)
               for t, m, part in zip(zo.fp32_partitioned_groups_flat, store.masters, store.parts))


# fp16: on this RigL update step rank 1 puts an inf at a *pruned* position of its dense gradient. DeepSpeed checks
# every position, so masked-dense skips the step as an overflow; compact state must too, although the position is
# not in its packed gradients (both runs must skip it and lower the scale alike)
INJECT_STEP = 8


def inject_pruned_inf(engine) -> None:
    for v in engine.sparsifier.views:
        g = v.grad()
        pruned = (~engine.sparsifier.mask(v.name).reshape(-1)).nonzero()
        if g is not None and g.numel() and len(pruned):
            opt = getattr(v, "opt", None)  # masked-dense ZeRO-3: grad() is an fp32 copy of DeepSpeed's shard grad
            if hasattr(opt, "set_local_grad_for_param"):
                full = opt.get_local_fp32_grad_for_param(v.param).view(-1)
                full[int(pruned[0])] = float("inf")
                opt.set_local_grad_for_param(full, v.param)
            else:
                g[int(pruned[0])] = float("inf")
            return
    raise RuntimeError("no pruned position with a gradient on this rank")


def run(stage: int, compact: bool, dtype: str, method: str, gas: int = 1, sub_group_size: int = 0) -> dict:
    engine = build(stage, compact, dtype, method, gas, sub_group_size)
    sp = engine.sparsifier
    rank = torch.distributed.get_rank()
    report = {"losses": [], "masked_nonzero": [], "repack": [], "bytes": [], "expected": [], "reduce": [],
              "skipped": [], "loss_scale": []}
    g = torch.Generator().manual_seed(100 + rank)
    params = dict(engine.module.named_parameters())
    for _ in range(STEPS):
        for micro in range(gas):  # gradient accumulation: gas - 1 micro-batches before the boundary one
            x = torch.randint(0, 48, (2, 16), generator=g)
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            if micro < gas - 1:
                engine.step()  # not a boundary: DeepSpeed only accumulates
                report["losses"].append(float(loss))
        update = sp.method.is_update_step(engine.global_steps)
        report["scheduled_updates"] = report.get("scheduled_updates", 0) + int(update)
        if dtype == "fp16" and engine.global_steps == INJECT_STEP and rank == 1:
            inject_pruned_inf(engine)
        before = snapshot(engine) if update else None  # masked-dense too: its regrown moments must be 0 as well
        # what the masks say a rank holds; the engine measures between backward and the step, like here
        expected = expected_bytes(engine) if compact and not update else None
        packed_reduction = compact
        if packed_reduction:
            dense = sp.uses_dense_grad(engine.global_steps)
            report["reduce"].append({"dense": dense, "measured": None,
                                     "expected": expected_reduce_bytes(engine, dense, gas)})
        engine.step()
        if packed_reduction:
            report["reduce"][-1]["measured"] = engine.compact.reduction.last_step_bytes
        report["losses"].append(float(loss))
        # fp16: a step whose scaled gradient overflowed changes nothing (no mask update, no optimizer step)
        skipped = engine.last_step_skipped
        report["skipped"].append(skipped)
        report["loss_scale"].append(float(engine.optimizer.loss_scale))
        if before is not None and not skipped:
            report["repack"].append(check_repack(before, snapshot(engine)))
        if not update and not skipped:
            report["bytes"].append(engine.state_bytes)
            if compact:
                report["expected"].append(expected)
        masks = sp.full_masks()
        with deepspeed.zero.GatheredParameters([params[n] for n in masks], enabled=stage == 3):
            report["masked_nonzero"].append(sum(int((params[n].detach()[~masks[n]] != 0).sum()) for n in masks))
    report["final_masks"] = {n: m.reshape(-1).tolist() for n, m in sp.full_masks().items()}
    report["updates"] = sp.updates_done
    report["overflow_skips"] = engine.overflow_skips
    report["method"] = method
    report["groups"] = len(engine.compact.parts) if compact else None
    # the optimizer's groups: decay / no decay, each split by SμPar's learning-rate scale
    report["param_groups"] = len(inner_optimizer(engine).param_groups)
    if compact:
        report["transient_dense_grad_bytes"] = engine.compact.transient_dense_grad_bytes
        report["dense_master_freed"] = dense_master_freed(engine)
        report["master_in_lp"] = bool(getattr(engine.compact, "master_in_lp", False))
    deepspeed.comm.barrier()
    return report


def main():
    """argv: comma-separated ZeRO stages, report path, then a JSON object stage -> list of cases ``[dtype, method,
    gas, sub_group_size]``: each case runs masked-dense and compact state in this one process group (start-up
    dominates a case's time). The report: per rank, stage -> one result per case."""
    stages, out, cases = [int(x) for x in sys.argv[1].split(",")], sys.argv[2], json.loads(sys.argv[3])
    results = {}
    for stage in stages:
        results[str(stage)] = []
        for dtype, method, gas, sub_group_size in cases[str(stage)]:  # sub_group_size (ZeRO-3): sub-groups
            if dtype == "fp16":
                allow_cpu_fp16()
            results[str(stage)].append({"dense": run(stage, False, dtype, method, gas, sub_group_size),
                                        "compact": run(stage, True, dtype, method, gas, sub_group_size)})
    finish(results, out)


if __name__ == "__main__":
    main()
