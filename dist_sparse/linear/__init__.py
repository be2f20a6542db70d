"""Block-sparse linear layers: the operator (CPU and Triton backends, a dense reference), its block index, and the
training-step integration (``dist_sparse.linear.modules``: sparsified Linear/Conv1D modules run the operator).

``block_sparse_linear(x, weight, bias, index, transposed=False, dense_grad=False)`` is the entry point; see
docs/kernels.md.
"""

from .dispatch import IMPLEMENTATIONS, block_sparse_linear, resolve_implementation
from .index import BlockIndex

__all__ = ["IMPLEMENTATIONS", "BlockIndex", "block_sparse_linear", "resolve_implementation"]
