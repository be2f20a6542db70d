"""`dist-sparse plan`: predicted per-rank training-state bytes, before launching anything.

Two forms:

    dist-sparse plan --params 7e9 --world-size 8 --zero-stage 2 --sparsity 0.9 --precision bf16 [--compact-state]
    dist-sparse plan CONFIG [--set key=value ...] --world-size N [--compact-state]

The second builds the config's model on the meta device (no weights are allocated or read) to count its
parameters, which of them are sparsified and their per-layer densities (ERK/uniform), and lays them out exactly as
DeepSpeed's ZeRO-1/2 or ZeRO-3 partitioning does. Categories are those of ``summary.json``'s ``state_bytes_per_rank``
(weights, gradients, master weights, optimizer state, masks, compression residuals; activations and framework
buffers are not training state and are not included). ``--json`` prints machine-readable output.
"""

import argparse
import dataclasses
import json
import sys

from dist_sparse.compression.traffic import predict as predict_traffic
from dist_sparse.errors import DistSparseError
from dist_sparse.memory import gather as G
from dist_sparse.memory import plan as P


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-sparse plan", description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", help="a training config (YAML/JSON); omit to use --params")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--params", type=float, help="number of parameters (e.g. 7e9), without a config")
    p.add_argument("--sparsified-fraction", type=float, default=0.95,
                   help="with --params: fraction of parameters that are sparsified (default 0.95: a decoder's "
                        "projection matrices; embeddings, norms and biases stay dense)")
    p.add_argument("--world-size", type=int, required=True, help="number of data-parallel ranks")
    p.add_argument("--zero-stage", type=int, help="ZeRO stage (default: the config's, else 2)")
    p.add_argument("--sparsity", type=float, help="fraction of zeros in sparsified parameters (default: the "
                                                   "config's, else 0.9)")
    p.add_argument("--precision", choices=sorted(P.LP_BYTES), help="model precision (default: the config's "
                                                                     "bf16/fp16 flag, else fp32)")
    p.add_argument("--compact-state", action="store_true", default=None,
                   help="predict with sparsity.compact_state (default: the config's value)")
    p.add_argument("--packed-gather", action="store_true", default=None,
                   help="ZeRO-3: predict parameter gathers with sparsity.packed_gather (default: the config's value)")
    p.add_argument("--replicate-masks", action="store_true", default=None,
                   help="predict with sparsity.replicate_masks: compact state keeps every full mask on every rank "
                        "between mask changes (default: the config's value, else sharded)")
    p.add_argument("--largest-tensor", type=float, default=None,
                   help="elements of the largest sparsified tensor, which bounds the masks' transient (default: "
                        "the config's model; with --params 0.7%% of the sparsified parameters, a LLaMA-7B MLP "
                        "matrix's share)")
    p.add_argument("--device-memory-gib", type=float, default=None,
                   help="say whether the largest rank's training state fits in this many GiB")
    p.add_argument("--nodes", type=int, default=1,
                   help="nodes the ranks are spread over (evenly): gradient bytes per step are split into intra- and "
                        "inter-node traffic (compression.scope: inter_node compresses only the latter)")
    p.add_argument("--compression-density", type=float, default=None,
                   help="without a config: predict top-k gradient compression at this density (error feedback on)")
    p.add_argument("--compression-scope", choices=("all", "inter_node"), default="all",
                   help="without a config: the compression scope (with --compression-density)")
    p.add_argument("--residual-dtype", choices=sorted(P.RESIDUAL_DTYPE_BYTES), default=None,
                   help="the dtype of gradient compression's per-rank state (default: the config's "
                        "compression.residual_dtype, else fp32)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _from_config(args) -> tuple:
    import math

    import torch

    from dist_sparse import config as config_mod
    from dist_sparse.distributions import keep_counts, layer_densities
    from dist_sparse.freezing import freeze_modules, module_parameters
    from dist_sparse.integration import hf
    from dist_sparse.integration.experts import layer_shapes, parameter_counts
    from dist_sparse.parameterization import split_groups
    from dist_sparse.trainer import weight_decay_groups

    cfg = config_mod.load(args.config, args.overrides)
    ds = cfg.deepspeed
    stage = args.zero_stage if args.zero_stage is not None else cfg.zero_stage
    precision = args.precision or ("bf16" if (ds.get("bf16") or {}).get("enabled") else
                                   "fp16" if (ds.get("fp16") or {}).get("enabled") else "fp32")
    sparsity = args.sparsity if args.sparsity is not None else cfg.sparsity.sparsity
    compact = cfg.sparsity.compact_state if args.compact_state is None else args.compact_state
    replicate = cfg.sparsity.replicate_masks if args.replicate_masks is None else args.replicate_masks
    if not 0.0 <= sparsity < 1.0:
        raise P.PlanError("--sparsity", f"must be in [0, 1), got {sparsity}")
    vocab = _vocab_size(cfg)
    with torch.device("meta"):
        model = hf.build_causal_lm(cfg.model, vocab, cfg.attention)
    freeze_modules(model, cfg.freeze.modules)  # as training does: no optimizer state, not sparsified
    params = dict(model.named_parameters())
    names = []
    if cfg.sparsity.method != "none":
        names = [n for n in hf.sparsifiable_parameters(model, cfg.sparsity.params, cfg.sparsity.exclude)
                 if params[n].requires_grad]
    shapes = {n: tuple(params[n].shape) for n in names}
    layers = layer_shapes(shapes)  # fused MoE experts: one layer per expert matrix, as in training
    dens = layer_densities(layers, sparsity, cfg.sparsity.distribution, cfg.sparsity.erk_power_scale) if names \
        else {}
    numels = {n: params[n].numel() for n in names}
    kept = parameter_counts(shapes, keep_counts({n: math.prod(s) for n, s in layers.items()}, dens)) if names \
        else {}
    densities = {n: kept[n] / numels[n] for n in names}
    zero = ds.get("zero_optimization") or {}
    opt = str((ds.get("optimizer") or {}).get("type", "AdamW")).lower()
    # the optimizer's groups as training builds them (SμPar splits them by learning-rate scale): DeepSpeed
    # partitions each group on its own
    _, groups = split_groups(model, dataclasses.replace(cfg.sparsity, sparsity=sparsity), opt,
                             weight_decay_groups(model), pretrained=cfg.model.pretrained is not None)
    scheduled = frozenset(n for i, e in enumerate(cfg.freeze.schedule) if int(e["step"]) < cfg.train.steps
                          for n in module_parameters(model, e["modules"], f"freeze.schedule[{i}].modules"))
    partition_sums, local_sums = _grow_window(cfg, bool(compact))
    setting = P.model_setting(model, set(names), densities, groups, frozen_fraction=cfg.freeze.fraction,
                              scheduled=scheduled, blocks=_held_as_blocks(cfg, model, shapes, stage, bool(compact)),
                              world_size=args.world_size, grow_window_sums=partition_sums,
                              grow_window_local_sums=local_sums,
                              zero_stage=stage, precision=precision, compact_state=bool(compact),
                              reduce_bucket_size=int(zero.get("reduce_bucket_size", 500_000_000)),
                              persistence_threshold=int(zero.get("stage3_param_persistence_threshold",
                                                                 zero.get("param_persistence_threshold", 100_000))),
                              replicate_masks=bool(replicate), gradient_accumulation_steps=int(
                                  ds.get("gradient_accumulation_steps", 1)),
                              largest_tensor=_largest(args),
                              **_residual_fields(args, cfg.compression, opt in ("adam", "adamw")))
    # what the gradient traffic prediction needs: the compression block, the mask-update schedule, accumulation
    from dist_sparse.methods import build_method
    from dist_sparse.step import StepSchedule

    method = build_method(cfg.sparsity, shapes, cfg.train.steps, cfg.train.seed) if names else None
    traffic = {"compression": cfg.compression, "steps": cfg.train.steps,
                       "schedule": StepSchedule(method) if method is not None else None,
                       "gas": int(ds.get("gradient_accumulation_steps", 1)), "adam": opt in ("adam", "adamw"),
                       "window_in_exchange": local_sums}
    packed = bool(cfg.sparsity.packed_gather if args.packed_gather is None else args.packed_gather)
    if packed and not names:
        raise P.PlanError("--packed-gather", "needs a sparsity method that keeps masks (sparsity.method is "
                                             f"{cfg.sparsity.method!r}, nothing is sparsified)")
    gather = {"params": G.model_params(model, set(names), densities), "packed": packed,
              "steps": cfg.train.steps, "gas": int(ds.get("gradient_accumulation_steps", 1)),
              "persistence_threshold": setting.persistence_threshold,
              "reuse_distance": int(zero.get("stage3_max_reuse_distance", 1_000_000_000))}
    described = {"config": args.config, "model": cfg.model.source,
                 "parameters": sum(p.numel() for p in params.values()),
                 "sparsified_parameters": sum(numels.values()), "sparsity": sparsity if names else 0.0,
                 "method": cfg.sparsity.method, "vocab_size": vocab}
    return setting, described, traffic, gather


def _grow_window(cfg, compact: bool) -> tuple:
    """Where RigL keeps its growth window's gradient sums: ``(partition, local)``. ``partition``: the sparsifier sums
    the reduced gradient of the rank's score range; ``local``: the compressed exchange sums the rank's full local
    gradient (``CompressedReduction.enable_local_window``). A window exists for ``grow_grad_steps`` > 1, or unset
    where training resolves it to the update interval (no compact state, dense kernels:
    ``engine.default_grow_window``). ``kernel: auto`` with a block pattern decides by a measurement at start; the plan
    assumes the window then (an upper bound: the block-sparse kernels would make it 1)."""
    sp = cfg.sparsity
    if sp.method != "rigl":
        return False, False
    if sp.grow_grad_steps is not None:
        window = sp.grow_grad_steps > 1
    else:
        window = sp.update_interval > 1 and not compact and sp.kernel in ("auto", "dense")
    local = window and cfg.compression is not None and cfg.compression.enabled
    return window and not local, local


def _residual_fields(args, compression, adam: bool) -> dict:
    """The Setting fields of gradient compression's per-rank state (see :func:`P.compression_residual_bytes`)."""
    if args.nodes < 1 or args.world_size % args.nodes:
        raise P.PlanError("--nodes", f"must divide --world-size {args.world_size} evenly, got {args.nodes}")
    dtype = args.residual_dtype or (compression.residual_dtype if compression is not None else "fp32")
    inter = compression is not None and compression.scope == "inter_node" and args.nodes > 1
    return {"residual_buffers": P.residual_buffers(compression, adam), "residual_bytes": P.RESIDUAL_DTYPE_BYTES[dtype],
            "residual_slice": args.world_size // args.nodes if inter else 1}


def _largest(args) -> int | None:
    return None if args.largest_tensor is None else int(round(args.largest_tensor))


# LLaMA-7B's largest sparsified tensor (an 11008 x 4096 MLP matrix) is 0.70% of its 6.5e9 projection weights: the
# --params form has no tensors of its own, so the masks' transient is estimated with that share
LARGEST_TENSOR_SHARE = 0.007


def _vocab_size(cfg) -> int:
    """The tokenizer's vocabulary (char/byte tokenizers read the corpus; a pretrained model has its own; prepared
    data says it in its index)."""
    from dist_sparse.prepared import training_data, vocab_size

    return vocab_size(training_data(cfg))


def _from_params(args) -> tuple:
    stage = 2 if args.zero_stage is None else args.zero_stage
    sparsity = 0.9 if args.sparsity is None else args.sparsity
    largest = _largest(args)
    if largest is None and args.params >= 1:
        largest = max(1, int(round(args.params * args.sparsified_fraction * LARGEST_TENSOR_SHARE)))
    compression = None
    if args.compression_density is not None:
        from dist_sparse.config import CompressionConfig

        compression = CompressionConfig(method="topk", density=args.compression_density, scope=args.compression_scope,
                                        residual_dtype=args.residual_dtype or "fp32")
        try:
            compression.check("--compression-density")
        except Exception as exc:
            raise P.PlanError("--compression-density", str(exc)) from None
    setting = P.uniform_setting(args.params, sparsity, args.sparsified_fraction, world_size=args.world_size,
                                zero_stage=stage, precision=args.precision or "fp32",
                                compact_state=bool(args.compact_state), replicate_masks=bool(args.replicate_masks),
                                largest_tensor=largest, **_residual_fields(args, compression, True))
    traffic = {"compression": compression, "steps": 1, "schedule": None, "gas": 1, "adam": True}
    # a long run (the first step's extra gathers amortised), DeepSpeed's default persistence and reuse distance
    gather = {"params": G.setting_params(setting), "packed": bool(args.packed_gather), "steps": None,
              "persistence_threshold": setting.persistence_threshold}
    described = {"parameters": int(round(args.params)),
                 "sparsified_parameters": int(round(args.params * args.sparsified_fraction)), "sparsity": sparsity}
    return setting, described, traffic, gather


def _held_as_blocks(cfg, model, shapes: dict, stage: int, compact: bool) -> frozenset:
    """The sparsified weights training holds as their active blocks: ZeRO-1/2 with compact state and
    ``sparsity.kernel: block_sparse``, 2-D weights that are a whole number of blocks, nothing frozen
    (``integration/packed_weights.py``). ``kernel: auto`` decides by timing at start, which a plan cannot; it is
    predicted with dense weights (an upper bound)."""
    from dist_sparse.integration import hf
    from dist_sparse.patterns import parse_pattern

    block = parse_pattern(cfg.sparsity.pattern).block_shape
    if not (compact and stage in (1, 2) and cfg.sparsity.kernel == "block_sparse" and block is not None
            and not cfg.freeze.fraction):
        return frozenset()
    transposed = hf.stored_transposed(model, list(shapes))
    held = set()
    for name, shape in shapes.items():
        if len(shape) != 2:
            continue
        out, inp = shape[::-1] if name in transposed else shape
        if out % block[0] == 0 and inp % block[1] == 0:
            held.add(name)
    return frozenset(held)


def _fmt(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if (args.config is None) == (args.params is None):
            raise P.PlanError("plan", "give either a CONFIG or --params (not both)")
        if args.world_size < 1:
            raise P.PlanError("--world-size", f"must be >= 1, got {args.world_size}")
        setting, described, traffic_setting, gather = _from_config(args) if args.config else _from_params(args)
        if gather["packed"] and setting.zero_stage != 3:
            raise P.PlanError("--packed-gather", f"needs ZeRO stage 3, not {setting.zero_stage} (only ZeRO-3 "
                                                 "all-gathers parameters)")
        # packed shards come with the packed gather under compact state (docs/memory.md)
        setting.packed_shards = bool(gather["packed"] and setting.compact_state)
        if args.nodes < 1 or args.world_size % args.nodes:
            raise P.PlanError("--nodes", f"must divide --world-size {args.world_size} evenly, got {args.nodes}")
        per_rank = P.predict(setting)
        dense = P.predict(P.dense_baseline(setting))
        transient = P.transients(setting)
        masks_moved = P.mask_traffic(setting)
        traffic = predict_traffic(setting, args.nodes, **traffic_setting)
        # ZeRO-3's parameter all-gathers (summary.json's two keys; other stages gather no parameters)
        gathers = G.predict(gather.pop("params"), setting.world_size, setting.precision, **gather) \
            if setting.zero_stage == 3 else None
    except DistSparseError as exc:
        print(f"dist-sparse plan: error: {exc}", file=sys.stderr)
        return 2
    mine, base = P.summarize(per_rank), P.summarize(dense)
    out = {**described, "world_size": setting.world_size, "zero_stage": setting.zero_stage,
           "precision": setting.precision, "compact_state": setting.compact_state,
           "packed_shards": setting.packed_shards, "replicate_masks": setting.replicate_masks,
           "state_bytes_per_rank": mine, "transient_bytes_per_rank": transient,
           # compact state's packed reduction on a step without mask update: the masks' all-gathers (sharded)
           # beside the packed gradient values they select
           "mask_sync_bytes_per_step": masks_moved["handed"],
           "mask_sync_received_bytes_per_step": masks_moved["received"],
           "packed_gradient_bytes_per_step": masks_moved["packed_gradient"],
           "state_bytes_by_rank": per_rank, "dense_deepspeed_state_bytes_per_rank": base,
           "ratio_to_dense": mine["total"] / base["total"] if base["total"] else None,
           "nodes": args.nodes, "comm_bytes_per_step": traffic}
    if gathers is not None:
        out.update(gathers)
        out["packed_gather"] = gather["packed"]
    if setting.residual_buffers:  # the compression state's trade-off: what each residual dtype would keep
        out["compression_residuals_by_dtype"] = {
            d: P.compression_residual_bytes(dataclasses.replace(setting, residual_bytes=b))
            for d, b in P.RESIDUAL_DTYPE_BYTES.items()}
    if args.device_memory_gib is not None:
        out["fits"] = mine["total"] <= args.device_memory_gib * 2**30
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"{described['parameters'] / 1e6:.1f}M parameters ({described['sparsified_parameters'] / 1e6:.1f}M "
          f"sparsified at {described['sparsity']:.2f}), {setting.world_size} ranks, ZeRO-{setting.zero_stage}, "
          f"{setting.precision}, compact_state={setting.compact_state}, packed_shards={setting.packed_shards}")
    print(f"{'per rank (max over ranks)':<26}{'this run':>14}{'dense DeepSpeed':>18}")
    for key in (*P.CATEGORIES, "total"):
        print(f"{key:<26}{_fmt(mine[key]):>14}{_fmt(base[key]):>18}")
    print(f"{'ratio to dense':<26}{out['ratio_to_dense']:>14.3f}")
    if "compression_residuals_by_dtype" in out:
        r = out["compression_residuals_by_dtype"]
        print(f"compression residuals ({setting.residual_buffers} buffer(s) per coordinate, per rank, not sharded: "
              f"each rank keeps what it did not send): fp32 {_fmt(r['fp32'])}, bf16 {_fmt(r['bf16'])} "
              f"(compression.residual_dtype); without them the ratio to dense is "
              f"{(mine['total'] - mine['compression_residuals']) / base['total']:.3f}")
    if setting.compact_state:
        where = ("full masks kept on every rank (replicate_masks)" if setting.replicate_masks else
                 "masks sharded: each tensor's full mask is built when its gradient arrives")
        print(f"{'transient: mask bits':<26}{_fmt(transient['mask_bits_in_flight']):>14}   ({where})")
        if traffic["compression"] == "none":  # with compression the exchange owns the reduction, not the packed one
            print(f"masks per step and rank (packed reduction): handed {_fmt(masks_moved['handed'])}, received "
                  f"{_fmt(masks_moved['received'])}; packed gradient values {_fmt(masks_moved['packed_gradient'])}")
    t = traffic
    scope = f", scope {t['compression_scope']}" if t["compression"] != "none" else ""
    print(f"gradient bytes per step and rank over {args.nodes} node(s) (compression {t['compression']}{scope}): "
          f"intra-node {_fmt(t['intra_node_comm_bytes_per_step'])}, inter-node "
          f"{_fmt(t['inter_node_comm_bytes_per_step'])}; dense DeepSpeed {_fmt(t['dense_comm_bytes_per_step'])}, "
          f"of it inter-node {_fmt(t['dense_inter_node_comm_bytes_per_step'])}")
    if gathers is not None:
        g, d = gathers["param_gather_bytes_per_step"], gathers["dense_param_gather_bytes_per_step"]
        print(f"parameter gather bytes per step and rank (ZeRO-3, packed_gather={gather['packed']}): {_fmt(g)}; "
              f"dense DeepSpeed {_fmt(d)}" + (f" ({g / d:.3f}x)" if d else ""))
    if "fits" in out:
        print(f"fits in {args.device_memory_gib:g} GiB: {'yes' if out['fits'] else 'no'} (training state only; "
              "activations, buckets and the framework come on top)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
