"""Sparsity patterns: how a method's scores become masks.

A method decides *what* to keep (scores, eligibility, how many per selection group); the pattern decides the
*shape* of what may be kept. Every pattern selects through the selector (``dist_sparse.masks.select``), so a
pattern's masks are the same whether a tensor lives in one process or is sharded over ranks.

- :class:`Unstructured`: the ``k`` highest-scoring eligible weights of each group, anywhere in the tensor.

Structured patterns (N:M groups, blocks) subclass :class:`SparsityPattern` and are registered with
:func:`register`; a method gets whichever pattern its config names.
"""

from dist_sparse.masks.select import Piece


class SparsityPattern:
    """Turns per-slice scores into masks. ``select`` receives the method (for its selection groups), this rank's
    slices, one score tensor and one eligibility tensor (None: all eligible) per slice, and the number of weights
    to keep per group; it returns one bool mask per slice."""

    name = "base"

    def select(self, method, slices: list, scores: list, eligible: list, keep: dict, selector) -> list:
        raise NotImplementedError


class Unstructured(SparsityPattern):
    """Any weight may be kept: the exact top-k of each selection group (a layer, or every layer for ``global``)."""

    name = "unstructured"

    def select(self, method, slices, scores, eligible, keep, selector):
        pieces = [Piece(sc, el, method.group_of(s), s.order, s.start) for s, sc, el in zip(slices, scores, eligible)]
        return selector.topk(pieces, keep)


PATTERNS: dict = {"unstructured": Unstructured}


def register(cls) -> type:
    """Register a :class:`SparsityPattern` subclass under its ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, SparsityPattern)):
        raise TypeError("register() expects a SparsityPattern subclass")
    if cls.name in PATTERNS:
        raise ValueError(f"a sparsity pattern named {cls.name!r} is already registered")
    PATTERNS[cls.name] = cls
    return cls
