"""``static``: a random mask drawn once at initialisation and never changed (the sparse baseline in RigL's paper)."""

from dist_sparse.methods.base import SparseMethod


class Static(SparseMethod):
    name = "static"
    updates_masks = False
