"""Sparse training methods, registered by name. ``none`` is the dense baseline (no method object).

The config validates ``sparsity.method`` against :data:`METHODS`, so a method registered by user code (a module
named in the config's ``plugins`` list, imported before validation) is usable from a config by its name.
"""

from dist_sparse.distributions import layer_densities
from dist_sparse.errors import ConfigError
from dist_sparse.methods.base import LayerSlice, SparseMethod
from dist_sparse.methods.magnitude import Magnitude
from dist_sparse.methods.pai import SNIP, GraSP, PruningAtInit, SynFlow
from dist_sparse.methods.rigl import RigL
from dist_sparse.methods.set import SET
from dist_sparse.methods.srste import SRSTE
from dist_sparse.methods.static import Static
from dist_sparse.patterns import parse_pattern
from dist_sparse.schedules import FRACTION_SCHEDULES, UpdateTimes

METHODS = {cls.name: cls for cls in (Static, Magnitude, SET, RigL, SRSTE, SNIP, GraSP, SynFlow)}


def method_names() -> tuple:
    """Every valid ``sparsity.method``: ``none`` and the registered methods (built-in and user)."""
    return ("none", *METHODS)


def register(cls) -> type:
    """Register a user method class (a :class:`SparseMethod` subclass with a unique ``name``); it is then valid as
    ``sparsity.method`` in configs (list its module under ``plugins``) and as a class in the Python API."""
    if not (isinstance(cls, type) and issubclass(cls, SparseMethod)):
        raise TypeError("register() expects a SparseMethod subclass")
    if cls.name in METHODS or cls.name == "none":
        raise ValueError(f"a method named {cls.name!r} is already registered")
    METHODS[cls.name] = cls
    return cls


def target_densities(sparsity, shapes: dict) -> dict:
    """Each layer's target density (fraction kept): ``sparsity.distribution``'s, or N/M under an N:M pattern (where
    the distribution only picks the groups)."""
    fixed = parse_pattern(sparsity.pattern).fixed_density
    if fixed is not None:
        return {name: fixed for name in shapes}
    return layer_densities(shapes, sparsity.sparsity, sparsity.distribution, sparsity.erk_power_scale)


def build_method(sparsity, shapes: dict, total_steps: int | None, seed: int, transposed=()):
    """The method object for a ``SparsityConfig`` (``None`` for the dense baseline ``none``).

    ``shapes``: name -> shape of the sparsified parameters; ``total_steps`` sets the default end of mask updates
    (RigL's T_end = 0.75 of training); ``transposed``: the names stored (in, out) (GPT-2 ``Conv1D``), for
    structured patterns (``sparsity.pattern``), whose cells are defined on the (out, in) matrix."""
    if sparsity.method == "none":
        return None
    pattern = parse_pattern(sparsity.pattern).bind(shapes, transposed)
    end = sparsity.end_step
    if end is None:
        if total_steps is None:
            raise ConfigError("sparsity.end_step", "required when the number of training steps is not known")
        end = max(sparsity.start_step + 1, int(0.75 * total_steps))
    times = UpdateTimes(sparsity.update_interval, sparsity.start_step, end)
    densities = target_densities(sparsity, shapes)
    cls = METHODS[sparsity.method]
    kwargs = {}
    if issubclass(cls, SET):  # drop-and-grow methods (a user subclass of SET or RigL too)
        kwargs["fraction"] = FRACTION_SCHEDULES[sparsity.drop_fraction_schedule](sparsity.drop_fraction, end)
    if issubclass(cls, RigL):
        # unset: the paper's one batch until attach() knows whether the window is free (default_grow_window)
        kwargs["grow_grad_steps"] = sparsity.grow_grad_steps or 1
    if issubclass(cls, SRSTE):
        kwargs["decay"] = sparsity.srste_decay
    if issubclass(cls, PruningAtInit):
        kwargs["init_batches"] = sparsity.init_batches
    if issubclass(cls, SynFlow):
        kwargs["init_rounds"] = sparsity.init_rounds
    return cls(densities, sparsity.distribution == "global", times, seed, pattern=pattern, **kwargs)


__all__ = ["build_method", "target_densities", "LayerSlice", "SparseMethod", "METHODS", "method_names", "register",
           "Static", "Magnitude", "SET", "RigL", "SRSTE", "PruningAtInit", "SNIP", "GraSP", "SynFlow"]
