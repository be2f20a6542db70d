"""One validated config with sections ``model``, ``data``, ``train``, ``deepspeed``, ``sparsity`` (+ ``attention``,
``compression``).

Every section is a dataclass that checks its own values; an error is a :class:`ConfigError` naming the dotted key
path (``sparsity.sparsity``), raised while loading, before any process group starts. Files are YAML or JSON;
duplicate keys are errors (JSON and YAML would silently keep the last one). ``--set a.b=value`` overrides any key
(the value is parsed as YAML: ``0.9`` is a float, ``true`` a bool, ``rigl`` a string).
"""

import copy
import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dist_sparse.errors import ConfigError


# Names are validated against the registries themselves, so that methods, distributions and compressors
# registered by user code (the config's ``plugins``) are valid names.
def method_names() -> tuple:
    from dist_sparse.methods import method_names

    return method_names()


def distribution_names() -> tuple:
    from dist_sparse.distributions import DISTRIBUTIONS

    return tuple(DISTRIBUTIONS)


def compression_names() -> tuple:
    from dist_sparse.compression import randomk, threshold, topk  # noqa: F401  (the built-in compressors)
    from dist_sparse.compression.base import COMPRESSORS

    return ("none", *COMPRESSORS)


def load_plugins(modules, key: str = "plugins") -> None:
    """Import user modules whose import registers methods, distributions or compressors (``plugins: [...]``).
    Every process that validates a config imports them first, so their names are valid everywhere."""
    import importlib

    if modules is None:
        return
    if not isinstance(modules, (list, tuple)) or not all(isinstance(m, str) for m in modules):
        raise ConfigError(key, f"must be a list of module names, got {modules!r}")
    for i, name in enumerate(modules):
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise ConfigError(f"{key}[{i}]", f"cannot import plugin module {name!r}: {exc}") from exc


# --------------------------------------------------------------------------------------------------------------
# generic checking of a dict against a dataclass


