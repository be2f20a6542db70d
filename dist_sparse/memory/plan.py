"""Predicted per-rank training-state bytes (the formula behind ``dist-sparse plan`` and the memory bench).

The categories are those measured into ``summary.json``'s ``state_bytes_per_rank``
(:mod:`dist_sparse.integration.accounting`). The prediction follows how DeepSpeed lays a ZeRO-1/2 run out
(``deepspeed/runtime/zero/stage_1_and_2.py``): each optimizer group is flattened in parameter order, padded to a
multiple of ``2 * world`` elements and split into ``world`` equal partitions; a rank holds

- ``weights``: every group's whole flat low-precision buffer (the model is replicated);
- ``master_weights``: its fp32 partition (compact: 4 B per active position in it);
- ``optimizer_state``: Adam's two fp32 moments of the same extent (+ one 4-byte step counter per group);
- ``gradients``: dense: DeepSpeed's contiguous partition buffer, which holds the *whole* gradient of every
  parameter that overlaps the partition, in low precision; compact: the active positions only;
- ``masks``: one bit per sparsified position of its partition. The packed gradient reduction of compact state
  selects the active coordinates of each rank's whole local gradient by a tensor's full mask, built from the
  ranks' shards when that tensor's gradient arrives and released (:func:`transients`: ``mask_bits_in_flight``,
  the largest tensor's bits; :func:`mask_traffic`: the bits' all-gathers every step); with
  ``replicate_masks`` (``sparsity.replicate_masks``) the full masks of every sparsified parameter are kept
  instead, 1 bit per weight on every rank, and ``masks`` includes them.

A sparsified parameter of density ``d`` contributes ``d`` active positions per position of its range (random
masks spread active weights evenly, so the expectation is what a rank holds within a fraction of a percent).
ZeRO-0 replicates everything (fp32: the parameters are the master weights).

ZeRO-3 (``deepspeed/runtime/zero/stage3.py``, one sub-group per optimizer group: DeepSpeed's default
``sub_group_size`` of 1e9) shards *every parameter*: a rank holds ``ceil(numel / N)`` elements of each (the last
rank's shard padded), so

- ``weights``: its low-precision shards, plus the whole low-precision tensor of every *persistent* parameter
  (``numel <= stage3_param_persistence_threshold``, 1e5 by default: DeepSpeed keeps those gathered);
- ``master_weights``: a dense fp32 copy of the shards (DeepSpeed 0.19 keeps one at fp32 too); compact: 4 B per
  active position at bf16, nothing at fp32 (the active master values are the fp32 shard's own);
- ``optimizer_state``: moments of the shards (compact: active positions) + one step counter per sub-group;
- ``gradients``: dense: the gradient shards (low precision) and the reduction bucket, which DeepSpeed keeps
  allocated (``reduce_bucket_size`` elements of the low-precision type); compact: the active positions only (the
  bucket is released between backward passes);
- ``masks``: one bit per sparsified position of its (unpadded) shards (compact state with ``replicate_masks``
  adds the full masks, as at ZeRO-1/2).

Freezing and RigL's growth window add what the sparse components keep (as the accounting counts it):
``freeze.modules`` parameters belong to no optimizer group, so only their weights are held (``Setting.held``);
``freeze.fraction`` adds the frozen bits (compact state also the trainable bits its packed reduction lays out by,
and steps only active, unfrozen positions; masked-dense keeps an fp32 copy of the frozen values); a reached
``freeze.schedule`` entry keeps its range's fp32 masters and, at ZeRO-1/2, gets DeepSpeed's zeros for its missing
gradient; a growth window keeps fp32 gradient sums over the rank's range of every sparsified tensor.

Without a model (``--params``), groups are not known: the prediction divides evenly, which is what the layout
gives up to one parameter's worth of partition boundary.
"""

import math
from dataclasses import dataclass, field

from dist_sparse.errors import DistSparseError

LP_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
CATEGORIES = ("weights", "gradients", "master_weights", "optimizer_state", "masks", "compression_residuals")


