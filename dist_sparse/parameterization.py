"""``sparsity.parameterization``: how a sparse layer's initialization and learning rate relate to the dense
model's hyperparameters.

- ``standard``: the dense model's initialization and learning rate, unchanged (the setting of the sparse-training
  papers: SET, RigL, ...).
- ``supar``: the sparse maximal update parameterization (SμPar; Dey, Bergsma & Hestness, NeurIPS 2024, "Sparse
  maximal update parameterization: a holistic approach to sparse training dynamics"). A layer of density ρ is
  treated as a dense layer of effective fan-in ρ · fan_in, so that its activations, gradients and weight updates
  keep the dense model's scale at any sparsity. Relative to the dense hyperparameters, for each sparsified layer:
  the initial weights are multiplied by ρ^(-1/2) (initialization variance ∝ 1 / (ρ fan_in)) and, with an Adam-type
  optimizer, the learning rate by 1/ρ (μP's Adam rule for hidden weights, lr ∝ 1 / fan_in). With SGD μP's hidden
  learning rate does not depend on fan-in, so only the initialization changes. Embeddings, norms, biases and every
  other dense parameter keep the dense hyperparameters.

SμPar is defined for masks whose per-layer density is fixed from the first step: it applies to methods that draw
their masks at step 0 from ``sparsity.distribution`` (``static``, ``set``, ``rigl`` and their N:M or block
patterns), not to methods that start dense (gradual magnitude pruning), train dense weights (SR-STE), pick their
layer densities from scores (pruning at initialization, ``distribution: global``) or start from given masks
(``sparsity.init_masks``, a pretrained checkpoint: the weights are already trained).

Unset, the key resolves to ``supar`` wherever it applies and dist_sparse builds the optimizer's parameter groups
(``dist-sparse train``, :func:`dist_sparse.initialize`, or an optimizer built from :func:`param_groups`), with an
Adam-type optimizer; everywhere else to ``standard``. It is the measured better recipe at the demo's optimizer
settings (docs/benchmarks.md, "RigL's default recipe").

How the learning rate is applied: each sparsified parameter goes into a parameter group whose ``lr_scale`` is its
1/ρ; the engine multiplies each group's ``lr`` by its ``lr_scale`` for the duration of the inner optimizer step
only (:func:`scaled_learning_rates`), so an lr scheduler, which sets and reads ``lr`` between steps, sees the
dense values and works unchanged. The initialization is scaled on the model before DeepSpeed copies it into master
weights and partitions; every rank does the same deterministic multiplication, so ranks stay identical.
"""

import contextlib
import logging

import torch

from dist_sparse.errors import ConfigError

log = logging.getLogger("dist_sparse")

PARAMETERIZATIONS = ("standard", "supar")
# optimizer types (DeepSpeed config names and torch class names, lower case) whose update is Adam's
ADAM_TYPES = ("adam", "adamw", "fusedadam", "cpuadam", "deepspeedcpuadam")
MARK = "_dist_sparse_parameterization"  # set on a model whose groups param_groups() built


def method_fixes_layer_densities(sparsity) -> str | None:
    """Why SμPar does not apply to this sparsity config's method (None: it does)."""
    from dist_sparse.methods import METHODS

    if sparsity.method == "none":
        return "the model is dense (sparsity.method: none)"
    cls = sparsity.method if isinstance(sparsity.method, type) else METHODS[sparsity.method]
    if getattr(cls, "dense_start", False):
        return f"{cls.name!r} starts dense and prunes gradually, so its layer densities change during training"
    if getattr(cls, "dense_weights", False):
        return f"{cls.name!r} trains dense weights through a masked forward"
    if getattr(cls, "needs_init_scores", False):
        return f"{cls.name!r} picks its layer densities from scores at step 0, after the optimizer is built"
    if sparsity.distribution == "global":
        return "sparsity.distribution: global lets layer densities move between layers"
    if sparsity.init_masks is not None:
        return "sparsity.init_masks starts from given masks (and weights trained with them)"
    return None


def is_adam(optimizer_type: str | None) -> bool:
    return optimizer_type is not None and optimizer_type.replace("_", "").lower() in ADAM_TYPES


def resolve(sparsity, optimizer_type: str | None, pretrained: bool = False) -> str:
    """The parameterization a run uses. An explicit ``supar`` that cannot apply is a ConfigError naming why."""
    why = method_fixes_layer_densities(sparsity)
    if why is None and pretrained:
        why = "model.pretrained starts from trained weights"
    if sparsity.parameterization == "supar" and why is not None:
        raise ConfigError("sparsity.parameterization", f"'supar' needs masks with per-layer densities fixed from "
                                                       f"step 0 and a randomly initialised model: {why}")
    if sparsity.parameterization is not None:
        return sparsity.parameterization
    return "supar" if why is None and is_adam(optimizer_type) else "standard"


