"""Per-rank training-state bytes, measured from the live tensors a rank holds (``state_bytes_per_rank``).

Categories (a contract of ``summary.json``): ``weights`` (the model's parameters, including ZeRO's flat buffers
and, at stage 3, the rank's shards), ``gradients`` (every gradient buffer alive between backward and the
optimizer step, DeepSpeed's partition buffers and buckets included), ``master_weights`` (fp32 copies the optimizer
steps, dense or packed), ``optimizer_state`` (Adam moments and step counters), ``masks`` (bit-packed mask bits)
and ``compression_residuals`` (error-feedback buffers of gradient compression; 0 while no compressor keeps any),
plus ``total``. A tensor is counted by its *storage* (a view counts its whole buffer, padding included), and a
storage once only, in the order above: at ZeRO-0 in fp32 the parameters are the master weights and count once,
as weights.

Where DeepSpeed keeps those buffers is DeepSpeed knowledge, hence this module lives in the integration layer
(it reads attributes; it does not import deepspeed).
"""

import warnings

import torch

from dist_sparse.integration.patches import STAGE3_GRAD_PARTITIONS
from dist_sparse.integration.views import inner_optimizer
from dist_sparse.step import Component

CATEGORIES = ("weights", "gradients", "master_weights", "optimizer_state", "masks", "compression_residuals")


def _tensors(obj):
    """Every tensor inside nested lists/tuples/dicts (one level of objects with ``.buffer`` lists too)."""
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


class _Counter:
    def __init__(self):
        self.seen = set()
        self.bytes = dict.fromkeys(CATEGORIES, 0)

    def add(self, category: str, obj) -> None:
        for t in _tensors(obj):
            if t.is_meta:
                continue
            storage = t.untyped_storage()
            if storage.nbytes() == 0:
                continue
            key = (storage.data_ptr(), t.device.type)
            if key in self.seen:
                continue
            self.seen.add(key)
            self.bytes[category] += storage.nbytes()


def measure(sparse_engine) -> dict:
    """The bytes this rank holds now, by category. Call it between backward and the optimizer step (the
    gradients exist then). DeepSpeed's buffers are found here; what the step's components keep, they report
    (``Component.bytes_held``: bytes, or tensors counted once per storage)."""
    engine = sparse_engine.engine
    zo = engine.optimizer
    opt = inner_optimizer(engine)
    c = _Counter()
    # weights: parameters (views of ZeRO's flat buffers count the buffer), ZeRO-3 shards and their flat groups
    for p in engine.module.parameters():
        c.add("weights", p.data)
        if hasattr(p, "ds_tensor"):
            c.add("weights", p.ds_tensor)
    for attr in ("bit16_groups_flat", "fp16_partitioned_groups_flat"):
        c.add("weights", getattr(zo, attr, None))
    # master weights: what the torch optimizer steps, and DeepSpeed's fp32 copies
    for group in opt.param_groups:
        c.add("master_weights", group["params"])
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat",
                 "fp32_groups"):
        c.add("master_weights", getattr(zo, attr, None))
    # optimizer state
    c.add("optimizer_state", list(opt.state.values()))
    # gradients: parameter grads, DeepSpeed's partition buffers and buckets, fp32 grads on the masters
    for p in engine.module.parameters():
        c.add("gradients", p.grad)
    for group in opt.param_groups:  # packed masters (compact state) are not leaves: read .grad without the warning
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            c.add("gradients", [p.grad for p in group["params"]])
    for attr in ("averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer", STAGE3_GRAD_PARTITIONS):
        c.add("gradients", getattr(zo, attr, None))
    for bucket in (getattr(zo, "ipg_buckets", None) or {}).values():
        c.add("gradients", getattr(bucket, "buffer", None))
    # what the step's components keep: compact state's packed gradients, replicated masks, residuals, ...
    for component in sparse_engine.components:
        for category, held in component.bytes_held().items():
            if isinstance(held, int):
                c.bytes[category] += held
            else:
                c.add(category, held)
    out = dict(c.bytes)
    out["total"] = sum(out[k] for k in CATEGORIES)
    return out


class StateAccounting(Component):
    """Measures ``state_bytes_per_rank`` once per step, between the reduction and the optimizer step (gradients
    exist only then); not on mask-update steps, whose transient dense gradients are reported separately."""

    name = "accounting"

    def __init__(self, sparse_engine):
        self.sparse_engine = sparse_engine
        self.last = None

    def before_step(self, plan) -> None:
        if not plan.mask_update:
            self.last = measure(self.sparse_engine)
