"""dist_sparse: sparse training of large transformers inside DeepSpeed.

The top-level names are imported lazily, so `import dist_sparse` does not import deepspeed.
"""

__version__ = "0.1.0"

__all__ = ["initialize", "__version__"]


def __getattr__(name):
    if name == "initialize":
        from dist_sparse.integration.deepspeed import initialize

        return initialize
    raise AttributeError(f"module 'dist_sparse' has no attribute {name!r}")
