"""The ``attention`` section of the dist_sparse config.

Example (YAML)::

    attention:
      implementation: block_sparse   # sdpa (default) | eager | block_sparse
      block_size: 64
      kernel: auto                   # auto | triton | cpu | reference (block_sparse only)
      seed: 0                        # seeds bigbird's random blocks
      keep_probabilities: auto       # auto | true | false: the CPU backward reuses the forward's probabilities
      layout:                        # union of these
        - {type: local, window: 2}
        - {type: global, blocks: [0]}
        - {type: bigbird, window: 1, num_global: 1, num_random: 2}
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from dist_sparse.errors import ConfigError

from .dispatch import IMPLEMENTATIONS
from .layouts import LAYOUT_TYPES

__all__ = ["AttentionConfig", "DEFAULT_LAYOUT"]

HF_IMPLEMENTATIONS = ("sdpa", "eager", "block_sparse")

# Used when `implementation: block_sparse` names no layout: a Longformer-like window of 2 blocks each side plus the
# first block as global (it usually holds BOS / CLS), ~5 blocks per row.
DEFAULT_LAYOUT = [{"type": "local", "window": 2}, {"type": "global", "blocks": [0]}]

# Per layout type: parameter -> (expected type, minimum, required). A value's minimum applies to ints only.
_LAYOUT_PARAMS: dict[str, dict[str, tuple[type, int, bool]]] = {
    "dense": {},
    "local": {"window": (int, 0, True)},
    "global": {"blocks": (list, 0, False)},
    "strided": {"stride": (int, 1, True), "summary": (int, 1, False)},
    "bigbird": {
        "window": (int, 0, False),
        "num_global": (int, 0, False),
        "num_random": (int, 0, False),
        "seed": (int, 0, False),
    },
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_layout_spec(spec, path: str) -> dict:
    if not isinstance(spec, dict):
        raise ConfigError(path, f"each layout must be a mapping with a `type`, got {type(spec).__name__}")
    kind = spec.get("type")
    if kind not in LAYOUT_TYPES:
        raise ConfigError(f"{path}.type", f"must be one of {', '.join(LAYOUT_TYPES)}, got {kind!r}")
    allowed = _LAYOUT_PARAMS[kind]
    for key, value in spec.items():
        if key == "type":
            continue
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise ConfigError(f"{path}.{key}", f"unknown parameter for a {kind} layout (known: {known})")
        typ, minimum, _ = allowed[key]
        if typ is int:
            if not _is_int(value):
                raise ConfigError(f"{path}.{key}", f"must be an int, got {type(value).__name__}")
            if value < minimum:
                raise ConfigError(f"{path}.{key}", f"must be >= {minimum}, got {value}")
        elif key == "blocks":
            if not isinstance(value, list) or not value or not all(_is_int(b) for b in value):
                raise ConfigError(f"{path}.{key}", f"must be a non-empty list of block indices (ints), got {value!r}")
    for key, (_, _, required) in allowed.items():
        if required and key not in spec:
            raise ConfigError(f"{path}.{key}", f"is required for a {kind} layout")
    if kind == "strided" and spec.get("summary", 1) > spec["stride"]:
        raise ConfigError(f"{path}.summary", f"must be <= stride ({spec['stride']}), got {spec['summary']}")
    return copy.deepcopy(spec)


@dataclass
class AttentionConfig:
    """Validated ``attention`` section. ``layout`` is a list of specs whose union is the block layout."""

    implementation: str = "sdpa"
    block_size: int = 64
    layout: list[dict] = field(default_factory=lambda: copy.deepcopy(DEFAULT_LAYOUT))
    seed: int = 0
    kernel: str = "auto"
    # CPU kernel: keep the active blocks' probabilities for the backward ("auto": when they take at most 4x the bytes
    # of q, k, v and the output; True: always; False: never, recompute them as FlashAttention does)
    keep_probabilities: bool | str = "auto"

    @classmethod
    def from_dict(cls, d: dict | None, path: str = "attention") -> AttentionConfig:
        """Build from the raw mapping; raise :class:`ConfigError` naming the key path on any bad key or value."""
        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise ConfigError(path, f"must be a mapping, got {type(d).__name__}")
        known = {"implementation", "block_size", "layout", "seed", "kernel", "keep_probabilities"}
        for key in d:
            if key not in known:
                raise ConfigError(f"{path}.{key}", f"unknown key (known: {', '.join(sorted(known))})")
        cfg = cls()
        if "implementation" in d:
            impl = d["implementation"]
            if impl not in HF_IMPLEMENTATIONS:
                raise ConfigError(f"{path}.implementation", f"must be one of {', '.join(HF_IMPLEMENTATIONS)}, "
                                                            f"got {impl!r}")
            cfg.implementation = impl
        if "block_size" in d:
            bs = d["block_size"]
            if not _is_int(bs):
                raise ConfigError(f"{path}.block_size", f"must be an int, got {type(bs).__name__}")
            if bs < 16 or bs & (bs - 1):
                raise ConfigError(f"{path}.block_size", f"must be a power of two >= 16 (Triton tiles), got {bs}")
            cfg.block_size = bs
        if "seed" in d:
            if not _is_int(d["seed"]) or d["seed"] < 0:
                raise ConfigError(f"{path}.seed", f"must be a non-negative int, got {d['seed']!r}")
            cfg.seed = d["seed"]
        if "kernel" in d:
            if d["kernel"] not in IMPLEMENTATIONS:
                raise ConfigError(f"{path}.kernel", f"must be one of {', '.join(IMPLEMENTATIONS)}, got {d['kernel']!r}")
            cfg.kernel = d["kernel"]
        if "keep_probabilities" in d:
            keep = d["keep_probabilities"]
            if keep != "auto" and not isinstance(keep, bool):
                raise ConfigError(f"{path}.keep_probabilities", f"must be auto, true or false, got {keep!r}")
            cfg.keep_probabilities = keep
        if "layout" in d:
            specs = d["layout"]
            if isinstance(specs, dict):  # a single layout need not be wrapped in a list
                specs = [specs]
            if not isinstance(specs, list) or not specs:
                raise ConfigError(f"{path}.layout", "must be a non-empty list of layouts (each with a `type`)")
            cfg.layout = [_check_layout_spec(s, f"{path}.layout[{i}]") for i, s in enumerate(specs)]
        return cfg

    def to_dict(self) -> dict:
        """Plain, JSON/YAML-friendly mapping that :meth:`from_dict` reads back to an equal config."""
        return {
            "implementation": self.implementation,
            "block_size": self.block_size,
            "layout": copy.deepcopy(self.layout),
            "seed": self.seed,
            "kernel": self.kernel,
            "keep_probabilities": self.keep_probabilities,
        }
