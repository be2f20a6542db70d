"""Predicted gradient bytes per rank and optimizer step (``dist-sparse plan --nodes``): DeepSpeed's dense reduction
and the compressed exchange, flat (``scope: all``) or between nodes only (``scope: inter_node``), split into
intra- and inter-node traffic as summary.json reports them.

The counting rules are the measured ones (:mod:`dist_sparse.compression.exchange`, :mod:`.hierarchical`):

- dense DeepSpeed: every gradient element once per reduction in the model's precision, ``gradient_accumulation_steps``
  reductions per step at ZeRO-2/3; one collective over the world, so it crosses nodes when there are two.
- compressed: per tensor a rank sends ``k = ceil(density x unpruned)`` coordinates of those it may send (ZeRO-1/2:
  outside its own partition range; ZeRO-3: outside its shard), as indices + fp32 values (``8 k`` bytes) or, when
  not larger, dense over its sendable coordinates (``4 n``); all tensors go into one all-gather padded to the
  group's longest payload. On a dense-gradient step (RigL's mask update) the sparsified tensors go dense over all
  their coordinates, and on an update that replaces the optimizer step the other tensors are not sent. Adam
  momentum correction adds a count sketch of 16 fp32 values per compressed tensor (one all-reduce).
- ``inter_node``: the node's dense fp32 all-reduce of the whole gradient (intra), then the exchange above among the
  N ranks with one local index, over their slice of every tensor (intra again at ZeRO-0 to share the slices).

Pruned coordinates are spread evenly over a tensor in expectation (random and ERK masks), so a range of ``m``
elements of a tensor of density ``d`` holds ``d m`` unpruned ones; the replicated-mask refresh after a mask update
(``mask_sync_bytes_per_step``) is not predicted.
"""

import math

from dist_sparse.compression.base import keep_count
from dist_sparse.compression.sketch import BUCKETS
from dist_sparse.memory.plan import LP_BYTES, Setting, stage12_partition


def _tensors(setting: Setting) -> list:
    """(numel, density, sparse, [per-rank (start, length) range]) of every parameter, ranges as DeepSpeed's ZeRO-1/2
    partitions cut the flattened groups, or ZeRO-3 shards each parameter (``[r s, (r + 1) s)``, ``s = ceil(numel /
    world)``); ``None`` at ZeRO-0 (every rank holds everything)."""
    n = setting.world_size
    out = []
    for group in setting.groups:
        part = stage12_partition(sum(p.numel for p in group), n)
        offset = 0
        for p in group:
            ranges = None
            if setting.zero_stage == 3:
                shard = math.ceil(p.numel / n)
                ranges = [(min(p.numel, r * shard), max(0, min(shard, p.numel - r * shard))) for r in range(n)]
            elif setting.zero_stage in (1, 2):
                ranges = []
                for r in range(n):
                    lo, hi = max(offset, r * part), min(offset + p.numel, (r + 1) * part)
                    ranges.append((lo - offset, max(0, hi - lo)))
            out.append((p.numel, p.density, p.sparse, ranges))
            offset += p.numel
    return out


def _payload(eligible: float, inside: float, density: float, dense_step: bool, numel_sendable: float) -> float:
    """int32 elements one rank's payload holds for one tensor (see the module docstring)."""
    if dense_step:
        return numel_sendable
    k = keep_count(int(round(eligible)), density) if eligible >= 0.5 else 0
    sendable = eligible - inside
    k = min(k, sendable)
    if sendable > 0 and 2 * k >= sendable:
        return sendable
    return 2 * k


def _exchange_bytes(tensors: list, members: list, slices, density: float, dense_grad: bool, replaces: bool,
                    sketch: bool, min_tensor_size: int = 0) -> float:
    """Bytes each member of one exchange group hands over in one step (the padded all-gather, + the sketches):
    ``slices(t_index) -> (slice length, [own length per member])`` says what of each tensor the group covers."""
    payloads = [0.0] * len(members)
    sketched = 0
    for i, (numel, d, sparse, _) in enumerate(tensors):
        dense_t = dense_grad and sparse
        if replaces and not dense_t:
            continue  # not exchanged: the update replaces the optimizer step
        covered, owns = slices(i)
        if not dense_t and sketch:
            sketched += min(BUCKETS, numel)
        for j, own in enumerate(owns):
            eligible = covered * (1.0 if dense_t else d)
            inside = own * (1.0 if dense_t else d)
            dens = 1.0 if numel < min_tensor_size else density  # small tensors go whole
            payloads[j] += _payload(eligible, inside, dens, dense_t, covered - own)
    if len(members) == 1:
        return 0.0
    return 4.0 * (max(payloads) + sketched)