def layer_densities(model, sparsity) -> dict:
    """name -> density of every parameter ``sparsity`` sparsifies (fused experts: the mean over their matrices)."""
    from dist_sparse.integration.experts import expert_layer_name, layer_shapes
    from dist_sparse.integration.hf import sparsifiable_parameters
    from dist_sparse.methods import target_densities

    params = dict(model.named_parameters())
    names = [n for n in sparsifiable_parameters(model, sparsity.params, sparsity.exclude) if params[n].requires_grad]
    shapes = {n: tuple(params[n].shape) for n in names}
    per_layer = target_densities(sparsity, layer_shapes(shapes))
    out = {}
    for n, shape in shapes.items():
        if len(shape) == 3:
            out[n] = sum(per_layer[expert_layer_name(n, e)] for e in range(shape[0])) / shape[0]
        else:
            out[n] = per_layer[n]
    return out


def split_groups(model, sparsity, optimizer_type: str | None, groups=None, pretrained: bool = False) -> tuple:
    """``(kind, groups)``: the parameterization and the optimizer's parameter groups under it, without touching the
    weights (the memory planner models DeepSpeed's partitioning of these groups). ``groups``: the groups (or an
    iterable of parameters) the optimizer would get otherwise; default: every trainable parameter in one group.
    Under SμPar every group is split by its parameters' ``lr_scale`` (1/ρ with Adam), keeping its other options."""
    kind, out, _ = _split_groups(model, sparsity, optimizer_type, groups, pretrained)
    return kind, out


def _split_groups(model, sparsity, optimizer_type, groups, pretrained) -> tuple:
    """:func:`split_groups` and the layer densities it used (None under the standard parameterization)."""
    kind = resolve(sparsity, optimizer_type, pretrained)
    if groups is None:
        groups = [p for p in model.parameters() if p.requires_grad]
    groups = list(groups)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    if kind == "standard":
        return kind, groups, None
    densities = layer_densities(model, sparsity)
    if not is_adam(optimizer_type):
        return kind, groups, densities
    by_id = {id(p): n for n, p in model.named_parameters()}
    out = []
    for group in groups:
        split: dict = {}
        for p in group["params"]:
            rho = densities.get(by_id.get(id(p)), 1.0)
            split.setdefault(1.0 / rho, []).append(p)
        for scale, params in split.items():
            out.append({**group, "params": params, **({"lr_scale": scale} if scale != 1.0 else {})})
    return kind, out, densities


@torch.no_grad()
def param_groups(model, sparsity, optimizer_type: str | None, groups=None, pretrained: bool = False) -> list:
    """The optimizer's parameter groups for ``model`` (:func:`split_groups`); under SμPar the sparsified weights
    are also rescaled in place by ρ^(-1/2). Call it before ``deepspeed.initialize``, once per model."""
    if getattr(model, MARK, None) == "supar":
        raise RuntimeError("param_groups() already rescaled this model's initial weights for SμPar")
    kind, out, densities = _split_groups(model, sparsity, optimizer_type, groups, pretrained)
    setattr(model, MARK, kind)
    if kind == "standard":
        return out
    for n, p in model.named_parameters():
        if n in densities and densities[n] < 1.0:
            p.mul_(densities[n] ** -0.5)
    log.info("SμPar (sparsity.parameterization: supar): %d sparsified weights rescaled by density^-1/2%s",
             len(densities), ", their learning rate by 1/density" if is_adam(optimizer_type)
             else " (SGD: learning rate unchanged)")
    return out


def resolved_at_attach(model, sparsity) -> str:
    """What an engine built elsewhere uses: ``supar`` only when its optimizer's groups came from
    :func:`param_groups` under SμPar; an explicit ``supar`` without them is a ConfigError naming the fix."""
    built = getattr(model, MARK, None)
    if built is not None:
        return built
    if sparsity.parameterization == "supar":
        raise ConfigError("sparsity.parameterization", "'supar' rescales the initial weights and the learning rate "
                                                       "of each sparsified layer when the optimizer is built: build "
                                                       "its parameter groups with dist_sparse.param_groups(model, "
                                                       "sparsity, optimizer_type) before deepspeed.initialize, or "
                                                       "use dist_sparse.initialize / dist-sparse train")
    return "standard"


@contextlib.contextmanager
def scaled_learning_rates(optimizer):
    """Each group's ``lr`` times its ``lr_scale`` for the duration of one step (see the module docstring)."""
    saved = []
    for group in optimizer.param_groups:
        scale = group.get("lr_scale")
        if scale is not None and scale != 1.0:
            saved.append((group, group["lr"]))
            group["lr"] = group["lr"] * scale
    try:
        yield
    finally:
        for group, lr in saved:
            group["lr"] = lr