class PlanError(DistSparseError, ValueError):
    """Bad input to the planner; ``key`` names the option."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass
class Param:
    name: str
    numel: int
    density: float = 1.0  # fraction kept; 1.0 for parameters that are not sparsified
    sparse: bool = False
    frozen: float = 0.0  # freeze.fraction: the share of the kept positions frozen (sparsified parameters only)
    # a freeze.schedule entry stops its gradient during the run: at ZeRO-1/2 DeepSpeed then flattens zeros of its
    # size into the partition's gradient at every step (``get_all_grad_tensors``), counted under ``gradients``
    # (and the rank's range of its fp32 masters is kept to write them back after every step: ``master_weights``)
    scheduled: bool = False
    # ZeRO-1/2 with compact state and the block-sparse kernel on this layer: its weights are held as their active
    # values only (docs/kernels.md, "Weights held as blocks")
    blocks: bool = False


@dataclass
class Setting:
    world_size: int
    zero_stage: int
    precision: str = "fp32"
    compact_state: bool = False
    # ZeRO-3, compact state + packed gather: a sparsified shard is stored as its active values (+ its mask bits,
    # counted under masks); parameters kept whole (persistence threshold) and dense ones keep their dense shards
    packed_shards: bool = False
    groups: list = field(default_factory=list)  # list of lists of Param, in DeepSpeed's flatten order
    # ZeRO-3 only (DeepSpeed's defaults): zero_optimization.reduce_bucket_size, stage3_param_persistence_threshold
    reduce_bucket_size: int = 500_000_000
    persistence_threshold: int = 100_000
    # gradient compression's per-rank state (compression_residuals): buffers per coordinate (error feedback's
    # residual 1, momentum correction +1, Adam's momentum correction +2 more: RESIDUAL_BUFFERS), bytes per element
    # (compression.residual_dtype) and, for compression.scope inter_node, the ranks per node that split each tensor
    residual_buffers: int = 0
    residual_bytes: int = 4
    residual_slice: int = 1
    # compact state: keep the full masks on every rank between mask changes (sparsity.replicate_masks) instead of
    # building each tensor's from the shards when it is needed
    replicate_masks: bool = False
    # elements of the largest sparsified tensor (what bounds the masks' transient); None: the largest sparsified
    # Param of ``groups`` (the --params form has no real tensors and passes its estimate)
    largest_tensor: int | None = None
    gradient_accumulation_steps: int = 1
    # parameters outside every optimizer group (freeze.modules): only their weights are held, as DeepSpeed lays
    # the module out (ZeRO 0-2: the whole low-precision tensor on every rank; ZeRO-3: shards, persistent ones whole)
    held: list = field(default_factory=list)
    # RigL's growth window (grow_grad_steps > 1): the fp32 sum of the dense gradient of every sparsified position
    # the rank scores, kept over the window (``gradients``)
    grow_window_sums: bool = False
    # the same window kept by the compressed exchange: the fp32 sum of the rank's full local gradient of every
    # sparsified tensor (``gradients``; the sparsifier's sums then exist only within the update step)
    grow_window_local_sums: bool = False

    def check(self) -> None:
        if self.world_size < 1:
            raise PlanError("--world-size", f"must be >= 1, got {self.world_size}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise PlanError("--zero-stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in LP_BYTES:
            raise PlanError("--precision", f"must be one of {', '.join(LP_BYTES)}, got {self.precision!r}")
        if self.compact_state and self.zero_stage not in (1, 2, 3):
            raise PlanError("--compact-state", f"is supported with ZeRO stages 1, 2 and 3, not {self.zero_stage}")
        if self.packed_shards and (self.zero_stage != 3 or not self.compact_state):
            raise PlanError("--packed-gather", "packed parameter shards need ZeRO stage 3 and --compact-state (got "
                                               f"stage {self.zero_stage}, compact_state={self.compact_state})")
        if self.largest_tensor is not None and self.largest_tensor < 1:
            raise PlanError("--largest-tensor", f"must be >= 1 element, got {self.largest_tensor}")
        for group in self.groups:
            for p in group:
                if not 0.0 < p.density <= 1.0:
                    raise PlanError("--sparsity", f"density of {p.name} must be in (0, 1], got {p.density}")
                if not 0.0 <= p.frozen < 1.0:
                    raise PlanError("freeze.fraction", f"of {p.name} must be in [0, 1), got {p.frozen}")


RESIDUAL_DTYPE_BYTES = {"fp32": 4, "bf16": 2}


def residual_buffers(compression, adam: bool) -> int:
    """Per-coordinate buffers gradient compression keeps on every rank for ``compression`` (a CompressionConfig or
    None): error feedback's residual; with momentum correction the local momentum, and for Adam/AdamW the local
    second moment and the squared momentum behind its estimate (:mod:`dist_sparse.compression.feedback`)."""
    if compression is None or not compression.enabled or not compression.error_feedback:
        return 0
    c = compression.resolved_for("adamw" if adam else "sgd")
    return 1 + (1 + 2 * bool(adam)) * bool(c.momentum_correction)


def compression_residual_bytes(setting: Setting) -> int:
    """What every rank keeps of gradient compression's state: each buffer covers the rank's whole local gradient
    of every trainable tensor (a rank keeps what it did not send). Compact state keeps a sparsified tensor's buffers
    packed by its mask (``density`` x numel values, of one node-slice with the inter-node scope) plus the mask bits
    of the layout; with the inter-node scope a dense tensor's buffers are packed to its slice the same way.
    Otherwise the buffers are full tensors (zeros at pruned coordinates and outside the slice)."""
    if setting.residual_buffers == 0:
        return 0
    per = setting.residual_buffers * setting.residual_bytes
    total = 0.0
    for p in (q for g in setting.groups for q in g):
        if not setting.compact_state:
            total += per * p.numel
        elif p.sparse or setting.residual_slice > 1:
            total += per * p.numel * (p.density if p.sparse else 1.0) / setting.residual_slice
            total += math.ceil(p.numel / 8)
        else:
            total += per * p.numel
    return int(round(total))


def _total(out: dict) -> dict:
    out = {k: int(round(out.get(k, 0))) for k in CATEGORIES}
    out["total"] = sum(out[k] for k in CATEGORIES)
    return out


def predict(setting: Setting) -> list:
    """Predicted bytes per rank (a list of dicts, one per rank, categories + ``total``)."""
    setting.check()
    n, lp = setting.world_size, LP_BYTES[setting.precision]
    params = [p for g in setting.groups for p in g]
    total = sum(p.numel for p in params)
    sparse_numel = sum(p.numel for p in params if p.sparse)
    if setting.zero_stage == 0:
        master = 0 if setting.precision == "fp32" else 4 * total
        out = {"weights": lp * (total + sum(p.numel for p in setting.held)), "gradients": lp * total,
               "master_weights": master, "optimizer_state": 8 * total + 4 * len(setting.groups),
               "masks": math.ceil(sparse_numel / 8), "compression_residuals": compression_residual_bytes(setting)}
        for p in params:
            if p.sparse and p.frozen:  # frozen bits, and the frozen values the sparsifier keeps to restore
                out["masks"] += math.ceil(p.numel / 8)
                out["master_weights"] += 4 * p.numel * p.density * p.frozen
        ranks = [dict(out) for _ in range(n)]
        if setting.grow_window_sums:  # each rank scores an even chunk of every sparsified tensor
            for out in ranks:
                out["gradients"] += 4 * sum(math.ceil(p.numel / n) for p in params if p.sparse)
        _add_local_window_sums(setting, ranks, sparse_numel)
        return [_total(r) for r in ranks]
    ranks = [_stage3_rank(setting, r) for r in range(n)] if setting.zero_stage == 3 else _stage12_ranks(setting)
    for r, out in enumerate(ranks):
        out["weights"] += sum(_held_weight_bytes(setting, p, r) for p in setting.held)
    if setting.compact_state and setting.replicate_masks:  # every full mask kept, replicated (packed per tensor)
        replicated = sum(math.ceil(p.numel / 8) for p in params if p.sparse)
        for out in ranks:
            out["masks"] += replicated
    residuals = compression_residual_bytes(setting)
    for out in ranks:
        out["compression_residuals"] += residuals
    _add_local_window_sums(setting, ranks, sparse_numel)
    return [_total(r) for r in ranks]


def _add_local_window_sums(setting: Setting, ranks: list, sparse_numel: int) -> None:
    """The growth window kept by the compressed exchange: every rank sums its full local gradient, in fp32."""
    if setting.grow_window_local_sums:
        for out in ranks:
            out["gradients"] += 4 * sparse_numel


def _zero3_width(setting: Setting, numel: int) -> int:
    """ZeRO-3: bytes each rank hands to the all-gather of one tensor's shard bits (``ceil(numel / N)`` bits)."""
    return math.ceil(math.ceil(numel / setting.world_size) / 8)


