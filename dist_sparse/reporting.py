"""What a run reports at its end: the byte counts of ``summary.json`` (gradient traffic, per-rank state), gathered
from the engine's components. Every function here is a collective (all ranks call it)."""

import torch

from dist_sparse import distributed as D
from dist_sparse import preflight
from dist_sparse.integration.ds_compression import dense_comm_bytes_per_step


def comm_summary(engine, steps: int) -> dict:
    """Gradient bytes per optimizer step and rank: measured by the compressed exchange; without
    compression DeepSpeed's own reduction moves exactly ``dense_comm_bytes_per_step`` (the same formula)."""
    comp = engine.compression
    if comp is None:
        params = [p for p in engine.module.parameters() if p.requires_grad]
        dense = float(dense_comm_bytes_per_step(engine.engine, params)) if D.world_size() > 1 else 0.0
        # DeepSpeed's reduction is one collective over the world: between nodes as soon as there are two
        crosses = len(set(preflight.node_layout())) > 1
        return {"comm_bytes_per_step": dense, "dense_comm_bytes_per_step": dense,
                "intra_node_comm_bytes_per_step": 0.0 if crosses else dense,
                "inter_node_comm_bytes_per_step": dense if crosses else 0.0,
                "dense_inter_node_comm_bytes_per_step": dense if crosses else 0.0, "compression": "none"}
    stats = comp.stats(steps)
    keys = ("comm_bytes_per_step", "intra_node_comm_bytes_per_step", "inter_node_comm_bytes_per_step",
            "mask_sync_bytes_per_step")
    totals = torch.tensor([stats[k] for k in keys], dtype=torch.float64)
    D.all_reduce_sum(totals)  # mean over ranks (equal for top-k/random-k; threshold pads to the longest anyway)
    return {**{k: float(t) / D.world_size() for k, t in zip(keys, totals)},
            "dense_comm_bytes_per_step": stats["dense_comm_bytes_per_step"],
            "dense_inter_node_comm_bytes_per_step": stats["dense_inter_node_comm_bytes_per_step"],
            "compression": comp.compression.cfg.method, "compression_scope": comp.scope}


def param_gather_summary(engine, steps: int) -> dict:
    """ZeRO-3: ``param_gather_bytes_per_step`` (bytes this rank handed to the parameter all-gathers of forward and
    backward per optimizer step, measured) and ``dense_param_gather_bytes_per_step`` (what DeepSpeed's dense gather
    of the same parameters hands; equal without ``sparsity.packed_gather``), the maximum over ranks (every rank
    hands the same: payloads are padded to the largest), and ``param_gather`` (whether packed, gathers per step).
    Empty at stages 0-2, which gather no parameters. A collective."""
    gather = getattr(engine, "param_gather", None)
    if gather is None:
        return {}
    ranks = D.all_gather_object(gather.stats(steps))
    worst = max(ranks, key=lambda r: r["param_gather_bytes_per_step"])
    return {"param_gather_bytes_per_step": worst["param_gather_bytes_per_step"],
            "dense_param_gather_bytes_per_step": max(r["dense_param_gather_bytes_per_step"] for r in ranks),
            "param_gather": {"packed": worst["packed"], "gathers_per_step": worst["gathers_per_step"]}}


