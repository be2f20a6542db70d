"""Worker for tests/test_packed_shards.py (torchrun, CPU, gloo, 2 ranks): packed parameter shards at ZeRO-3.

The workers' tiny GPT-2, ZeRO-3, bf16, RigL 80% (mask updates at steps 2 and 4), compact state,
``stage3_param_persistence_threshold: 100`` (the weight matrices and embeddings are partitioned, the other biases
and the norms are kept whole), 20 steps from the same seed and batches (the batch of step s is drawn from a
generator seeded by (rank, s), so a resumed run sees the same data):

- ``dense``: compact state with dense shards and DeepSpeed's dense gather (``packed_gather`` off);
- ``packed``: compact state + ``packed_gather``, so packed shards; a checkpoint at step 10, the final export
  (``save_final``) after step 20;
- ``resumed``: a fresh packed-shards engine restored from that checkpoint, steps 11-20.

Per run: the losses, the full masks after every step, the coordinator's gathered tensors (observed as in
gather_worker.py), ``state_bytes_per_rank`` and, for the packed run, the ``weights`` formula (dense shards kept +
persistent parameters' whole tensors + element size x active values of the packed shards) and the dense shard
bytes it replaces; the consolidated 16-bit state dict (DeepSpeed's ``GatheredParameters``, which reads
materialised dense shards) at the end; the typed errors (``GatheredParameters(modifier_rank=0)``, packed shards
without packed_gather). Rank 0 writes a JSON report to argv[1]; argv[2] is a scratch directory.
"""

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from dist_sparse import checkpointing
from dist_sparse import config as C
from dist_sparse.errors import ConfigError
from dist_sparse.integration.engine import gathered_state_dict
from dist_sparse.integration.packed_shards import PackedShardError, PackedShards
from tests.workers import finish
from tests.workers.gather_worker import Observer, compare
from tests.workers.gather_worker import build as gather_build

STEPS, SAVE_AT = 20, 10


def build(packed: bool, dtype: str = "bf16"):
    """gather_worker's engine (persistence threshold 100, RigL 80%), compact state, one micro-batch per step."""
    return gather_build(packed, dtype, True, 1)


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * torch.distributed.get_rank() + step)
    return torch.randint(0, 48, (2, 16), generator=g)


def train(engine, obs, start: int, stop: int, report: dict, on_step=None) -> list:
    seq = []
    for step in range(start, stop):
        obs.masks(engine.sparsifier.full_masks())  # the observer's byte formula reads the masks (a collective)
        obs.gathered = []
        x = batch(step)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        report["losses"].append(float(loss))
        report["masks"].append({n: m.reshape(-1).tolist() for n, m in engine.sparsifier.full_masks().items()})
        seq.append(obs.gathered)
        if on_step is not None:
            on_step(engine, step + 1)
    return seq


def weights_formula(engine) -> dict:
    """What ``state_bytes_per_rank.weights`` must be with packed shards, from the masks and DeepSpeed's sizes."""
    shards = engine.compact.shards
    size = torch.empty(0, dtype=shards.lp_dtype).element_size()
    kept = sum(shards.param[n].ds_tensor.ds_numel for names in shards.dense_names for n in names)
    persistent = sum(p.ds_numel for p in engine.module.parameters() if p.ds_persist)
    active = sum(int(engine.sparsifier.mask(name).sum()) for _, name in shards.where.values())
    replaced = sum(shards.param[name].ds_tensor.ds_numel for _, name in shards.where.values())
    return {"formula": size * (kept + persistent + active), "dense_shard_bytes": size * (kept + persistent +
                                                                                            replaced),
            "packed_params": len(shards.where), "active": active, "replaced": replaced}


def state_dict_lists(engine) -> dict | None:
    sd = gathered_state_dict(engine)
    return None if sd is None else {k: v.float().reshape(-1).tolist() for k, v in sd.items()}


