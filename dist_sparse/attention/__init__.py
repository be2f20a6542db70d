"""Block-sparse attention: layouts, kernels (Triton on GPU, vectorised PyTorch on CPU) and the Hugging Face hook.

``block_sparse_attention(q, k, v, layout, block_size, causal=False, scale=None)`` is the entry point; the layout
builders live in :mod:`dist_sparse.attention.layouts`, the config section in :mod:`dist_sparse.attention.config` and
the transformers integration in :mod:`dist_sparse.attention.hf` (imported on demand: it pulls in transformers).
"""

from .config import AttentionConfig
from .dispatch import IMPLEMENTATIONS, block_sparse_attention, resolve_implementation
from .layouts import (
    bigbird_layout,
    build_layout,
    dense_layout,
    from_mask,
    global_layout,
    layout_density,
    local_layout,
    strided_layout,
    union,
)

__all__ = [
    "IMPLEMENTATIONS",
    "AttentionConfig",
    "bigbird_layout",
    "block_sparse_attention",
    "build_layout",
    "dense_layout",
    "from_mask",
    "global_layout",
    "layout_density",
    "local_layout",
    "resolve_implementation",
    "strided_layout",
    "union",
]