def predict(setting: Setting, nodes: int, compression, steps: int, schedule=None, gas: int = 1,
            adam: bool = True, window_in_exchange: bool = False) -> dict:
    """summary.json's byte keys, per rank and optimizer step (mean over ``steps`` steps and over ranks).

    ``compression``: a ``CompressionConfig`` (or None / method ``none``); ``schedule``: the run's
    :class:`~dist_sparse.step.StepSchedule` (None: no mask updates); ``gas``: gradient accumulation steps;
    ``adam``: the optimizer is Adam/AdamW (momentum correction then sketches the energies);
    ``window_in_exchange``: RigL's growth window is kept in the exchange (each rank's local sum), so only the update
    steps exchange dense, not the window's steps before them."""
    world = setting.world_size
    if nodes < 1 or world % nodes:
        raise ValueError(f"--nodes: {nodes} nodes cannot hold {world} ranks evenly")
    per_node = world // nodes
    tensors = _tensors(setting)
    total = sum(t[0] for t in tensors)
    reductions = gas if setting.zero_stage >= 2 else 1
    dense = float(total * LP_BYTES[setting.precision] * reductions) if world > 1 else 0.0
    dense_inter = dense if nodes > 1 else 0.0
    out = {"dense_comm_bytes_per_step": dense, "dense_inter_node_comm_bytes_per_step": dense_inter}
    if compression is None or compression.method == "none":
        return {**out, "comm_bytes_per_step": dense, "intra_node_comm_bytes_per_step": dense - dense_inter,
                "inter_node_comm_bytes_per_step": dense_inter, "compression": "none"}
    inter_scope = compression.scope == "inter_node"
    group_size = nodes if inter_scope else world
    sketch = adam and bool(compression.momentum_correction) and group_size > 1  # Adam's energy sketches
    # ranks ordered node-major: rank = node * per_node + local
    groups = [[node * per_node + i for node in range(nodes)] for i in range(per_node)] if inter_scope \
        else [list(range(world))]

    def slices_for(members):
        def slices(i):
            numel, _, _, ranges = tensors[i]
            if ranges is None:  # ZeRO-0: no own range; the inter-node scope splits tensors into per-node chunks
                if not inter_scope:
                    return numel, [0] * len(members)
                li = members[0] % per_node
                return numel * (li + 1) // per_node - numel * li // per_node, [0] * len(members)
            owns = [ranges[r][1] for r in members]
            return sum(owns) if inter_scope else numel, owns
        return slices

    intra = inter = 0.0
    for step in range(steps):
        plan = schedule.plan(step) if schedule is not None else None
        dense_grad = bool(plan and plan.exchanges_dense(window_in_exchange))
        replaces = bool(plan and plan.replaces_optimizer_step)
        d = compression.density
        if compression.warmup_steps > 0 and step < compression.warmup_steps:
            d = compression.density ** (step / compression.warmup_steps)
        moved = [t[0] for t in tensors if not (replaces and not (dense_grad and t[2]))]
        exchanged = sum(_exchange_bytes(tensors, g, slices_for(g), d, dense_grad, replaces, sketch,
                                        compression.min_tensor_size) * len(g) for g in groups) / world
        if inter_scope:
            within = 4.0 * sum(moved) * (1 if per_node > 1 else 0)
            if setting.zero_stage == 0 and per_node > 1 and nodes > 1:
                within *= 2
            intra += within
            inter += exchanged if nodes > 1 else 0.0
        elif nodes > 1:
            inter += exchanged
        else:
            intra += exchanged
    steps = max(1, steps)
    return {**out, "comm_bytes_per_step": (intra + inter) / steps, "intra_node_comm_bytes_per_step": intra / steps,
            "inter_node_comm_bytes_per_step": inter / steps, "compression": compression.method,
            "compression_scope": compression.scope}
