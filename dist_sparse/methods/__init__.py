"""Sparse training methods, registered by name. ``none`` is the dense baseline (no method object)."""

from dist_sparse.methods.base import LayerSlice, SparseMethod
from dist_sparse.methods.magnitude import Magnitude
from dist_sparse.methods.rigl import RigL
from dist_sparse.methods.set import SET
from dist_sparse.methods.static import Static

METHODS = {cls.name: cls for cls in (Static, Magnitude, SET, RigL)}
METHOD_NAMES = ("none", *METHODS)


def register(cls) -> type:
    """Register a user method class (a :class:`SparseMethod` subclass with a unique ``name``)."""
    if not (isinstance(cls, type) and issubclass(cls, SparseMethod)):
        raise TypeError("register() expects a SparseMethod subclass")
    if cls.name in METHODS or cls.name == "none":
        raise ValueError(f"a method named {cls.name!r} is already registered")
    METHODS[cls.name] = cls
    return cls


__all__ = ["LayerSlice", "SparseMethod", "METHODS", "METHOD_NAMES", "register", "Static", "Magnitude", "SET", "RigL"]