def transients(setting: Setting) -> dict:
    """Per-rank transients of the prediction: ``mask_bits_in_flight``, compact state's one tensor's full mask bits
    while the packed reduction builds it (sharded masks; 0 with ``replicate_masks``, without compact state or on
    one rank), bounded by the largest sparsified tensor: at ZeRO-3 the all-gather's N padded shards, at ZeRO-1/2
    the owners' broadcast parts (the tensor's bits)."""
    setting.check()
    sparse = [p.numel for g in setting.groups for p in g if p.sparse]
    if not setting.compact_state or setting.replicate_masks or setting.world_size == 1 or not sparse:
        return {"mask_bits_in_flight": 0}
    largest = setting.largest_tensor if setting.largest_tensor is not None else max(sparse)
    if setting.zero_stage == 3:
        return {"mask_bits_in_flight": setting.world_size * _zero3_width(setting, largest)}
    return {"mask_bits_in_flight": math.ceil(largest / 8)}


def mask_traffic(setting: Setting) -> dict:
    """Per rank and optimizer step without a mask update, compact state's packed reduction (the largest rank):
    the bytes handed to build every sparsified tensor's full mask once per reduction (stages 2/3 take every
    micro-batch's gradient; ``handed``: at ZeRO-3 every tensor's shard bits, at ZeRO-1/2 the bits of the rank's
    own partition, which its owner broadcasts), the bits arriving from the other ranks (``received``), and the
    packed gradient values handed to the all-reduce for comparison (``packed_gradient``: element size x the
    model's active weights; bf16 with accumulation at stages 2/3 reduces every micro-batch). Sharded masks only:
    with ``replicate_masks`` the bits move only when the masks change (``handed`` and ``received`` 0)."""
    setting.check()
    params = [p for g in setting.groups for p in g]
    lp = LP_BYTES[setting.precision]
    gas = max(1, setting.gradient_accumulation_steps)
    takes = gas if setting.zero_stage >= 2 else 1
    per_micro = gas > 1 and lp == 2 and setting.zero_stage >= 2
    active = sum(p.numel * p.density for p in params)
    if not setting.compact_state:
        return {"handed": 0, "received": 0, "packed_gradient": 0}
    packed = int(round(lp * active * (gas if per_micro else 1)))
    if setting.replicate_masks or setting.world_size == 1:
        return {"handed": 0, "received": 0, "packed_gradient": packed}
    n = setting.world_size
    if setting.zero_stage == 3:
        width = sum(_zero3_width(setting, p.numel) for p in params if p.sparse)
        return {"handed": takes * width, "received": takes * (n - 1) * width, "packed_gradient": packed}
    own = [r["masks"] for r in _stage12_ranks(setting)]  # each rank's bits of its partition
    full = sum(own)
    return {"handed": takes * max(own), "received": takes * max(full - b for b in own), "packed_gradient": packed}