def main():
    out, scratch = sys.argv[1], Path(sys.argv[2])
    results = {}

    dense = build(False)
    obs = Observer(dense, False)
    results["dense"] = {"losses": [], "masks": []}
    dense_seq = train(dense, obs, 0, STEPS, results["dense"])
    results["dense"]["state_bytes"] = dense.state_bytes
    results["dense"]["export"] = state_dict_lists(dense)
    try:  # packed shards need the packed gather: a typed error naming the key, before anything is changed
        PackedShards(dense.compact, False)
        results["no_gather_error"] = None
    except ConfigError as exc:
        results["no_gather_error"] = [exc.key, str(exc)]
    del dense, obs

    packed = build(True)
    model = packed.module
    obs = Observer(packed, True)
    results["packed"] = {"losses": [], "masks": []}
    ckpt = {}
    cfg = C.from_dict({})

    def save(engine, step):
        if step == SAVE_AT:
            ckpt["path"] = str(checkpointing.save_checkpoint(engine, scratch / "checkpoints", step, cfg))

    packed_seq = train(packed, obs, 0, STEPS, results["packed"], on_step=save)
    r = results["packed"]
    r["state_bytes"] = packed.state_bytes
    r.update(weights_formula(packed))
    r["shard_stats"] = packed.compact.shards.stats()
    r["gather_stats"] = packed.param_gather.stats(STEPS)
    r["export"] = state_dict_lists(packed)  # DeepSpeed's GatheredParameters over materialised dense shards
    r["transient_dense_bytes"] = packed.compact.shards.transient_dense_bytes
    final = scratch / "final"
    data = SimpleNamespace(tokenizer=SimpleNamespace(save=lambda d: None))
    checkpointing.save_final(packed, model, packed.sparsifier, data, final)
    r["exported_files"] = sorted(p.name for p in final.iterdir()) if torch.distributed.get_rank() == 0 else None
    if torch.distributed.get_rank() == 0:
        from safetensors.torch import load_file

        saved = load_file(str(final / "model.safetensors"))
        r["exported_file"] = {k: v.float().reshape(-1).tolist() for k, v in saved.items()}
    import deepspeed

    w = packed.module.transformer.h[0].attn.c_attn.weight
    try:
        with deepspeed.zero.GatheredParameters([w], modifier_rank=0):
            with torch.no_grad():
                w.add_(1.0)  # a write behind the optimizer: refused, discarded
        r["modifier_error"] = None
    except PackedShardError as exc:
        r["modifier_error"] = str(exc)
    r["export_after_refusal"] = state_dict_lists(packed)  # the refused write left the shards as they were
    results["compare"] = compare(dense_seq, packed_seq)
    del packed, obs

    # fp32: the master is the low-precision shard (compact state keeps no packed master between steps), so with
    # packed shards the packed fp32 values are the master itself; 6 steps (mask updates at 2 and 4)
    fp32 = {}
    for label in ("dense", "packed"):
        engine = build(label == "packed", "fp32")
        o = Observer(engine, label == "packed")
        fp32[label] = {"losses": [], "masks": []}
        fp32[label]["seq"] = train(engine, o, 0, 6, fp32[label])
        fp32[label]["state_bytes"] = engine.state_bytes
        fp32[label]["export"] = state_dict_lists(engine)
        if label == "packed":  # a lottery rewind's re-masking (master in the packed values): no change
            checkpointing._apply_own_masks(engine)
            fp32[label]["export_after_remask"] = state_dict_lists(engine)
        del engine, o
    results["fp32"] = {"compare": compare(fp32["dense"].pop("seq"), fp32["packed"].pop("seq")), **fp32}

    resumed = build(True)
    obs = Observer(resumed, True)
    start = checkpointing.restore(resumed, Path(ckpt["path"]))
    results["resumed"] = {"losses": [], "masks": [], "start": start}
    train(resumed, obs, start, STEPS, results["resumed"])
    results["resumed"]["export"] = state_dict_lists(resumed)
    results["resumed"]["state_bytes"] = resumed.state_bytes
    finish(results, out)


if __name__ == "__main__":
    main()