def _type_ok(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if tp is typing.Any:
        return True
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # an int is an acceptable float; a bool or a string is not
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        (inner,) = typing.get_args(tp)[:1] or (typing.Any,)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, inner) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return isinstance(value, tp)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(cls, raw, path: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(path, f"must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]}", f"unknown key (known keys: {', '.join(sorted(names))})")
    kwargs = {}
    implied = getattr(cls, "implied_defaults", None)  # defaults that follow from other keys (N:M -> sparsity)
    if implied is not None:
        raw = {**implied(raw), **raw}
    for name, value in raw.items():
        tp = hints[name]
        if not _type_ok(value, tp):
            raise ConfigError(f"{path}.{name}", f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path}.{name}", f"must be a finite number, got {value!r}")
        kwargs[name] = float(value) if tp is float else value
    obj = cls(**kwargs)
    obj.check(path)
    return obj


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(key, msg)


# --------------------------------------------------------------------------------------------------------------
# sections


@dataclass
class ModelConfig:
    """A GPT-2- or Llama-style causal LM built from these sizes, any Hugging Face causal LM built from its
    ``config.json`` (``config``, random init), or a Hugging Face checkpoint (``pretrained``).

    ``config`` and ``pretrained`` exclude each other and the built-in path's keys (:data:`BUILTIN_MODEL_KEYS`):
    the model is then described by its own config, and a size key next to it would silently mean nothing
    (checked on the raw keys in :func:`check_model_keys`). ``block_size`` is the training context on every path."""

    type: str = "gpt2"  # gpt2 | llama (for models built from scratch)
    pretrained: str | None = None  # local HF checkpoint directory (weights + config); never downloads
    config: str | None = None  # a HF config.json (or a directory holding one): any causal LM, random init
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128  # context length (n_positions)
    dropout: float = 0.0
    intermediate_size: int | None = None  # llama MLP width (default 4 * n_embd)
    n_kv_head: int | None = None  # llama grouped-query heads
    extra: dict = field(default_factory=dict)  # further HF config fields

    def check(self, p: str) -> None:
        _require(self.type in ("gpt2", "llama"), f"{p}.type", f"must be 'gpt2' or 'llama', got {self.type!r}")
        for k in ("n_layer", "n_head", "n_embd", "block_size"):
            _require(getattr(self, k) >= 1, f"{p}.{k}", "must be >= 1")
        _require(self.n_embd % self.n_head == 0, f"{p}.n_embd", f"must be divisible by n_head ({self.n_head})")
        _require(0.0 <= self.dropout < 1.0, f"{p}.dropout", "must be in [0, 1)")
        if self.pretrained is not None:
            _require(Path(self.pretrained).is_dir(), f"{p}.pretrained",
                     f"checkpoint directory not found: {self.pretrained}")
        _require(self.config is None or self.pretrained is None, f"{p}.config",
                 "model.config and model.pretrained exclude each other (a config builds a randomly initialised "
                 "model; a checkpoint brings its own config and weights)")
        if self.config is not None:
            from dist_sparse.integration.hf import load_model_config

            hf_config = load_model_config(self.config, f"{p}.config")  # a bad file fails here, before any rank
            limit = max_positions(hf_config)
            _require(limit is None or self.block_size <= limit, f"{p}.block_size",
                     f"{self.block_size} exceeds the model's max_position_embeddings ({limit}) in {self.config}")

    @property
    def source(self) -> str:
        """How the model is built: ``config`` (a HF config file), ``pretrained`` or the built-in ``type``."""
        return "config" if self.config else "pretrained" if self.pretrained else self.type


# keys that describe the built-in models only; with model.config or model.pretrained they are errors
BUILTIN_MODEL_KEYS = ("type", "n_layer", "n_head", "n_embd", "dropout", "intermediate_size", "n_kv_head", "extra")


def max_positions(hf_config) -> int | None:
    """The longest context a Hugging Face config supports (``max_position_embeddings``, GPT-2's ``n_positions``
    through its attribute map), None when the architecture has no fixed limit."""
    value = getattr(hf_config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def check_model_keys(raw) -> dict:
    """With ``model.config`` or ``model.pretrained`` set, a built-in size key is a ConfigError. A key set to null
    is dropped first (``--set model.n_layer=null`` unsets a key a base config file sets)."""
    if not isinstance(raw, dict):
        return raw
    raw = {k: v for k, v in raw.items() if not (v is None and k in BUILTIN_MODEL_KEYS)}
    for source in ("config", "pretrained"):
        if raw.get(source) is not None:
            given = [k for k in BUILTIN_MODEL_KEYS if k in raw]
            if given:
                raise ConfigError(f"model.{given[0]}", f"cannot be set together with model.{source}: the model "
                                  f"is described by {raw[source]} (remove {', '.join('model.' + k for k in given)}"
                                  f", or set them to null)")
    return raw


@dataclass
class DataConfig:
    """Character- or byte-level text (``path``; null = the embedded corpus, the Python standard library source), or
    token shards written by ``dist-sparse prepare-data`` (``prepared``, read through memory maps; docs/data.md)."""

    path: str | None = None
    prepared: str | None = None  # a dist-sparse prepare-data directory; excludes path
    tokenizer: str | None = None  # char | byte, for path / the embedded corpus (default char)
    val_fraction: float | None = None  # of the text's tokens, for path / the embedded corpus (default 0.1)
    max_chars: int | None = None  # cap on corpus size (the embedded corpus is large)
    sampling: str = "random"  # random (windows drawn per step, rank, micro-batch) | epoch (each window once per epoch)

    def check(self, p: str) -> None:
        _require(self.sampling in ("random", "epoch"), f"{p}.sampling",
                 f"must be 'random' or 'epoch', got {self.sampling!r}")
        if self.prepared is not None:
            # the prepared set carries its own tokenizer and split: a second source of either would be ignored
            _require(self.path is None, f"{p}.path", "data.path and data.prepared exclude each other; set one")
            for key in ("tokenizer", "val_fraction", "max_chars"):
                _require(getattr(self, key) is None, f"{p}.{key}",
                         f"is decided by the prepared data (data.prepared: {self.prepared}), not by the config; "
                         f"remove it (or set it to null)")
            from dist_sparse.prepared.format import read_index

            read_index(self.prepared, f"{p}.prepared")
            return
        _require(self.tokenizer in (None, "char", "byte"), f"{p}.tokenizer", f"must be 'char' or 'byte', got "
                                                                             f"{self.tokenizer!r}")
        if self.val_fraction is not None:
            _require(0.0 < self.val_fraction < 1.0, f"{p}.val_fraction", "must be in (0, 1)")
        if self.path is not None:
            _require(Path(self.path).is_file(), f"{p}.path", f"data file not found: {self.path}")
        if self.max_chars is not None:
            _require(self.max_chars >= 1000, f"{p}.max_chars", "must be >= 1000")

    @property
    def text_tokenizer(self) -> str:
        return self.tokenizer or "char"

    @property
    def text_val_fraction(self) -> float:
        return 0.1 if self.val_fraction is None else self.val_fraction


@dataclass
class TrainConfig:
    steps: int = 300
    seed: int = 0
    output_dir: str = "runs/demo"
    log_interval: int = 10  # JSONL/TensorBoard every N steps
    eval_interval: int = 100
    eval_batches: int = 20
    save_interval: int = 0  # checkpoint every N steps (0: only at the end); see docs/reliability.md
    # a fresh (not resumed) run into an output_dir that holds another run's checkpoints is refused unless this is
    # true: then those checkpoints are deleted first (mixing them would let --resume auto pick the wrong run's)
    overwrite_output_dir: bool = False
    tensorboard: bool = True
    progress: bool = True
    dist_timeout_s: float = 600.0
    max_skipped_steps: int = 5
    save_final_model: bool = True
    threads: int | None = None  # torch intra-op threads per rank (default: cores / local ranks)
    # stop cleanly (checkpoint, exit code 75) before this much time has passed since the start: '3h50m', '90m',
    # or seconds; see dist_sparse/stopping.py and docs/multinode.md
    time_limit: str | float | None = None

    def check(self, p: str) -> None:
        _require(self.steps >= 1, f"{p}.steps", "must be >= 1")
        for k in ("log_interval", "eval_interval", "eval_batches"):
            _require(getattr(self, k) >= 1, f"{p}.{k}", "must be >= 1")
        _require(self.save_interval >= 0, f"{p}.save_interval", "must be >= 0")
        _require(self.dist_timeout_s > 0, f"{p}.dist_timeout_s", "must be > 0")
        _require(self.max_skipped_steps >= 1, f"{p}.max_skipped_steps", "must be >= 1")
        _require(self.threads is None or self.threads >= 1, f"{p}.threads", "must be >= 1")
        if self.time_limit is not None:
            from dist_sparse.stopping import parse_duration

            parse_duration(self.time_limit, f"{p}.time_limit")


@dataclass
class SparsityConfig:
    method: str | type = "none"  # none | static | magnitude | set | rigl | a registered method (name or class)
    sparsity: float = 0.9  # target fraction of zeros over the sparsified parameters
    distribution: str = "erk"  # uniform | erk | global
    erk_power_scale: float = 1.0
    params: list[str] | None = None  # glob patterns of parameter names; None = attention and MLP weight matrices
    exclude: list[str] = field(default_factory=list)
    update_interval: int = 100  # Delta-T: steps between mask updates
    start_step: int = 0
    end_step: int | None = None  # last update step (exclusive); default 0.75 * train.steps (RigL's T_end)
    drop_fraction: float = 0.3  # alpha: fraction of active weights dropped/regrown (SET, RigL)
    # constant | cosine (the RigL paper's decay). Constant for both SET and RigL: at this project's scale RigL with a
    # constant fraction measured better than with the cosine decay (docs/methods.md, "Drop fraction")
    drop_fraction_schedule: str = "constant"
    # rigl: grow on the dense gradient averaged over this many steps ending at the update (1 = the paper: the update
    # step's batch); unset: update_interval where every step reduces the dense gradient anyway (masked-dense state,
    # no gradient compression, dense kernels), else 1 (dist_sparse/methods/rigl.py)
    grow_grad_steps: int | None = None
    init_masks: str | None = None  # a sparsity_masks.safetensors file (or a directory holding one) to start from
    seed: int | None = None  # mask randomness; default: train.seed
    compact_state: bool = False  # master weights, moments, gradients only for active weights (docs/memory.md)
    # ZeRO-3: parameter all-gathers carry each shard's mask bits + active values only (docs/memory.md)
    packed_gather: bool = False
    # keep every sparsified parameter's full mask on every rank between mask changes (1 bit per weight per rank)
    # for the senders that select from their whole local gradient (compact state's packed reduction, gradient
    # compression); false: each tensor's full mask is all-gathered from the shards when needed and released
    # (mask-bit traffic every step, masks per rank ~1/world); docs/memory.md "Masks stay sharded"
    replicate_masks: bool = False
    # unstructured | "N:M" (at most N of every M consecutive input weights; density N/M) | "block:HxW" (whole
    # blocks of H output rows x W input columns); dist_sparse/patterns.py
    pattern: str = "unstructured"
    srste_decay: float = 2e-4  # sr_ste: lambda_W, the sparse-refined decay on pruned weights (Zhou et al. 2021)
    init_batches: int = 1  # snip, grasp: training batches per rank scored at step 0 (SNIP's one mini-batch)
    init_rounds: int = 100  # synflow: pruning rounds of the exponential density schedule (the paper's 100)
    # how sparsified Linear/Conv1D layers multiply (docs/kernels.md): dense (masked weights, dense matmuls) |
    # block_sparse (block:HxW patterns; active blocks only) | semi_structured (2:4 on CUDA) | auto (measured per
    # layer shape at start: block_sparse where faster, semi_structured for 2:4 on CUDA, else dense)
    kernel: str = "auto"
    # standard (the dense model's init and learning rate) | supar (SμPar: per sparsified layer of density rho, the
    # initial weights x rho^-1/2 and, with Adam, the learning rate x 1/rho; dist_sparse/parameterization.py);
    # unset: supar where it applies (masks drawn at step 0 from the distribution, random init, Adam), else standard
    parameterization: str | None = None

    @staticmethod
    def implied_defaults(raw: dict) -> dict:
        """An N:M pattern fixes the sparsity at 1 - N/M: it is the default when ``sparsity`` is not given. Pruning
        at initialization selects globally, as its papers do, unless ``distribution`` is given."""
        from dist_sparse.patterns import parse_pattern

        implied = {}
        if raw.get("method") in PAI_METHODS and "distribution" not in raw:
            implied["distribution"] = "global"
        if "sparsity" in raw or not isinstance(raw.get("pattern"), str):
            return implied
        try:
            density = parse_pattern(raw["pattern"]).fixed_density
        except ConfigError:  # reported by check() with the key
            return implied
        return implied if density is None else {**implied, "sparsity": 1.0 - density}

    def check(self, p: str) -> None:
        if isinstance(self.method, type):  # the Python API: a method class, registered under its name
            from dist_sparse.methods import METHODS, SparseMethod

            _require(issubclass(self.method, SparseMethod) and METHODS.get(self.method.name) is self.method,
                     f"{p}.method", f"{self.method.__name__} is not a registered SparseMethod (register it with "
                                    "dist_sparse.methods.register)")
            self.method = self.method.name
        names = method_names()
        _require(self.method in names, f"{p}.method",
                 f"unknown method {self.method!r}; choose one of {', '.join(names)} (user methods: register them "
                 "in a module listed under plugins)")
        _require(0.0 <= self.sparsity < 1.0, f"{p}.sparsity", f"must be in [0, 1), got {self.sparsity!r}")
        names = distribution_names()
        _require(self.distribution in names, f"{p}.distribution",
                 f"unknown distribution {self.distribution!r}; choose one of {', '.join(names)}")
        _require(self.erk_power_scale > 0, f"{p}.erk_power_scale", "must be > 0")
        _require(self.update_interval >= 1, f"{p}.update_interval", "must be >= 1")
        _require(self.start_step >= 0, f"{p}.start_step", "must be >= 0")
        if self.end_step is not None:
            _require(self.end_step > self.start_step, f"{p}.end_step", "must be > start_step")
        _require(0.0 <= self.drop_fraction <= 1.0, f"{p}.drop_fraction", "must be in [0, 1]")
        _require(self.grow_grad_steps is None or (isinstance(self.grow_grad_steps, int) and not isinstance(
            self.grow_grad_steps, bool) and self.grow_grad_steps >= 1), f"{p}.grow_grad_steps",
            "must be an integer >= 1 (or unset)")
        _require(self.grow_grad_steps is None or self.grow_grad_steps <= self.update_interval, f"{p}.grow_grad_steps",
                 f"must be <= update_interval ({self.update_interval}): growth windows may not overlap")
        _require(self.drop_fraction_schedule in ("cosine", "constant"), f"{p}.drop_fraction_schedule",
                 "must be 'constant' or 'cosine' (unset meant 'cosine' for rigl before the default became 'constant')")
        if self.init_masks is not None:
            _require(Path(self.init_masks).exists(), f"{p}.init_masks", f"mask file not found: {self.init_masks}")
        from dist_sparse.patterns import parse_pattern

        pattern = parse_pattern(self.pattern, f"{p}.pattern")
        _require(self.kernel in KERNELS, f"{p}.kernel",
                 f"unknown kernel {self.kernel!r}; choose one of {', '.join(KERNELS)}")
        _require(self.kernel != "block_sparse" or pattern.block_shape is not None, f"{p}.kernel",
                 f"block_sparse needs a block pattern (sparsity.pattern: 'block:HxW'), got {pattern.spec!r}")
        _require(self.kernel != "semi_structured" or pattern.nm == (2, 4), f"{p}.kernel",
                 f"semi_structured needs sparsity.pattern '2:4', got {pattern.spec!r}")
        _require(self.method != "none" or pattern.spec == "unstructured", f"{p}.pattern",
                 f"{pattern.spec!r} needs a sparse method (sparsity.method is 'none')")
        for key in ("init_batches", "init_rounds"):
            v = getattr(self, key)
            _require(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{p}.{key}",
                     f"must be an integer >= 1, got {v!r}")
        _require(self.srste_decay >= 0, f"{p}.srste_decay", f"must be >= 0, got {self.srste_decay!r}")
        _require(self.parameterization in (None, "standard", "supar"), f"{p}.parameterization",
                 f"must be 'standard' or 'supar' (or unset), got {self.parameterization!r}")
        _require(self.method != "sr_ste" or pattern.nm is not None, f"{p}.pattern",
                 f"sr_ste trains N:M sparsity (Zhou et al. 2021): set sparsity.pattern to N:M, e.g. 2:4 (got "
                 f"{pattern.spec!r})")
        if pattern.fixed_density is not None:
            _require(abs((1.0 - self.sparsity) - pattern.fixed_density) < 1e-9, f"{p}.sparsity",
                     f"pattern {pattern.spec} fixes the sparsity at {1.0 - pattern.fixed_density:g} (density N/M); "
                     f"got {self.sparsity!r}: remove sparsity.sparsity or set it to {1.0 - pattern.fixed_density:g}")


KERNELS = ("auto", "dense", "block_sparse", "semi_structured")


@dataclass
class FreezeConfig:
    """Weights kept but never trained (dist_sparse/freezing.py, docs/methods.md)."""

    fraction: float = 0.0  # of each sparsified layer's unpruned weights, frozen at their initial value (FreezeNet)
    select: str = "random"  # which are frozen: random | magnitude (lowest |w|) | saliency (lowest |g * w|)
    modules: list[str] = field(default_factory=list)  # globs of module names: no gradient at all, not sparsified
    schedule: list[dict] = field(default_factory=list)  # [{modules: glob, step: N}]: frozen from step N

    def check(self, p: str) -> None:
        _require(0.0 <= self.fraction < 1.0, f"{p}.fraction", f"must be in [0, 1), got {self.fraction!r}")
        _require(self.select in ("random", "magnitude", "saliency"), f"{p}.select",
                 f"must be 'random', 'magnitude' or 'saliency', got {self.select!r}")
        for i, entry in enumerate(self.schedule):
            key = f"{p}.schedule[{i}]"
            _require(isinstance(entry, dict) and set(entry) == {"modules", "step"}, key,
                     f"must be a mapping {{modules: glob, step: N}}, got {entry!r}")
            _require(isinstance(entry["modules"], str), f"{key}.modules", "must be a glob string")
            step = entry["step"]
            _require(isinstance(step, int) and not isinstance(step, bool) and step >= 0, f"{key}.step",
                     f"must be an integer >= 0, got {step!r}")

    @property
    def enabled(self) -> bool:
        return self.fraction > 0 or bool(self.modules) or bool(self.schedule)


def check_freeze(freeze: FreezeConfig, sparsity: SparsityConfig, compression: "CompressionConfig") -> None:
    """What freezing cannot be combined with, refused before any process group starts."""
    if freeze.schedule:  # their masters are written back through the dense views after every step
        _require(not sparsity.compact_state, "freeze.schedule", "is not supported with sparsity.compact_state yet")
        _require(not compression.enabled, "freeze.schedule", "is not supported with gradient compression yet (the "
                                                             "compressed exchange expects every gradient)")
    if freeze.fraction <= 0:
        return
    _require(sparsity.method != "none", "freeze.fraction", "freezes a fraction of the sparsified layers' unpruned "
                                                           "weights: it needs a sparse method (sparsity.method)")
    if sparsity.compact_state:  # the packed store lays out by the trainable set (active and not frozen)
        _require(not compression.enabled, "freeze.fraction", "with sparsity.compact_state is not supported with "
                                                             "gradient compression yet (its exchange and staged "
                                                             "moments follow the active layout, not the trainable one)")
        _require(not sparsity.packed_gather, "freeze.fraction", "with sparsity.compact_state is not supported with "
                                                                "sparsity.packed_gather: packed shards keep only the "
                                                                "trainable values, frozen weights live in the dense "
                                                                "shard")
    from dist_sparse.methods import METHODS
    from dist_sparse.patterns import parse_pattern

    _require(not METHODS[sparsity.method].dense_weights, "freeze.fraction",
             f"{sparsity.method!r} re-decides its masks from dense weights: a frozen set of unpruned weights is "
             "not defined for it")
    _require(parse_pattern(sparsity.pattern).spec == "unstructured", "freeze.fraction",
             f"is defined for unstructured sparsity; sparsity.pattern is {sparsity.pattern!r}")


@dataclass
class CompressionConfig:
    """Sparse gradient exchange with error feedback (docs/compression.md). The key set is a contract."""

    method: str = "none"  # none | topk | randomk | threshold
    density: float = 0.01  # fraction of the (unpruned) coordinates each rank sends per tensor
    error_feedback: bool = True  # Stich et al. 2018: what was not sent is added to the next step's gradient
    # Lin et al. 2018 (DGC): accumulate momentum locally, before selection. None (the default) follows the optimizer
    # (resolved_for): on with error feedback for Adam/AdamW and momentum SGD, the best measured recipes
    # (docs/compression.md); off for plain SGD and for SGD under dist-sparse train (no SGD checkpoints)
    momentum_correction: bool | None = None
    warmup_steps: int = 0  # DGC warm-up: density ramps exponentially from 1 to `density` over these steps
    min_tensor_size: int = 0  # tensors with fewer elements are sent dense (0: every tensor is compressed)
    scope: str = "all"  # all: one exchange over every rank | inter_node: dense within a node, compressed across
    # the dtype the per-rank compression state (residuals, momentum-correction buffers) is kept in: bf16 halves it
    residual_dtype: str = "fp32"  # fp32 | bf16

    def check(self, p: str) -> None:
        names = compression_names()
        _require(self.method in names, f"{p}.method",
                 f"unknown method {self.method!r}; choose one of {', '.join(names)}")
        _require(0.0 < self.density <= 1.0, f"{p}.density", f"must be in (0, 1], got {self.density!r}")
        _require(self.warmup_steps >= 0, f"{p}.warmup_steps", "must be >= 0")
        _require(self.min_tensor_size >= 0, f"{p}.min_tensor_size", "must be >= 0")
        _require(self.scope in ("all", "inter_node"), f"{p}.scope",
                 f"must be 'all' or 'inter_node', got {self.scope!r}")
        _require(self.residual_dtype in ("fp32", "bf16"), f"{p}.residual_dtype",
                 f"must be 'fp32' or 'bf16', got {self.residual_dtype!r}")
        _require(not self.momentum_correction or self.error_feedback, f"{p}.momentum_correction",
                 "needs error_feedback: true (DGC corrects momentum on the accumulated, not-yet-sent velocity)")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def resolved_for(self, optimizer_type: str, momentum: float | None = None,
                     checkpoints_sgd: bool = True) -> "CompressionConfig":
        """This config with ``momentum_correction`` decided when it was left unset, by the best measured recipe
        for the optimizer (docs/compression.md): on with error feedback for Adam/AdamW (top-k 1% + error feedback
        with AdamW reaches 0.999x the uncompressed loss with it, 1.04x without) and for SGD with ``momentum`` > 0
        (DGC: 1.039x against 1.045x without, bench/bench_compression_sgd.py); off for plain SGD, whenever error
        feedback is off, and for SGD where the loop does not checkpoint SGD (``checkpoints_sgd`` False: dist-sparse
        train, whose checkpoints cover Adam-family optimizers only). An explicit value is kept."""
        if self.momentum_correction is not None:
            return self
        kind = str(optimizer_type).lower()
        on = kind in ("adam", "adamw") or (kind == "sgd" and checkpoints_sgd and (momentum or 0) > 0)
        return dataclasses.replace(self, momentum_correction=bool(self.enabled and self.error_feedback and on))


def check_compression_with_deepspeed(c: CompressionConfig, ds: dict, p: str = "compression") -> None:
    """Combinations the compressed exchange cannot serve, refused before any process group starts."""
    if not c.enabled:
        return
    zero = ds.get("zero_optimization", {}) or {}
    _require(not zero.get("offload_optimizer"), f"{p}.method",
             "gradient compression does not support deepspeed.zero_optimization.offload_optimizer (the offloaded "
             "gradient path bypasses the partition gradients the compressed exchange writes)")
    # fp16: residuals and momentum buffers are kept unscaled (ds_compression.py, docs/compression.md); at ZeRO-0
    # DeepSpeed 0.19.8 hands the loss to backward unscaled (only ZeRO optimizers scale it), so the exchange could not
    # know which scale the gradients carry
    _require(not ((ds.get("fp16") or {}).get("enabled", False) and int(zero.get("stage", 0)) == 0), f"{p}.method",
             "gradient compression with fp16 needs ZeRO stage 1, 2 or 3 (at stage 0 DeepSpeed's fp16 optimizer does "
             "not scale the loss the way the exchange unscales it); use stage 1-3, or bf16")
    if c.momentum_correction:
        opt = (ds.get("optimizer") or {}).get("type", "AdamW")
        _require(str(opt).lower() in ("sgd", "adam", "adamw"), f"{p}.momentum_correction",
                 f"is defined for momentum SGD (DGC) and Adam/AdamW (moments on the local gradient, "
                 f"docs/compression.md); deepspeed.optimizer.type is {opt!r}")


def check_compact_state(sparsity: SparsityConfig, ds: dict, p: str = "sparsity") -> None:
    """``sparsity.compact_state`` needs DeepSpeed's ZeRO-1/2/3 optimizer (fp32, bf16 or fp16) and Adam/AdamW (see
    docs/memory.md); anything else is refused here, before a process group starts."""
    if not sparsity.compact_state:
        return
    key = f"{p}.compact_state"
    zero = ds.get("zero_optimization", {}) or {}
    stage = zero.get("stage", 0)
    # stage 0 has no partition to pack
    _require(stage in (1, 2, 3), key, f"is supported with ZeRO stages 1, 2 and 3, not stage {stage} "
                                      "(set deepspeed.zero_optimization.stage)")
    _require(not (stage == 1 and (ds.get("bf16") or {}).get("enabled", False)), key,
             "with bf16 needs ZeRO stage 2 (DeepSpeed runs ZeRO-1 + bf16 through its BF16_Optimizer)")
    # gradient_accumulation_steps > 1 works at every stage (ZeRO-1/2 sum micro-batches locally, reduce packed)
    _require(not zero.get("offload_optimizer"), key, "is not supported with zero_optimization.offload_optimizer")
    _require(not zero.get("offload_param"), key, "is not supported with zero_optimization.offload_param")
    _require(zero.get("contiguous_gradients", True) is not False, key,
             "needs zero_optimization.contiguous_gradients: true")
    opt = (ds.get("optimizer") or {}).get("type", "AdamW")
    _require(str(opt).lower() in ("adam", "adamw"), key, f"supports the Adam and AdamW optimizers, not {opt!r}")


def packed_gather_refusal(zero: dict, autocast: bool) -> str | None:
    """Why the ZeRO-3 settings ``zero`` (DeepSpeed's ``zero_optimization`` keys) cannot gather parameters packed,
    or None. The packed gather replaces DeepSpeed's plain shard all-gather; the variants below move the shard
    differently (offloaded, quantized, in a subgroup, by an all-reduce, in another dtype) and are not built."""
    if zero.get("offload_param"):
        return "is not supported with zero_optimization.offload_param (the shards live off the device)"
    if int(zero.get("zero_hpz_partition_size", 1) or 1) > 1 or int(zero.get("mics_shard_size", -1) or -1) > 0:
        return "is not supported with hierarchical partitioning (zero_hpz_partition_size > 1, mics_shard_size)"
    if zero.get("zero_quantized_weights") or zero.get("zero_quantized_nontrainable_weights"):
        return "is not supported with zero_quantized_weights (DeepSpeed's int8 gather)"
    if zero.get("stage3_use_all_reduce_for_fetch_params"):
        return "is not supported with stage3_use_all_reduce_for_fetch_params (parameters fetched by an all-reduce)"
    if autocast:
        return "is not supported with torch_autocast (the gather's communication dtype differs from the shard's)"
    return None


def check_packed_gather(sparsity: SparsityConfig, ds: dict, p: str = "sparsity") -> None:
    """``sparsity.packed_gather`` needs ZeRO-3 (the only stage that gathers parameters) and a method that keeps
    masks (their bits and the active values are what is gathered); refused here, before a process group starts."""
    if not sparsity.packed_gather:
        return
    key = f"{p}.packed_gather"
    zero = ds.get("zero_optimization", {}) or {}
    stage = int(zero.get("stage", 0))
    _require(stage == 3, key, f"needs ZeRO stage 3, not {stage}: only ZeRO-3 all-gathers parameters (at stages "
                              "0-2 every rank holds the whole weights); set deepspeed.zero_optimization.stage: 3")
    _require(sparsity.method != "none", key, "needs a sparsity method that keeps masks (sparsity.method is 'none': "
                                             "nothing is pruned, so there are no mask bits to gather by)")
    why = packed_gather_refusal(zero, bool((ds.get("torch_autocast") or {}).get("enabled", False)))
    _require(why is None, key, why or "")


PAI_METHODS = ("snip", "grasp", "synflow")


def check_pai_with_deepspeed(sparsity: SparsityConfig, ds: dict) -> None:
    """Pruning at initialization at ZeRO-3: SNIP scores each rank's partition from DeepSpeed's reduced gradient;
    GraSP and SynFlow need whole-network computations that ZeRO-3's per-module gathers cannot run (the method's
    ``zero3_refusal`` says why). Refused here, before a process group starts."""
    from dist_sparse.methods import METHODS
    from dist_sparse.methods.pai import PruningAtInit, zero3_refusal_message

    stage = int((ds.get("zero_optimization", {}) or {}).get("stage", 0))
    cls = METHODS.get(sparsity.method) if isinstance(sparsity.method, str) else sparsity.method
    if stage != 3 or not (isinstance(cls, type) and issubclass(cls, PruningAtInit)):
        return
    why = zero3_refusal_message(cls)
    _require(why is None, "sparsity.method", why or "")


def check_dense_weights(sparsity: SparsityConfig, compression: CompressionConfig) -> None:
    """Methods that train dense weights through a masked forward (``dense_weights``: sr_ste) need every master
    weight and the gradient of every position: compact state stores only the kept masters, and gradient
    compression never sends the gradients of pruned positions. Refused here, before any process group starts."""
    from dist_sparse.methods import METHODS

    cls = METHODS.get(sparsity.method)
    if cls is None or not cls.dense_weights:
        return
    _require(not sparsity.compact_state, "sparsity.compact_state",
             f"{sparsity.method!r} keeps dense master weights (pruned ones included); compact state stores only the "
             "kept ones: set sparsity.compact_state: false")
    _require(not compression.enabled, "compression.method",
             f"{sparsity.method!r} applies the straight-through gradient of pruned weights, which gradient "
             "compression never sends: set compression.method: none")


def check_kernel_with_deepspeed(sparsity: SparsityConfig, ds: dict, p: str = "sparsity") -> None:
    """``block_sparse`` runs at every ZeRO stage (at ZeRO-3 on the weight DeepSpeed gathers for the module's forward;
    the block index comes from the sharded masks). ``semi_structured`` is built for ZeRO 0-2 only: its sparse weight
    is compressed from the whole weight, and at ZeRO-3 that path has never run on a GPU, so it is refused there
    (``auto`` picks ``dense`` for 2:4 at stage 3)."""
    stage = (ds.get("zero_optimization", {}) or {}).get("stage", 0)
    _require(not (stage == 3 and sparsity.kernel == "semi_structured"), f"{p}.kernel",
             "'semi_structured' is supported with ZeRO stages 0-2, not stage 3; use kernel: dense (or auto, which "
             "picks dense for 2:4 at stage 3)")


def check_compression_with_compact_state(c: CompressionConfig, sparsity: SparsityConfig, ds: dict) -> None:
    """Gradient compression with ``sparsity.compact_state`` (ZeRO-1/2/3: the compressed exchange owns the gradient
    reduction and writes each rank's averaged ranges, or ZeRO-3 shards, into the packed store, docs/compression.md).
    fp16 is refused here, before any process group starts."""
    if not (c.enabled and sparsity.compact_state):
        return
    stage = (ds.get("zero_optimization", {}) or {}).get("stage", 0)
    _require(stage in (1, 2, 3), "compression.method",
             f"gradient compression with sparsity.compact_state needs ZeRO stage 1, 2 or 3, not {stage} (compact "
             "state packs DeepSpeed's ZeRO optimizer state)")
    _require(not (ds.get("fp16") or {}).get("enabled", False), "compression.method",
             "gradient compression with sparsity.compact_state does not support fp16 (the packed gradient store "
             "keeps loss-scaled values the exchange does not write); use bf16, or compression without compact state")


def _check_deepspeed(ds: dict, p: str = "deepspeed") -> None:
    if not isinstance(ds, dict):
        raise ConfigError(p, f"must be a mapping (a DeepSpeed config), got {type(ds).__name__}")
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{p}.zero_optimization", "must be a mapping")
    stage = zero.get("stage", 0)
    if not (isinstance(stage, int) and not isinstance(stage, bool) and 0 <= stage <= 3):
        raise ConfigError(f"{p}.zero_optimization.stage", f"must be an integer 0..3, got {stage!r}")
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        if key in ds:
            v = ds[key]
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ConfigError(f"{p}.{key}", f"must be a positive integer, got {v!r}")
    for flag in ("fp16", "bf16"):
        if flag in ds and not isinstance(ds[flag], dict):
            raise ConfigError(f"{p}.{flag}", "must be a mapping like {enabled: true}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: dict = field(default_factory=dict)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    attention: typing.Any = None  # dist_sparse.attention.config.AttentionConfig
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    plugins: list = field(default_factory=list)  # modules imported before validation (user registrations)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)

    def to_dict(self) -> dict:
        out = {k: dataclasses.asdict(getattr(self, k)) for k in ("model", "data", "train", "sparsity", "compression",
                                                                 "freeze")}
        if self.model.config or self.model.pretrained:  # loadable again: the size keys would be refused
            out["model"] = {k: v for k, v in out["model"].items() if k not in BUILTIN_MODEL_KEYS}
        out["deepspeed"] = copy.deepcopy(self.deepspeed)
        if self.plugins:
            out["plugins"] = list(self.plugins)
        if self.attention is not None:
            out["attention"] = self.attention.to_dict()
        return out

    @property
    def zero_stage(self) -> int:
        return int(self.deepspeed.get("zero_optimization", {}).get("stage", 0))


SECTIONS = ("model", "data", "train", "deepspeed", "sparsity", "attention", "compression", "freeze")
TOP_LEVEL = (*SECTIONS, "plugins")


def _attention_from_dict(raw):
    from dist_sparse.attention.config import AttentionConfig

    return AttentionConfig.from_dict(raw or {}, "attention")


def from_dict(raw: dict) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError("<root>", "the config must be a mapping of sections")
    unknown = sorted(set(raw) - set(TOP_LEVEL))
    if unknown:
        raise ConfigError(unknown[0], f"unknown section (known: {', '.join(TOP_LEVEL)})")
    load_plugins(raw.get("plugins"))  # before validation: plugins register names the sections may use
    ds = copy.deepcopy(raw.get("deepspeed") or {})
    _check_deepspeed(ds)
    opt_type = str((ds.get("optimizer") or {}).get("type", "AdamW")).lower()
    # dist-sparse train: SGD's momentum is never moved into the exchange (its checkpoints could not keep it)
    compression = _build(CompressionConfig, raw.get("compression"), "compression").resolved_for(
        opt_type, checkpoints_sgd=False)
    sparsity = _build(SparsityConfig, raw.get("sparsity"), "sparsity")
    check_dense_weights(sparsity, compression)
    check_pai_with_deepspeed(sparsity, ds)
    check_compression_with_compact_state(compression, sparsity, ds)
    check_kernel_with_deepspeed(sparsity, ds)
    check_compression_with_deepspeed(compression, ds)
    # dist-sparse train checkpoints Adam-family optimizers only (ensure_optimizer_state): SGD's DGC momentum
    # correction is refused now rather than at the first checkpoint; dist_sparse.initialize (own loop) supports it
    _require(not (compression.momentum_correction and opt_type == "sgd"), "compression.momentum_correction",
             "with SGD needs a loop that checkpoints SGD, which dist-sparse train does not (Adam-family optimizers "
             "only); use it through dist_sparse.initialize in your own training loop, or use Adam/AdamW")
    cfg = Config(
        model=_build(ModelConfig, check_model_keys(raw.get("model")), "model"),
        data=_build(DataConfig, raw.get("data"), "data"),
        train=_build(TrainConfig, raw.get("train"), "train"),
        deepspeed=ds,
        sparsity=sparsity,
        attention=_attention_from_dict(raw.get("attention")) if "attention" in raw else None,
        compression=compression,
        plugins=list(raw.get("plugins") or []),
        freeze=_build(FreezeConfig, raw.get("freeze"), "freeze"),
    )
    check_freeze(cfg.freeze, cfg.sparsity, cfg.compression)
    from dist_sparse.parameterization import resolve

    resolve(cfg.sparsity, opt_type, pretrained=cfg.model.pretrained is not None)  # an explicit supar that can't apply
    check_compact_state(cfg.sparsity, cfg.deepspeed)
    check_packed_gather(cfg.sparsity, cfg.deepspeed)
    if cfg.data.prepared is not None or cfg.model.pretrained is not None:
        from dist_sparse.prepared.data import check_with_model

        check_with_model(cfg)  # vocabulary, tokenizer and context against the model, before any process group
    return cfg


# --------------------------------------------------------------------------------------------------------------
# files and overrides


class _UniqueKeyLoader(yaml.SafeLoader):
    pass


def _unique_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(str(key), f"duplicate key at line {key_node.start_mark.line + 1}")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)
# YAML 1.1 reads a bare ``2:4`` as the base-60 integer 124 (and ``1:30.5`` as a base-60 float); no config key
# means that, and ``sparsity.pattern: 2:4`` must mean N:M, so such scalars stay text (checked before int/float)
_SEXAGESIMAL = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: ([("tag:yaml.org,2002:str", _SEXAGESIMAL)] if first in "+-0123456789" else []) + list(resolvers)
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def _json_no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ConfigError(k, "duplicate key in JSON")
        out[k] = v
    return out


def read_file(path) -> dict:
    """Read a YAML or JSON config file into a dict (duplicate keys are errors)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("<config>", f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text, object_pairs_hook=_json_no_duplicates)
        else:
            data = yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError as exc:
        raise ConfigError(exc.key, f"{exc.message} in {path}") from None
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError("<config>", f"cannot parse {path}: {exc}") from exc
    return data or {}


def apply_overrides(raw: dict, overrides) -> dict:
    """Apply ``key.path=value`` strings to a raw config dict (returns a new dict)."""
    raw = copy.deepcopy(raw)
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(item, "an override must look like key.path=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(key, "empty component in key path")
        if parts[0] not in TOP_LEVEL:
            raise ConfigError(key, f"unknown section {parts[0]!r} (known: {', '.join(TOP_LEVEL)})")
        try:
            value = yaml.load(text, Loader=_UniqueKeyLoader) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(key, f"cannot parse value {text!r}: {exc}") from exc
        node = raw
        for i, part in enumerate(parts[:-1]):
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(".".join(parts[: i + 1]), "is not a mapping; cannot set a key inside it")
            node = nxt
        node[parts[-1]] = value
    return raw


def load(path=None, overrides=()) -> Config:
    raw = read_file(path) if path is not None else {}
    return from_dict(apply_overrides(raw, overrides))


def split_deepspeed_json(config) -> tuple:
    """For ``dist_sparse.initialize``: a DeepSpeed config (path or dict) carrying a ``sparsity`` block (and
    optionally a ``compression`` block).

    Returns ``(deepspeed_dict_without_our_blocks, SparsityConfig, CompressionConfig)``.
    """
    if isinstance(config, (str, Path)):
        raw = read_file(config)
    elif isinstance(config, dict):
        raw = copy.deepcopy(config)
    else:
        raise ConfigError("<config>", f"expected a path or a dict, got {type(config).__name__}")
    load_plugins(raw.pop("plugins", None))
    sparsity = _build(SparsityConfig, raw.pop("sparsity", None), "sparsity")
    compression = _build(CompressionConfig, raw.pop("compression", None), "compression")
    # the optimizer DeepSpeed will build from this config; one passed to initialize() in code is checked at attach
    if (raw.get("optimizer") or {}).get("type") is not None:
        compression = compression.resolved_for(raw["optimizer"]["type"],
                                               (raw["optimizer"].get("params") or {}).get("momentum"))
    _check_deepspeed(raw, "<deepspeed>")
    check_dense_weights(sparsity, compression)
    check_pai_with_deepspeed(sparsity, raw)
    check_compression_with_compact_state(compression, sparsity, raw)
    check_compression_with_deepspeed(compression, raw)
    check_compact_state(sparsity, raw)
    check_packed_gather(sparsity, raw)
    check_kernel_with_deepspeed(sparsity, raw)
    return raw, sparsity, compression