def stage12_partition(numel: int, world: int) -> int:
    """Elements per rank of one flattened ZeRO-1/2 group: padded to a multiple of ``2 * world``, split evenly."""
    return math.ceil(numel / (2 * world)) * 2 * world // world


def _stage12_ranks(setting: Setting) -> list:
    """What each rank holds at ZeRO-1/2 (see the module docstring)."""
    n, lp = setting.world_size, LP_BYTES[setting.precision]
    ranks = [dict.fromkeys(CATEGORIES, 0.0) for _ in range(n)]
    for group in setting.groups:
        part = stage12_partition(sum(p.numel for p in group), n)
        aligned = part * n
        # held weights: the group's buffer stores their active values and everyone else's values, no padding
        weight_values = sum(p.numel * p.density if p.blocks else p.numel for p in group) \
            if setting.compact_state and any(p.blocks for p in group) else aligned
        offsets = [0]
        for p in group:
            offsets.append(offsets[-1] + p.numel)
        for r, out in enumerate(ranks):
            lo, hi = r * part, (r + 1) * part
            out["weights"] += lp * weight_values
            touched, act = 0, 0.0
            for p, start in zip(group, offsets):
                overlap = min(hi, start + p.numel) - max(lo, start)
                if overlap <= 0:
                    continue
                touched += p.numel
                act += overlap * p.density * (1.0 - p.frozen)  # what compact state steps: active, not frozen
                if p.scheduled:  # DeepSpeed's zeros for it, and the range's masters kept to write them back
                    out["gradients"] += lp * p.numel
                    out["master_weights"] += 4 * overlap
                if p.sparse:
                    _add_sparse_range(out, setting, p, overlap)
            out["optimizer_state"] += 4  # Adam's step counter of the group
            _add_state(out, setting, act, part, touched)
    return ranks


