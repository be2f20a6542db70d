"""Worker for tests/test_freezing.py (torchrun, CPU, gloo): ``freeze.fraction`` under compact state vs masked-dense.

For each case (argv[2]: a JSON list of ``[ZeRO stage, dtype]``) trains the same tiny GPT-2 twice from the same seed
and batches, RigL 80% with mask updates every 4 steps, AdamW with weight decay 0.1, half of the unpruned weights
frozen (``freeze.select: magnitude``): once masked-dense, once with compact state. Records per rank:

- the losses, and whether the final masters, Adam moments and masks are bit-equal between the two runs;
- after every step, whether every frozen weight still holds its initial value, as master and in the model's
  weights (decay 0.1 would move it otherwise);
- the compact run's measured state bytes against the count from the masks with trainable = active - frozen
  (packed master 4 B, moments 8 B, gradient the low-precision size per trainable weight; masks: the rank's mask
  bits, its frozen bits and the trainable bits the packed reduction lays out by);
- ``freeze_counts`` (summary.json's trainable/frozen parameters) of both runs;
- the last measured state bytes of both runs, and what the memory planner (``dist-sparse plan``'s formula) predicts
  for the same model and groups.

The first case also checkpoints both runs at step 6 and resumes: a fresh compact engine from the compact
checkpoint and another from the masked-dense one, each trained to the end, against the uninterrupted compact run;
and the two runs' checkpoint shards are compared tensor by tensor (the format is the same). Rank 0 writes a JSON
report to argv[1]; the checkpoints go under argv[3].
"""

import json
import os
import sys
from pathlib import Path

import deepspeed
import torch
from safetensors.torch import load_file

from dist_sparse import distributed as D
from dist_sparse.checkpointing import restore, save_checkpoint
from dist_sparse.config import FreezeConfig, check_freeze, from_dict, split_deepspeed_json
from dist_sparse.freezing import freeze_counts
from dist_sparse.integration.engine import attach
from dist_sparse.masks.packing import packed_nbytes
from dist_sparse.memory import plan as P
from dist_sparse.parameterization import layer_densities, param_groups
from tests.workers import finish, tiny_gpt2

STEPS = 12
SAVE_AT = 6
FREEZE = FreezeConfig(fraction=0.5, select="magnitude")


def build(stage: int, compact: bool, dtype: str):
    model = tiny_gpt2()
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "weight_decay": 0.1, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "gradient_clipping": 1.0,
        "sparsity": {"method": "rigl", "sparsity": 0.8, "distribution": "erk", "update_interval": 4,
                     "grow_grad_steps": 1,  # explicit: the default differs with compact state, compression, kernels
                     "start_step": 0, "end_step": 10, "drop_fraction": 0.5, "compact_state": compact},
    }
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    ds_config, sparsity, compression = split_deepspeed_json(config)
    check_freeze(FREEZE, sparsity, compression)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = param_groups(model, sparsity, "AdamW", [{"params": decay}, {"params": rest, "weight_decay": 0.0}])
    plan = predicted_bytes(model, sparsity, groups, stage, dtype, compact)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    engine = attach(engine, model, sparsity, total_steps=STEPS, seed=3, freeze=FREEZE)
    engine.predicted_bytes = plan
    return engine


def predicted_bytes(model, sparsity, groups, stage: int, dtype: str, compact: bool) -> dict:
    """What ``dist-sparse plan`` predicts for this run (the largest rank), from the same model and groups."""
    densities = layer_densities(model, sparsity)
    setting = P.model_setting(model, set(densities), densities, groups, frozen_fraction=FREEZE.fraction,
                              world_size=int(os.environ["WORLD_SIZE"]), zero_stage=stage, precision=dtype,
                              compact_state=compact)
    return P.summarize(P.predict(setting))


def model_range(engine, v) -> torch.Tensor:
    """The model's low-precision weights of this rank's range of ``v`` (ZeRO-3: its shard)."""
    if engine.zero_optimization_stage() == 3:
        return v.param.ds_tensor.detach().reshape(-1).narrow(0, 0, v.mask_len)
    return v.param.detach().reshape(-1).narrow(0, v.mask_start, v.mask_len)


def frozen_snapshot(engine) -> dict:
    sp = engine.sparsifier
    out = {}
    for v in sp.views:
        f = sp.frozen_mask(v.name)
        out[v.name] = (f, v.master()[f].clone(), model_range(engine, v)[f].clone())
    return out


def frozen_kept(engine, initial: dict) -> bool:
    sp = engine.sparsifier
    ok = True
    for v in sp.views:
        f, master, lp = initial[v.name]
        ok &= torch.equal(sp.frozen_mask(v.name), f) and bool(sp.mask(v.name)[f].all())
        ok &= torch.equal(v.master()[f], master) and torch.equal(model_range(engine, v)[f], lp)
    return bool(ok)