def state_bytes_summary(engine) -> dict:
    """``state_bytes_per_rank``: per category, the maximum over ranks of the bytes measured on a non-update step
    (``total``: the largest rank total); ``state_bytes_by_rank`` every rank's own; ``transient_bytes_per_rank``
    the dense gradient a compact run materialises on mask-update steps, the packed master a ZeRO-3 fp32
    compact run materialises inside the step, the dense shards packed shards materialise for DeepSpeed's dense
    gathers, compact state's packed exchange buffer and gradient compression's
    local-gradient stash (docs/memory.md). A collective."""
    store = getattr(engine, "compact", None)
    mine = {"state": engine.state_bytes, "dense_grad": store.transient_dense_grad_bytes if store else 0,
            # compact state at ZeRO-3 fp32: the packed master exists only inside the step (a transient)
            "master": getattr(store, "transient_master_bytes", 0) if store else 0,
            # packed shards (ZeRO-3): dense shards materialised for DeepSpeed's own dense gathers
            "dense_shards": store.shards.transient_dense_bytes if getattr(store, "shards", None) else 0}
    # compact state: bytes handed to the gradient reduction (packed on most steps) and its buffer
    reduction = getattr(store, "reduction", None)
    mine["reduce"] = reduction.stats() if reduction is not None else None
    mine["reduce_buffer"] = reduction.max_buffer_bytes if reduction is not None else 0
    # gradient compression (ZeRO-1/2): the fp32 local gradient stashed from backward to the exchange
    mine["stash"] = getattr(engine.compression, "max_stash_bytes", 0)
    # sharded masks: the gathered bits of the one tensor whose full mask a sender builds (packed reduction or
    # compression, whichever owns the reduction)
    sources = [getattr(reduction, "masks", None), getattr(engine.compression, "mask_source", None)]
    mine["mask_in_flight"] = max([s.max_in_flight for s in sources if s is not None], default=0)
    ranks = D.all_gather_object(mine)
    reduce = grad_reduce_summary(engine, [r["reduce"] for r in ranks])
    measured = [r["state"] for r in ranks if r["state"] is not None]
    if not measured:
        return {"state_bytes_per_rank": None, "state_bytes_by_rank": None, "transient_bytes_per_rank": None,
                "compact_state": engine.sparsity.compact_state, **reduce}
    return {
        "state_bytes_per_rank": {k: max(r[k] for r in measured) for k in measured[0]},
        "state_bytes_by_rank": [r["state"] for r in ranks],
        "transient_bytes_per_rank": {"dense_gradient_on_update_steps": max(r["dense_grad"] for r in ranks),
                                     "packed_master_during_step": max(r["master"] for r in ranks),
                                     "dense_shards_for_dense_gathers": max(r["dense_shards"] for r in ranks),
                                     "packed_gradient_exchange": max(r["reduce_buffer"] for r in ranks),
                                     "compression_local_gradient": max(r["stash"] for r in ranks),
                                     "mask_bits_in_flight": max(r["mask_in_flight"] for r in ranks)},
        "compact_state": engine.sparsity.compact_state,
        **reduce,
    }


def grad_reduce_summary(engine, per_rank: list) -> dict:
    """``grad_reduce_bytes_per_step`` (compact state's packed reduction; not the compression keys): bytes a rank
    hands to the gradient reduction collectives per optimizer step. Measured where compact state reduces packed
    gradients (``grad_reduce`` splits it into packed and dense steps); otherwise DeepSpeed's dense reduction, every
    gradient element once per reduction in the communication dtype (stages 2/3 reduce every micro-batch). The
    measured total includes the masks' all-gathers that build each tensor's full mask (``mask_sync_bytes_per_step``,
    0 between mask changes with ``sparsity.replicate_masks``)."""
    params = [p for p in engine.module.parameters() if p.requires_grad]
    dense = float(dense_comm_bytes_per_step(engine.engine, params))
    if not per_rank or per_rank[0] is None:
        return {"grad_reduce_bytes_per_step": dense,
                "grad_reduce": {"measured": False, "dense_deepspeed_bytes_per_step": dense}}
    worst = max(per_rank, key=lambda r: r["grad_reduce_bytes_per_step"])
    # the packed reduction's mask all-gathers (sharded masks), the key compression reports for its own
    return {"grad_reduce_bytes_per_step": worst["grad_reduce_bytes_per_step"],
            "mask_sync_bytes_per_step": worst["mask_sync_bytes_per_step"],  # the same rank as the total's
            "grad_reduce": {"measured": True, **{k: v for k, v in worst.items() if k != "grad_reduce_bytes_per_step"},
                            "dense_deepspeed_bytes_per_step": dense}}
