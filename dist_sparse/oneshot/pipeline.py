"""`dist-sparse sparsify` end to end: validate, load, calibrate (optionally on N data-parallel ranks), save.

Ranks: ``--nproc N`` spawns N local processes (gloo on CPU, nccl on CUDA) that rendezvous over TCP on 127.0.0.1;
under an existing launcher (``torchrun``, ``deepspeed``: ``RANK``/``WORLD_SIZE`` set) the current processes are
the ranks. Rank 0 writes ``OUT_DIR``; the others only compute.
"""

import importlib.util
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dist_sparse.errors import CheckpointError, ConfigError
from dist_sparse.oneshot import METHODS
from dist_sparse.oneshot.calibration import (
    DistContext,
    PruneSettings,
    calibration_samples,
    load_text,
    prune_model,
    shard,
    tokenize_text,
)
from dist_sparse.oneshot.export import REPORT_FILE, prepare_out_dir, save_pruned_checkpoint
from dist_sparse.oneshot.layers import find_blocks, find_prunable, in_features
from dist_sparse.oneshot.nm import check_divisible, parse_pattern


@dataclass
class SparsifyOptions:
    model_dir: str
    out: str
    method: str
    sparsity: float | None = None
    pattern: str | None = None
    calib: str | None = None
    samples: int = 128
    seqlen: int = 512
    nproc: int = 1
    seed: int = 0
    batch_size: int = 8
    blocksize: int = 128
    damp: float = 0.01
    include: str | None = None
    exclude: str | None = None
    text_column: str | None = None
    device: str | None = None
    overwrite: bool = False
    compressed: bool = True
    progress: bool = True


# ------------------------------------------------------------------------------------------------ checks


def check_options(opts: SparsifyOptions) -> tuple[int, int] | None:
    """Validate the flags that need no files; returns the parsed N:M pattern (or None)."""
    if opts.method not in METHODS:
        raise ConfigError("--method", f"must be one of {', '.join(METHODS)}, got {opts.method!r}")
    if (opts.sparsity is None) == (opts.pattern is None):
        raise ConfigError("--sparsity/--pattern", "give exactly one of --sparsity S or --pattern N:M")
    nm = None
    if opts.pattern is not None:
        nm = parse_pattern(opts.pattern)
    else:
        s = opts.sparsity
        if not isinstance(s, (int, float)) or s != s or not 0.0 <= float(s) < 1.0:
            raise ConfigError("--sparsity", f"must be in [0, 1), got {s}")
    if opts.method != "magnitude" and not opts.calib:
        raise ConfigError("--calib", f"--method {opts.method} needs calibration text (--calib FILE_OR_DATASET)")
    for key, value, low in (("--samples", opts.samples, 1), ("--seqlen", opts.seqlen, 1), ("--nproc", opts.nproc, 1),
                            ("--batch-size", opts.batch_size, 1), ("--blocksize", opts.blocksize, 1)):
        if int(value) < low:
            raise ConfigError(key, f"must be at least {low}, got {value}")
    if not opts.damp > 0:
        raise ConfigError("--damp", f"must be positive, got {opts.damp}")
    return nm


def check_model_dir(model_dir) -> Path:
    path = Path(model_dir)
    if not path.exists():
        raise CheckpointError(path, "no such directory")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise CheckpointError(path, "not a Hugging Face checkpoint directory (config.json missing)")
    return path


def model_class(config):
    """The class named in ``config.architectures`` (keeps an MLM a MLM), else the causal-LM auto class."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    from transformers import AutoModel, AutoModelForCausalLM

    try:
        AutoModelForCausalLM._model_mapping[type(config)]  # noqa: B018 - lookup raises if unsupported
        return AutoModelForCausalLM
    except KeyError:
        return AutoModel


def meta_model(model_dir):
    """The model built on the meta device (no weights read): enough to check its architecture."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    cls = model_class(config)
    with torch.device("meta"):
        if hasattr(cls, "from_config"):
            return cls.from_config(config)
        return cls._from_config(config)


def load_model(model_dir, device="cpu"):
    """Load a checkpoint from safetensors only (no pickle); CheckpointError if it has no safetensors weights."""
    from transformers import AutoConfig

    path = check_model_dir(model_dir)
    config = AutoConfig.from_pretrained(str(path))
    cls = model_class(config)
    try:
        model = cls.from_pretrained(str(path), use_safetensors=True, dtype="auto")
    except OSError as exc:
        raise CheckpointError(path, f"cannot load safetensors weights: {exc}") from exc
    return model.to(device).eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def load_tokenizer(model_dir, embedding_rows: int | None = None):
    """The checkpoint's tokenizer; CheckpointError if absent or larger than the embedding matrix."""
    from transformers import AutoTokenizer

    # transformers 5 silently builds an empty tokenizer for a directory without tokenizer files
    if not any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(model_dir, f"no tokenizer in the checkpoint (none of {', '.join(TOKENIZER_FILES)})")
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:
        raise CheckpointError(model_dir, f"no usable tokenizer in the checkpoint ({type(exc).__name__}: {exc})") \
            from None
    if tok is None or isinstance(tok, bool) or len(tok) == 0:
        raise CheckpointError(model_dir, "no usable tokenizer in the checkpoint")
    if embedding_rows is not None and len(tok) > embedding_rows:
        raise CheckpointError(model_dir, f"tokenizer mismatch: the tokenizer has {len(tok)} tokens but the model's "
                                         f"embedding has {embedding_rows} rows")
    return tok


