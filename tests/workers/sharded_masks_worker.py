"""Worker for tests/test_sharded_masks.py (torchrun, 2 CPU ranks, gloo): masks stay sharded (issue 18).

Trains the tiny GPT-2 of the compact tests (RigL 80%, updates every 4 steps) four times from the same seed and
batches: compact state at ZeRO-3 bf16 with its packed reduction, and compact state + top-k 1% compression with
error feedback at ZeRO-2 fp32, each once with sharded masks (the default) and once with
``sparsity.replicate_masks: true`` (the full masks kept on every rank, as before). Per step it records the loss,
the masks the rank holds (measured ``state_bytes_per_rank.masks`` and what the mask source keeps after the step),
the mask bytes handed that step and the count the formula gives, and at the end the final masks and the largest
transient. Rank 0 writes the JSON report to argv[1].
"""

import sys

import torch

import dist_sparse
from dist_sparse import distributed as D
from dist_sparse.masks.packing import packed_nbytes
from tests.workers import finish, tiny_gpt2

STEPS = 12


def build(stage: int, dtype: str, replicate: bool, compression: bool):
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "weight_decay": 0.1, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "gradient_clipping": 1.0,
        "sparsity": {"method": "rigl", "sparsity": 0.8, "distribution": "erk", "update_interval": 4,
                     "grow_grad_steps": 1,  # explicit: the default differs with compact state, compression, kernels
                     "start_step": 0, "end_step": 10, "drop_fraction": 0.5, "compact_state": True,
                     "replicate_masks": replicate},
    }
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    if compression:
        config["compression"] = {"method": "topk", "density": 0.01, "error_feedback": True,
                                 "momentum_correction": False}
    model = tiny_gpt2()
    engine, _, _, _ = dist_sparse.initialize(model=model, config=config, total_steps=STEPS, seed=3)
    return engine


def widths(source, rank: int) -> int:
    """Bytes this rank hands to build every sparsified tensor's full mask once: with an all-gather (every rank
    holds a part) the widest part's bits, with the owners' broadcasts its own part's bits (0 where it owns none)."""
    out = 0
    for n in source.views:
        ranges = source.ranges(n)
        if all(length for _, length in ranges):
            out += max(packed_nbytes(length) for _, length in ranges)
        else:
            out += packed_nbytes(ranges[rank][1])
    return out


def run(stage: int, dtype: str, replicate: bool, compression: bool) -> dict:
    engine = build(stage, dtype, replicate, compression)
    sp = engine.sparsifier
    source = engine.compression.mask_source if compression else engine.compact.reduction.masks
    n_views = len(sp.views)
    own_bits = sum(packed_nbytes(v.mask_len) for v in sp.views)
    full_bits = sum(packed_nbytes(v.numel) for v in sp.views)
    report = {"losses": [], "steps": [], "own_bits": own_bits, "full_bits": full_bits,
              "replicate": source.replicate}
    rank = D.rank()
    g = torch.Generator().manual_seed(100 + rank)
    token, seen = None, 0
    for _ in range(STEPS):
        x = torch.randint(0, 48, (2, 16), generator=g)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        step = engine.global_steps
        dense = sp.uses_dense_grad(step)  # RigL's update step: reduced/exchanged dense, no full mask built
        masks_token = (sp.updates_done, 0)
        engine.step()
        synced = source.sync_bytes()
        handed, seen = synced - seen, synced
        # the formula (sharded): every sparsified tensor's widest shard bits once on a step that selects by the
        # masks, the ranges (2 int64 per tensor) at the first one; the packed reduction also gathers every rank's
        # active count per tensor (1 int64) after each mask change; replicated: gather_full_masks after a change
        expected = 0
        if not replicate and not dense:
            expected = widths(source, rank)
            first = token is None
            if first:
                expected += 16 * n_views
            if not compression and masks_token != token:
                expected += 8 * n_views
            token = masks_token
        row = {"step": step, "dense": dense, "handed": handed, "expected": None if replicate else expected,
               # between steps: what the mask source keeps beyond the sparsifier's bits, and its last mask
               "held": source.held_bytes(), "last_released": source._last is None}
        if not dense:  # measured between the reduction and the step (not on mask-update steps)
            row["measured_masks"] = engine.state_bytes["masks"]
        report["steps"].append(row)
        report["losses"].append(float(loss))
    report["final_masks"] = {n: m.reshape(-1).tolist() for n, m in sp.full_masks().items()}
    report["updates"] = sp.updates_done
    report["max_in_flight"] = source.max_in_flight
    # one tensor's bits in flight at a time: the all-gather's padded parts, or the owners' parts
    report["largest_bound"] = max(D.world_size() * max(packed_nbytes(ln) for _, ln in source.ranges(n))
                                  if source.gathers(n) else sum(packed_nbytes(ln) for _, ln in source.ranges(n))
                                  for n in source.views)
    report["broadcast_tensors"] = sum(not source.gathers(n) for n in source.views)
    report["received"] = source.received_bytes
    report["stats"] = (engine.compression.stats(STEPS) if compression else engine.compact.reduction.stats())
    return report


def main():
    out = sys.argv[1]
    results = {}
    for label, stage, dtype, compression in (("zero3_bf16", 3, "bf16", False), ("zero2_fp32_topk", 2, "fp32", True)):
        for replicate in (False, True):
            results[f"{label}/{'replicated' if replicate else 'sharded'}"] = run(stage, dtype, replicate,
                                                                                 compression)
    finish(results, out)


if __name__ == "__main__":
    main()
