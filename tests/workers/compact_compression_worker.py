"""Worker for tests/test_compact_compression.py (torchrun, CPU, gloo): compact state with gradient compression.

For one ZeRO stage (1/2/3), precision and compression setting (top-k 1% with error feedback, optionally Adam
momentum correction), trains the tiny GPT-2 twice from the same seed and batches with RigL mask updates every 4
steps: masked-dense + compression, then compact state + compression. Optionally one rank's loss is made non-finite
at one step (argv[5]): both runs must skip it without touching the residuals. Records per step the loss, the bytes
the compressed exchange counted, the pruned model weights that are not 0 (ZeRO-3: gathered) and the measured
state bytes; for the
compact run also whether the store really is packed (packed master and moments have one value per active weight
of the rank's range) and that compact state's own packed reduction is not installed. Rank 0 writes a JSON report
to argv[3].
"""

import json
import sys

import deepspeed
import torch

from dist_sparse.masks.packing import packed_nbytes
from tests.workers import finish
from tests.workers.compact_worker import STEPS, build


def active_in_range(engine) -> int:
    """Active weights of this rank's partition, from the masks: what the packed master must hold."""
    active = 0
    for v in engine.param_views:
        if v.group is None:
            continue
        active += int(engine.sparsifier.mask(v.name).sum()) if v.name in engine.sparsifier.order else v.mask_len
    return active


def numel(p) -> int:
    return getattr(p, "ds_numel", p.numel())  # a ZeRO-3 parameter is partitioned: its local numel is 0


def expected_residual_bytes(engine, masks: dict, mc: bool, packed: bool) -> int:
    """Error feedback keeps one fp32 buffer per trainable tensor (momentum correction: four), every coordinate of
    the full tensor; packed (compact state) only the unpruned coordinates of a sparsified tensor, plus its mask
    bits (the layout)."""
    total = 0
    for n, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        kept = int(masks[n].sum()) if packed and n in masks else numel(p)
        total += 4 * kept * (4 if mc else 1) + (packed_nbytes(numel(p)) if packed and n in masks else 0)
    return total


def planned_residual_bytes(engine, masks: dict, mc: bool, packed: bool) -> int:
    """``dist-sparse plan``'s formula (memory.plan.compression_residual_bytes) for this model and these masks."""
    from dist_sparse.memory import plan as P

    params = [P.Param(n, numel(p), float(masks[n].sum()) / numel(p) if n in masks else 1.0, n in masks)
              for n, p in engine.module.named_parameters() if p.requires_grad]
    setting = P.Setting(world_size=2, zero_stage=engine.zero_optimization_stage(), compact_state=packed,
                        groups=[params], residual_buffers=4 if mc else 1)
    return P.compression_residual_bytes(setting)


def residuals(engine) -> dict:
    return {k: t.clone() for k, t in engine.compression.compression.feedback.state_tensors().items()}


def run(stage: int, compact: bool, bf16: bool, mc: bool, nan_step: int | None, grow: int = 1) -> dict:
    compression = {"method": "topk", "density": 0.01, "error_feedback": True, "momentum_correction": mc}
    # clipped at every precision: compact state and masked-dense compute the gradient norm with DeepSpeed's own
    # function over the same active values in the same order, so the clip coefficient is bit-identical
    engine = build(stage, compact, "bf16" if bf16 else "fp32", "rigl", compression=compression, clipping=1.0,
                   grow_grad_steps=grow)
    sp = engine.sparsifier
    rank = torch.distributed.get_rank()
    report = {"losses": [], "masked_nonzero": [], "comm_bytes": [], "bytes": [], "packed": [], "skipped": [],
              "residual_expected": [], "residual_planned": []}
    g = torch.Generator().manual_seed(100 + rank)
    params = dict(engine.module.named_parameters())
    comp = engine.compression.compression
    for step in range(STEPS):
        x = torch.randint(0, 48, (2, 16), generator=g)
        loss = engine(input_ids=x, labels=x).loss
        report["losses"].append(float(loss))
        if step == nan_step and rank == 1:  # one rank's gradient becomes non-finite
            loss = loss * float("nan")
        engine.backward(loss)
        update = sp.method.is_update_step(engine.global_steps)
        before_bytes, before = comp.total_bytes, residuals(engine) if step == nan_step else None
        engine.step()
        report["comm_bytes"].append(comp.total_bytes - before_bytes)
        report["skipped"].append(engine.last_step_skipped)
        if before is not None:
            after = residuals(engine)
            report["residual_untouched"] = set(before) == set(after) and all(
                torch.equal(before[k], after[k]) for k in before)
            report["residual_nonzero"] = sum(int((t != 0).sum()) for k, t in after.items() if "residual" in k)
        masks = sp.full_masks()
        if not update and not engine.last_step_skipped:
            report["bytes"].append(engine.state_bytes)
            report["residual_expected"].append(expected_residual_bytes(engine, masks, mc, compact))
            report["residual_planned"].append(planned_residual_bytes(engine, masks, mc, compact))
        if compact:  # packed master and Adam moments: one value per active weight of the rank's range
            store = engine.compact
            # ZeRO-3 fp32: the master values live in the lp shard between steps (the packed master's storage is
            # released after each step); the packed layout then says how many values a step materialises
            masters = sum(m.numel() for m in store.masters)
            if getattr(store, "master_in_lp", False):
                assert masters == 0, f"ZeRO-3 fp32: the packed master keeps {masters} values between steps"
                masters = store.packed_numel()
            moments = sum(store.opt.state[m]["exp_avg"].numel() for m in store.masters if m in store.opt.state)
            report["packed"].append([masters, moments, active_in_range(engine)])
        with deepspeed.zero.GatheredParameters([params[n] for n in masks], enabled=stage == 3):
            report["masked_nonzero"].append(sum(int((params[n].detach()[~masks[n]] != 0).sum()) for n in masks))
    report["final_masks"] = {n: m.reshape(-1).tolist() for n, m in sp.full_masks().items()}
    report["updates"] = sp.updates_done
    report["comm_bytes_per_step"] = engine.compression.stats(STEPS)["comm_bytes_per_step"]
    report["adam"] = engine.compression.adam is not None
    report["stash_bytes"] = engine.compression.max_stash_bytes
    if compact:
        report["packed_reduction"] = engine.compact.reduction is not None
        report["store_grads_released"] = all(t is None for t in engine.compact.grads)
    deepspeed.comm.barrier()
    return report


def main():
    """argv: stage, report path, then a JSON list of cases ``[dtype, mode, nan_step]``; mode "plain", "mc" (Adam
    momentum correction) or "mc-grow2" (and RigL grows on the dense gradient summed over 2 steps: the step before
    each update exchanges dense and still takes an optimizer step). One process group runs every case."""
    stage, out, cases = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    results = []
    for dtype, mode, nan_step in cases:
        mc, grow = mode.startswith("mc"), 2 if mode.endswith("grow2") else 1
        bf16 = dtype == "bf16"
        results.append({"dense": run(stage, False, bf16, mc, nan_step, grow),
                        "compact": run(stage, True, bf16, mc, nan_step, grow)})
    finish(results, out)


if __name__ == "__main__":
    main()
