"""Mixture-of-experts support: every expert's matrix is its own layer, though transformers stores them fused.

transformers keeps a MoE block's experts as one 3-D parameter per projection (``experts.gate_up_proj`` of shape
``(experts, 2 * intermediate, hidden)``). Everything that addresses state (views, masks, checkpoints, compact
state, the exported masks) keeps working on that parameter as a whole; only the *decisions* must see experts
separately, or one expert could end up dense and another empty, and ERK would give a stack of matrices the density
of one tall tensor. :class:`PerMatrixLayers` wraps the method: it splits each rank's slice of a stacked parameter
at expert boundaries into one :class:`LayerSlice` per expert (named ``name[e]``, with the expert's 2-D shape and
its own density from the distribution), lets the method decide on those, and joins the results back. The split is
by global position, so every rank passes the same layers (possibly empty pieces) to the selector, and the
selection stays exact and independent of sharding. Models without 3-D parameters get the method unchanged.

:func:`register_zero3_leaves` marks the modules holding fused experts as ZeRO-3 leaf modules
(``deepspeed.utils.set_z3_leaf_modules``), before ``deepspeed.initialize``.
"""

import math

import torch

from dist_sparse.methods import LayerSlice, build_method


def expert_layer_name(name: str, expert: int) -> str:
    return f"{name}[{expert}]"


class PerMatrixLayers:
    """A method seen through per-matrix layers: ``stacks`` maps a stacked parameter's name to its 3-D shape.

    Everything but the two decisions (``initial_masks``, ``update``) is the wrapped method's own (schedules,
    ``replaces_optimizer_step``, ``needs_dense_grad``, ...)."""

    def __init__(self, method, shapes: dict, stacks: dict):
        self.method = method
        self.stacks = stacks
        self.layers = []  # (name, expert or None), in the order the selector sees them
        for name in sorted(shapes):
            self.layers += [(name, e) for e in range(stacks[name][0])] if name in stacks else [(name, None)]
        self.order = {layer: i for i, layer in enumerate(self.layers)}

    def __getattr__(self, name):
        return getattr(self.method, name)

    def _split(self, slices: list) -> list:
        out = []
        for s in slices:
            if s.name not in self.stacks:
                out.append(LayerSlice(s.name, self.order[(s.name, None)], s.shape, s.numel, s.start, s.mask,
                                      s.weight, s.grad))
                continue
            n, *matrix = self.stacks[s.name]
            per = math.prod(matrix)
            end = s.start + s.mask.numel()
            for e in range(n):
                lo, hi = max(s.start, e * per), min(end, (e + 1) * per)
                cut, start = (slice(lo - s.start, hi - s.start), lo - e * per) if hi > lo else (slice(0, 0), 0)
                out.append(LayerSlice(expert_layer_name(s.name, e), self.order[(s.name, e)], tuple(matrix), per,
                                      start, s.mask[cut],
                                      None if s.weight is None else s.weight[cut],
                                      None if s.grad is None else s.grad[cut]))
        return out

    def _join(self, slices: list, decided: list) -> list:
        out, i = [], 0
        for s in slices:
            k = self.stacks[s.name][0] if s.name in self.stacks else 1
            parts = decided[i: i + k]
            i += k
            out.append(parts[0] if k == 1 else torch.cat([p.reshape(-1) for p in parts]))
        return out

    def initial_masks(self, slices: list, select) -> list:
        return self._join(slices, self.method.initial_masks(self._split(slices), select))

    def update(self, step: int, slices: list, select) -> list:
        return self._join(slices, self.method.update(step, self._split(slices), select))


def layer_shapes(shapes: dict) -> dict:
    """The layers decisions see: every 3-D parameter split into its expert matrices (``name[e]``)."""
    layers = {}
    for name in sorted(shapes):
        if len(shapes[name]) == 3:
            for e in range(shapes[name][0]):
                layers[expert_layer_name(name, e)] = tuple(shapes[name][1:])
        else:
            layers[name] = tuple(shapes[name])
    return layers


def parameter_counts(shapes: dict, layer_counts: dict) -> dict:
    """Per-layer kept counts (of :func:`layer_shapes`' layers) summed back to parameters."""
    out = {}
    for name, shape in shapes.items():
        out[name] = (sum(layer_counts[expert_layer_name(name, e)] for e in range(shape[0])) if len(shape) == 3
                     else layer_counts[name])
    return out


def build_layer_method(sparsity, shapes: dict, total_steps, seed: int, transposed=()):
    """``build_method`` where every 3-D parameter (fused experts) counts as one layer per expert matrix
    (``transposed``: parameters stored (in, out), GPT-2's ``Conv1D``, for structured patterns)."""
    stacks = {name: tuple(shape) for name, shape in shapes.items() if len(shape) == 3}
    if not stacks:
        return build_method(sparsity, shapes, total_steps, seed, transposed)
    method = build_method(sparsity, layer_shapes(shapes), total_steps, seed, transposed)
    return None if method is None else PerMatrixLayers(method, shapes, stacks)


def register_zero3_leaves(model) -> list:
    """Mark the modules holding fused experts as ZeRO-3 leaves (call before ``deepspeed.initialize``). Returns the
    classes registered (none for a dense model)."""
    from dist_sparse.integration.deepspeed import import_deepspeed
    from dist_sparse.integration.hf import expert_module_classes

    classes = expert_module_classes(model)
    if classes:
        import_deepspeed().utils.set_z3_leaf_modules(model, classes)
    return classes


def unregistered_zero3_experts(model) -> list:
    """Names of fused-expert modules that are not ZeRO-3 leaves (what an adapter called after the engine was built
    checks, since registering then is too late)."""
    from dist_sparse.integration.hf import expert_module_classes

    classes = tuple(expert_module_classes(model))
    return [n for n, m in model.named_modules() if classes and isinstance(m, classes) and not getattr(m, "_z3_leaf",
                                                                                                        False)]
