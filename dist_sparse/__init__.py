"""dist_sparse: sparse training of large transformers inside DeepSpeed.

The top-level names are imported lazily, so `import dist_sparse` does not import deepspeed.
"""

__version__ = "0.1.0"

__all__ = ["attach", "initialize", "param_groups", "__version__"]


def __getattr__(name):
    if name in ("initialize", "attach"):
        from dist_sparse.integration import engine

        return getattr(engine, name)
    if name == "param_groups":  # SμPar's optimizer groups for an optimizer built outside dist_sparse.initialize
        from dist_sparse.parameterization import param_groups

        return param_groups
    raise AttributeError(f"module 'dist_sparse' has no attribute {name!r}")