def _add_sparse_range(out: dict, setting: Setting, p: Param, length: int) -> None:
    """What a rank keeps for ``length`` positions of a sparsified parameter beside weights and optimizer state:
    mask bits; with freeze.fraction the frozen bits, and either the trainable bits compact state's packed
    reduction lays out by or (masked-dense) the frozen positions' fp32 values the sparsifier restores after every
    step; with a growth window the fp32 gradient sums."""
    bits = math.ceil(length / 8)
    out["masks"] += bits
    if p.frozen:
        out["masks"] += 2 * bits if setting.compact_state else bits
        # compact state: the model's own weights hold the frozen values; a scheduled parameter's whole range
        # replaces them once its entry is reached (counted with the schedule)
        if not setting.compact_state and not p.scheduled:
            out["master_weights"] += 4 * length * p.density * p.frozen
    if setting.grow_window_sums:
        out["gradients"] += 4 * length


def _held_weight_bytes(setting: Setting, p: Param, r: int) -> float:
    """Weights of a parameter no optimizer group holds (freeze.modules), on rank ``r``."""
    lp = LP_BYTES[setting.precision]
    if setting.zero_stage != 3:
        return lp * p.numel
    per_rank = math.ceil(p.numel / setting.world_size)
    return lp * per_rank + (lp * p.numel if p.numel <= setting.persistence_threshold else 0)


def _add_state(out: dict, setting: Setting, active: float, extent: int, grad_extent: int,
               master_per_active: int = 4) -> None:
    """Master weights, moments and gradients of a range: compact keeps ``active`` positions (master
    ``master_per_active`` bytes each), dense DeepSpeed ``extent`` (its gradient buffer ``grad_extent``)."""
    lp = LP_BYTES[setting.precision]
    if setting.compact_state:
        out["master_weights"] += master_per_active * active
        out["optimizer_state"] += 8 * active
        out["gradients"] += lp * active
    else:
        out["master_weights"] += 4 * extent
        out["optimizer_state"] += 8 * extent
        out["gradients"] += lp * grad_extent