def max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prepare(opts: SparsifyOptions):
    """All checks that can fail on user input, before any rank starts; returns ``(nm, samples or None)``."""
    nm = check_options(opts)
    if opts.compressed and importlib.util.find_spec("compressed_tensors") is None:
        raise ConfigError("--no-compressed", "the compressed export needs the compressed-tensors package "
                                             "(pip install 'dist_sparse[export]'), or pass --no-compressed")
    model_dir = check_model_dir(opts.model_dir)
    prepare_out_dir(opts.out, model_dir, opts.overwrite)
    meta = meta_model(model_dir)
    prefix, blocks = find_blocks(meta)
    layers = {}
    for i, block in enumerate(blocks):
        layers.update(find_prunable(block, f"{prefix}.{i}", opts.include, opts.exclude))
    if not layers:
        raise ConfigError("--include/--exclude", "the layer selection matches no Linear/Conv1D layer in the blocks")
    if nm is not None:
        for name, module in layers.items():
            check_divisible(in_features(module), nm[1], name)
    tok = load_tokenizer(model_dir, meta.get_input_embeddings().num_embeddings)
    samples = None
    if opts.calib and opts.method != "magnitude":
        limit = max_positions(meta.config)
        if limit is not None and opts.seqlen > limit:
            raise ConfigError("--seqlen", f"{opts.seqlen} exceeds the model's {limit} positions")
        ids = tokenize_text(tok, load_text(opts.calib, "--calib", opts.text_column))
        samples = calibration_samples(ids, opts.samples, opts.seqlen, opts.seed)
    return nm, samples


# ------------------------------------------------------------------------------------------------ ranks


def _device(opts: SparsifyOptions, local_rank: int) -> torch.device:
    if opts.device:
        dev = torch.device(opts.device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
        return dev
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def run_rank(opts: SparsifyOptions, nm, samples, ctx: DistContext, local_rank: int = 0) -> dict:
    """One rank's work: load, prune its share, and (rank 0) save. Returns the report."""
    device = _device(opts, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    t0 = time.perf_counter()
    model = load_model(opts.model_dir)  # stays on CPU; blocks visit the device one at a time
    local = shard(samples, ctx.rank, ctx.world) if samples is not None else None
    settings = PruneSettings(method=opts.method, sparsity=opts.sparsity, nm=nm, include=opts.include,
                             exclude=opts.exclude, batch_size=opts.batch_size, blocksize=opts.blocksize,
                             damp=opts.damp, progress=opts.progress)
    result = prune_model(model, local, settings, ctx, device)
    pruned = sum(int((~m).sum()) for m in result.masks.values())
    total = sum(m.numel() for m in result.masks.values())
    report = {
        "source": str(Path(opts.model_dir).resolve()),
        "options": {k: v for k, v in asdict(opts).items() if k not in ("model_dir", "out", "progress")},
        "world_size": ctx.world,
        "device": str(device),
        "calibration_samples": 0 if samples is None else int(samples.shape[0]),
        "samples_per_rank": [int(shard(samples, r, ctx.world).shape[0]) for r in range(ctx.world)]
        if samples is not None else [],
        "sparsity": pruned / max(total, 1),
        "layer_sparsity": result.layer_sparsity,
        "calibration_seconds": result.seconds["total"],
        "seconds": result.seconds,
        "load_seconds": time.perf_counter() - t0 - result.seconds["total"],
    }
    if ctx.rank == 0:
        tok = load_tokenizer(opts.model_dir)
        save_pruned_checkpoint(model, tok, result.masks, opts.out, source_dir=opts.model_dir, report=report, nm=nm,
                               compressed=opts.compressed, overwrite=opts.overwrite)
    ctx.barrier()
    return report


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(opts: SparsifyOptions) -> str:
    dev = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return "nccl" if str(dev).startswith("cuda") else "gloo"


def _spawned_rank(rank: int, opts: SparsifyOptions, nm, samples, world: int, port: int) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(_backend(opts), init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        run_rank(opts, nm, samples, DistContext(rank, world), local_rank=rank)
    finally:
        dist.destroy_process_group()


def sparsify_checkpoint(opts: SparsifyOptions) -> dict:
    """Run ``dist-sparse sparsify``; returns rank 0's report (also written to ``OUT_DIR/sparsify_report.json``)."""
    t0 = time.perf_counter()
    nm, samples = prepare(opts)
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    if world_env > 1:  # under torchrun / deepspeed: we are one of the ranks
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        owns_group = not dist.is_initialized()
        if owns_group:
            dist.init_process_group(_backend(opts))
        try:
            report = run_rank(opts, nm, samples, DistContext(rank, world_env), local_rank)
        finally:
            if owns_group:
                dist.destroy_process_group()
    elif opts.nproc > 1:
        import torch.multiprocessing as mp

        mp.start_processes(_spawned_rank, args=(opts, nm, samples, opts.nproc, _free_port()), nprocs=opts.nproc,
                           join=True, start_method="spawn")
        report = json.loads((Path(opts.out) / REPORT_FILE).read_text())
    else:
        report = run_rank(opts, nm, samples, DistContext(0, 1))
    report["wall_seconds"] = time.perf_counter() - t0
    return report