def expected_bytes(engine) -> dict:
    """The compact run's state bytes from the masks, the packed store holding only trainable weights."""
    store, sp = engine.compact, engine.sparsifier
    trainable = sum(int(sp.trainable_mask(v.name).sum()) if v.name in sp.order else v.mask_len
                    for v in engine.param_views if v.group is not None)
    started = bool(store.opt.state)
    bits = sum(packed_nbytes(v.mask_len) for v in sp.views)
    return {"master_weights": 0 if getattr(store, "master_in_lp", False) else 4 * trainable,
            "optimizer_state": (8 * trainable + 4 * len(store.parts)) if started else 0,
            "gradients": store.lp_parts[0].element_size() * trainable,
            "masks": 3 * bits}  # mask bits, frozen bits, trainable bits (the packed reduction's layout)


def batches(rank: int) -> list:
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randint(0, 48, (2, 16), generator=g) for _ in range(STEPS)]


def train(engine, xs: list, first: int, report: dict, initial: dict | None, save_to: Path | None = None) -> None:
    cfg = from_dict({})
    for step in range(first, STEPS):
        x = xs[step]
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        update = engine.sparsifier.method.is_update_step(engine.global_steps)
        expected = expected_bytes(engine) if engine.compact is not None and not update else None
        engine.step()
        report["losses"].append(float(loss))
        if initial is not None:
            report["frozen_kept"].append(frozen_kept(engine, initial))
        if expected is not None:
            report["bytes"].append({k: engine.state_bytes[k] for k in expected})
            report["expected"].append(expected)
        if save_to is not None and step + 1 == SAVE_AT:
            save_checkpoint(engine, save_to, SAVE_AT, cfg)


def final_state(engine) -> dict:
    return {v.name: (engine.sparsifier.mask(v.name).clone(), v.master().clone(),
                     {k: v.state(k).clone() for k in ("exp_avg", "exp_avg_sq")}) for v in engine.sparsifier.views}


def same_state(a: dict, b: dict) -> bool:
    return all(torch.equal(a[n][0], b[n][0]) and torch.equal(a[n][1], b[n][1])
               and all(torch.equal(a[n][2][k], b[n][2][k]) for k in a[n][2]) for n in a)


def run(stage: int, compact: bool, dtype: str, save_to: Path | None) -> tuple:
    engine = build(stage, compact, dtype)
    report = {"losses": [], "frozen_kept": [], "bytes": [], "expected": []}
    initial = frozen_snapshot(engine)
    report["frozen_local"] = sum(int(f.sum()) for f, _, _ in initial.values())
    train(engine, batches(D.rank()), 0, report, initial, save_to)
    report["counts"] = freeze_counts(engine, engine.module)
    report["plan"] = engine.predicted_bytes
    report["last_bytes"] = dict(engine.state_bytes)
    report["updates"] = engine.sparsifier.updates_done
    deepspeed.comm.barrier()
    return report, final_state(engine)


def resumed(stage: int, dtype: str, ckpt: Path) -> tuple:
    engine = build(stage, True, dtype)
    start = restore(engine, ckpt)
    report = {"losses": [], "frozen_kept": [], "bytes": [], "expected": []}
    train(engine, batches(D.rank()), start, report, None)
    deepspeed.comm.barrier()
    return report["losses"], final_state(engine)


def same_checkpoint(a: Path, b: Path) -> bool:
    """Every tensor of this rank's shard equal in both checkpoints (the format does not depend on compact state)."""
    name = f"rank_{D.rank():05d}.safetensors"
    x, y = load_file(str(a / name)), load_file(str(b / name))
    return set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x) and any(k.endswith("::frozen") for k in x)


def main():
    out, cases, root = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    results = []
    for k, (stage, dtype) in enumerate(cases):
        save = k == 0
        dense, dense_final = run(stage, False, dtype, root / "dense" if save else None)
        compact, compact_final = run(stage, True, dtype, root / "compact" if save else None)
        r = {"dense": dense, "compact": compact, "final_equal": same_state(dense_final, compact_final)}
        if save:
            ckpt = f"step_{SAVE_AT:08d}"
            r["checkpoint_equal"] = same_checkpoint(root / "dense" / ckpt, root / "compact" / ckpt)
            tail = compact["losses"][SAVE_AT:]
            for source in ("compact", "dense"):
                losses, final = resumed(stage, dtype, root / source / ckpt)
                r[f"resume_{source}"] = {"losses_equal": losses == tail, "losses": losses,
                                         "final_equal": same_state(final, compact_final)}
        results.append(r)
    finish(results, out)


if __name__ == "__main__":
    main()