def _stage3_rank(setting: Setting, r: int) -> dict:
    """What rank ``r`` holds at ZeRO-3 (see the module docstring)."""
    n, lp = setting.world_size, LP_BYTES[setting.precision]
    out = dict.fromkeys(CATEGORIES, 0.0)
    for group in setting.groups:
        out["optimizer_state"] += 4  # Adam's step counter of the sub-group
        for p in group:
            per_rank = math.ceil(p.numel / n)
            start = min(p.numel, r * per_rank)
            length = max(0, min(per_rank, p.numel - start))
            persistent = p.numel <= setting.persistence_threshold
            if setting.packed_shards and p.sparse and not persistent and n > 1:
                out["weights"] += lp * length * p.density  # the active values of the shard (padding not stored)
            else:
                out["weights"] += lp * per_rank
            if persistent:
                out["weights"] += lp * p.numel
            if p.sparse:
                _add_sparse_range(out, setting, p, length)
            # compact fp32: the active master values are the fp32 shard's own (no packed copy between steps)
            _add_state(out, setting, length * p.density * (1.0 - p.frozen), per_rank, per_rank,
                       0 if setting.precision == "fp32" else 4)
    if not setting.compact_state:
        out["gradients"] += lp * setting.reduce_bucket_size
    return out


def uniform_setting(params: float, sparsity: float, sparsified_fraction: float, **kwargs) -> Setting:
    """A setting without a model: ``params`` parameters, of which ``sparsified_fraction`` are sparsified to
    ``sparsity``, in one group per rank-sized piece (even division)."""
    if not params >= 1:
        raise PlanError("--params", f"must be >= 1, got {params}")
    if not 0.0 <= sparsity < 1.0:
        raise PlanError("--sparsity", f"must be in [0, 1), got {sparsity}")
    if not 0.0 <= sparsified_fraction <= 1.0:
        raise PlanError("--sparsified-fraction", f"must be in [0, 1], got {sparsified_fraction}")
    sparse = int(round(params * sparsified_fraction))
    dense = int(round(params)) - sparse
    world = kwargs.get("world_size", 1)
    # interleave sparse and dense in world-size pieces so every rank gets its share of each (even division)
    group = []
    for r in range(max(1, world)):
        group.append(Param(f"sparse_{r}", sparse // max(1, world) + (r < sparse % max(1, world)),
                           1.0 - sparsity, True))
        group.append(Param(f"dense_{r}", dense // max(1, world) + (r < dense % max(1, world))))
    group = [p for p in group if p.numel > 0]
    return Setting(groups=[group], **kwargs)


def model_setting(model, names: list, densities: dict, param_groups: list, frozen_fraction: float = 0.0,
                  scheduled: frozenset = frozenset(), blocks: frozenset = frozenset(), **kwargs) -> Setting:
    """A setting from a (meta-device) model: ``param_groups`` as given to DeepSpeed (lists of parameters),
    ``names`` the sparsified parameter names, ``densities`` name -> density, ``frozen_fraction`` freeze.fraction,
    ``scheduled`` the names a freeze.schedule entry stops during the run, ``blocks`` those held as their active
    blocks (compact state + block-sparse kernels at ZeRO-1/2). Parameters in no group (frozen modules) are held as
    weights only."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    groups, grouped = [], set()
    for group in param_groups:
        ps = []
        for p in group["params"] if isinstance(group, dict) else group:
            name = by_id[id(p)]
            sparse = name in names
            grouped.add(name)
            ps.append(Param(name, p.numel(), densities.get(name, 1.0) if sparse else 1.0, sparse,
                            frozen_fraction if sparse else 0.0, name in scheduled, sparse and name in blocks))
        if ps:
            groups.append(ps)
    held = [Param(n, p.numel()) for n, p in model.named_parameters() if n not in grouped]
    return Setting(groups=groups, held=held, **kwargs)


def dense_baseline(setting: Setting) -> Setting:
    """The same model under plain DeepSpeed: no compact state, no masks."""
    groups = [[Param(p.name, p.numel) for p in g] for g in setting.groups]
    return Setting(world_size=setting.world_size, zero_stage=setting.zero_stage, precision=setting.precision,
                   compact_state=False, groups=groups, held=list(setting.held),  # the same frozen modules
                   reduce_bucket_size=setting.reduce_bucket_size,
                   persistence_threshold=setting.persistence_threshold,
                   gradient_accumulation_steps=setting.gradient_accumulation_steps)  # no compression state either


def summarize(per_rank: list) -> dict:
    """Per category, the maximum over ranks (``total``: the largest rank total), as in ``summary.json``."""
    return {k: max(r[k] for r in per_rank) for k in per_rank[0]}
