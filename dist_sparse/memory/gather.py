"""Predicted ZeRO-3 parameter-gather bytes per rank and optimizer step (``dist-sparse plan``): summary.json's
``param_gather_bytes_per_step`` and ``dense_param_gather_bytes_per_step``.

The counting rule is the measured one (:mod:`dist_sparse.integration.packed_gather`): one gather of a parameter
of ``numel`` elements hands its shard, ``n = ceil(numel / world)`` elements in the model's precision, to the
all-gather; packed (a sparsified parameter with ``sparsity.packed_gather``) it hands ``ceil(n / 8)`` mask bytes
and the active values, ``density x n`` in expectation (random and ERK masks spread active weights evenly; the
measured payload is padded to the largest rank's count, a little above the expectation).

How often DeepSpeed's coordinator gathers a parameter (``partitioned_param_coordinator.py``, measured on the
tests' runs):

- the first micro-batch records the module trace and releases every module's parameters after its forward and
  its backward: every parameter is gathered twice per module that holds it (a tied embedding twice per pass),
  persistent ones (``numel <= stage3_param_persistence_threshold``) included, which DeepSpeed partitions at
  start;
- the remaining micro-batches of the first step gather every parameter once (persistent ones stay gathered from
  then on, re-gathered outside the coordinator after each step, which is not counted);
- every later micro-batch gathers each non-persistent parameter once for the forward, and again for the
  backward unless it is still gathered: DeepSpeed keeps a parameter from its forward to its backward when the
  parameters used in between (about twice those after it in the forward order) total fewer elements than
  ``stage3_max_reuse_distance`` (1e9 by default).

Evaluation forwards are not training traffic and are not counted (neither measured nor predicted); a forward that
breaks the recorded trace (evaluation does) makes the next one record again, which the prediction does not model.
"""

import math
from dataclasses import dataclass

from dist_sparse.masks.packing import packed_nbytes
from dist_sparse.memory.plan import LP_BYTES


@dataclass
class GatherParam:
    name: str
    numel: int
    density: float = 1.0
    sparse: bool = False
    uses: int = 1  # modules that hold the parameter (tied weights: more than one)


def model_params(model, names, densities: dict) -> list:
    """The parameters of a (meta-device) model in forward order (registration order), with how many modules hold
    each (tied weights)."""
    uses: dict = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                uses[id(p)] = uses.get(id(p), 0) + 1
    return [GatherParam(n, p.numel(), densities.get(n, 1.0) if n in names else 1.0, n in names, uses.get(id(p), 1))
            for n, p in model.named_parameters()]


def setting_params(setting) -> list:
    """Without a model (``--params``): the planner setting's parameters, in their group order."""
    return [GatherParam(p.name, p.numel, p.density, p.sparse) for g in setting.groups for p in g]


def predict(params: list, world: int, precision: str, packed: bool, steps: int | None = None, gas: int = 1,
            persistence_threshold: int = 100_000, reuse_distance: int = 1_000_000_000) -> dict:
    """summary.json's two gather keys, per rank and optimizer step: the mean over a run of ``steps`` optimizer
    steps of ``gas`` micro-batches (``steps`` None: a long run, the first step's extra gathers amortised away)."""
    if world <= 1:
        return {"param_gather_bytes_per_step": 0.0, "dense_param_gather_bytes_per_step": 0.0}
    lp = LP_BYTES[precision]

    def cost(p) -> tuple:
        n = math.ceil(p.numel / world)
        dense = lp * n
        return (packed_nbytes(n) + lp * p.density * n if packed and p.sparse else dense), dense

    after, later = [], 0
    for p in reversed(params):  # elements of the parameters used after each one in the forward
        after.append(later)
        later += p.numel * p.uses
    after.reverse()
    steady = [0.0, 0.0]  # one later micro-batch
    first = [0.0, 0.0]  # the first step
    for p, rest in zip(params, after):
        c = cost(p)
        regathered = 2 * rest >= reuse_distance
        for k in (0, 1):
            first[k] += 2 * p.uses * c[k] + (gas - 1) * c[k]
            if p.numel > persistence_threshold:
                steady[k] += c[k] * (2 if regathered else 1)
    out = []
    for k in (0, 1):
        per_step = gas * steady[k]
        out.append(per_step if steps is None else (first[k] + (max(1, steps) - 1) * per_step) / max(1, steps))
    return {"param_gather_bytes_per_step": out[0], "dense_param_gather_bytes_per_step": out[1]}
