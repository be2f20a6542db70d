"""Calibration data and the sequential, data-parallel pruning loop.

Sequential: the calibration tokens are embedded once, then the transformer blocks are visited in order. For each
block the inputs of its prunable layers are reduced to per-layer statistics (Wanda column norms or SparseGPT
Hessian sums, in float64), the layers are pruned, and the calibration activations are pushed through the *pruned*
block to become the next block's inputs. Only one block (on the compute device) and the activations of the local
calibration samples are alive at a time.

Data-parallel: every rank holds a contiguous shard of the calibration samples. Statistics are raw float64 sums and
token counts, summed with ``all_reduce``, so N ranks see the same statistics as one rank up to float64 rounding of
the summation order. The layers of a block are then solved round-robin across ranks (each layer on one owner) and
the pruned weight and mask are broadcast from the owner, so every rank continues with identical weights.
"""

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dist_sparse.errors import ConfigError
from dist_sparse.oneshot.layers import (
    find_blocks,
    find_prunable,
    in_features,
    linear_weight,
    set_linear_weight,
    to_param_layout,
)
from dist_sparse.oneshot.magnitude import magnitude_mask
from dist_sparse.oneshot.nm import check_divisible
from dist_sparse.oneshot.sparsegpt import HessianStats, sparsegpt_prune
from dist_sparse.oneshot.wanda import WandaStats, wanda_mask

# ------------------------------------------------------------------------------------------------ data


def load_text(path, key: str = "--calib", text_column: str | None = None) -> str:
    """Text of a plain text file, or of a ``datasets`` directory saved with ``save_to_disk`` (``train`` split if it
    is a DatasetDict; ``text_column`` or the first string column; rows joined with blank lines)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(key, f"{path}: no such file or directory")
    if p.is_file():
        try:
            return p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(key, f"{path}: not UTF-8 text ({exc})") from None
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise ConfigError(key, f"{path}: a directory needs the `datasets` package") from None
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as exc:
        raise ConfigError(key, f"{path}: not a text file nor a dataset saved with save_to_disk ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    column = text_column
    if column is None:
        strings = [name for name, feat in ds.features.items()
                   if getattr(feat, "dtype", None) in ("string", "large_string")]
        if not strings:
            raise ConfigError(key, f"{path}: dataset has no text column (columns: {list(ds.features)})")
        column = "text" if "text" in strings else strings[0]
    if column not in ds.column_names:
        raise ConfigError(key, f"{path}: dataset has no column {column!r} (columns: {ds.column_names})")
    return "\n\n".join(t for t in ds[column] if t)


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D int64 tensor (no special tokens; long texts are fine)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_samples(ids: torch.Tensor, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``[n, seqlen]`` windows at random offsets of ``ids`` (as in the SparseGPT and Wanda calibration sets)."""
    if ids.numel() < seqlen:
        raise ConfigError("--seqlen", f"calibration text has {ids.numel()} tokens, fewer than --seqlen {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (n,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def shard(samples: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Contiguous shard of the samples for ``rank`` (sizes differ by at most one)."""
    n = samples.shape[0]
    return samples[rank * n // world:(rank + 1) * n // world]


# ------------------------------------------------------------------------------------------------ ranks


@dataclass
class DistContext:
    """Rank, world size and the collectives used by the pruning loop (no-ops for one rank)."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1 and dist.is_available() and dist.is_initialized()

    def all_reduce_(self, tensors) -> None:
        if self.active:
            for t in tensors:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def broadcast_(self, tensor: torch.Tensor, src: int) -> None:
        if self.active:
            dist.broadcast(tensor, src=src)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


# ------------------------------------------------------------------------------------------------ pruning


class _StopForward(Exception):
    pass


class _Placeholder(nn.Module):
    """Stands in for a block while the rest of the model is moved to the compute device."""

    def forward(self, *args, **kwargs):  # pragma: no cover - the capture hook stops before this runs
        raise _StopForward


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, samples: torch.Tensor, batch_size: int,
                         device: torch.device) -> list:
    """Run the model up to its first block for every micro-batch of ``samples``; returns a list of
    ``[hidden_states, extra positional args, kwargs]`` (the block call as the model makes it)."""
    store = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        store.append([hidden.detach(), tuple(args[1:]), kwargs])
        raise _StopForward

    saved = list(blocks)
    on_cpu = device.type == "cpu"
    if not on_cpu:  # only the embeddings etc. go to the device, never all blocks at once
        for i in range(len(blocks)):
            blocks[i] = _Placeholder()
        model.to(device)
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, samples.shape[0], batch_size):
            try:
                model(input_ids=samples[i:i + batch_size].to(device))
            except _StopForward:
                pass
    finally:
        handle.remove()
        if not on_cpu:
            model.to("cpu")
            for i, block in enumerate(saved):
                blocks[i] = block
    return store


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class PruneSettings:
    method: str                      # magnitude | wanda | sparsegpt
    sparsity: float | None = None    # unstructured target, in [0, 1)
    nm: tuple[int, int] | None = None
    include: str | None = None
    exclude: str | None = None
    batch_size: int = 8
    blocksize: int = 128
    damp: float = 0.01
    progress: bool = True


@dataclass
class PruneResult:
    masks: dict = field(default_factory=dict)          # parameter name -> bool mask (parameter layout)
    layer_sparsity: dict = field(default_factory=dict)  # parameter name -> fraction pruned
    seconds: dict = field(default_factory=dict)


def _solve(method, module, name, stats, settings: PruneSettings, device):
    W = linear_weight(module).detach().to(device)
    if method == "magnitude":
        mask = magnitude_mask(W, settings.sparsity, settings.nm)
        return W * mask, mask
    if method == "wanda":
        mask = wanda_mask(W, stats.column_norms(), settings.sparsity, settings.nm)
        return W * mask, mask
    solve_dtype = torch.float64 if W.device.type == "cpu" else torch.float32
    return sparsegpt_prune(W, stats.hessian(), settings.sparsity, settings.nm, blocksize=settings.blocksize,
                           damp=settings.damp, dtype=solve_dtype, layer=name)


@torch.no_grad()
def prune_model(model: nn.Module, samples: torch.Tensor | None, settings: PruneSettings,
                ctx: DistContext | None = None, device=None) -> PruneResult:
    """Prune ``model`` in place, block by block; ``samples`` ``[n_local, seqlen]`` are this rank's calibration
    windows (unused by magnitude). Returns the keep-masks keyed by parameter name."""
    ctx = ctx or DistContext()
    device = torch.device(device or "cpu")
    method = settings.method
    if method not in ("magnitude", "wanda", "sparsegpt"):
        raise ConfigError("--method", f"unknown method {method!r}")
    model.eval()
    prefix, blocks = find_blocks(model)
    plan = [find_prunable(block, f"{prefix}.{i}", settings.include, settings.exclude)
            for i, block in enumerate(blocks)]
    if not any(plan):
        raise ConfigError("--include/--exclude", "the layer selection matches no Linear/Conv1D layer in the blocks")
    if settings.nm is not None:
        for layers in plan:
            for name, module in layers.items():
                check_divisible(in_features(module), settings.nm[1], name)

    result = PruneResult()
    t0 = time.perf_counter()
    use_data = method != "magnitude"
    if use_data and samples is None:
        raise ConfigError("--calib", f"--method {method} needs calibration samples")
    inputs = []
    if use_data:
        use_cache = getattr(model.config, "use_cache", None)
        if use_cache is not None:
            model.config.use_cache = False
        try:
            inputs = capture_block_inputs(model, blocks, samples, settings.batch_size, device)
        finally:
            if use_cache is not None:
                model.config.use_cache = use_cache
    result.seconds["capture"] = time.perf_counter() - t0
    stat_time = solve_time = comm_time = 0.0

    show = settings.progress and ctx.rank == 0
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(len(p) for p in plan), desc=f"{method} sparsify", unit="layer", disable=not show)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        bar = None
    owner_counter = 0
    for i, block in enumerate(blocks):
        layers = plan[i]
        if not layers and not use_data:
            continue
        if device.type != "cpu":
            block.to(device)
        stats = {}
        if use_data and layers:
            ts = time.perf_counter()
            hooks = []
            for name, module in layers.items():
                cls = HessianStats if method == "sparsegpt" else WandaStats
                stats[name] = cls(in_features(module), device=device)
                hooks.append(module.register_forward_hook(
                    lambda m, inp, out, s=stats[name]: s.add(inp[0].detach())))
            try:
                for hidden, args, kwargs in inputs:
                    block(hidden, *args, **kwargs)
            finally:
                for h in hooks:
                    h.remove()
            stat_time += time.perf_counter() - ts
            tc = time.perf_counter()
            ctx.all_reduce_([t for s in stats.values() for t in s.tensors()])
            comm_time += time.perf_counter() - tc
        for name, module in layers.items():
            owner = owner_counter % ctx.world
            owner_counter += 1
            W_param = linear_weight(module)
            if ctx.rank == owner:
                tv = time.perf_counter()
                new_w, mask = _solve(method, module, name, stats.get(name), settings, device)
                solve_time += time.perf_counter() - tv
                new_w = new_w.to(W_param.dtype).contiguous()
                mask_u8 = mask.to(torch.uint8).contiguous()
            else:
                new_w = torch.empty(W_param.shape, dtype=W_param.dtype, device=device)
                mask_u8 = torch.empty(W_param.shape, dtype=torch.uint8, device=device)
            tc = time.perf_counter()
            ctx.broadcast_(new_w, owner)
            ctx.broadcast_(mask_u8, owner)
            comm_time += time.perf_counter() - tc
            mask = mask_u8.bool()
            set_linear_weight(module, new_w * mask)
            pname = f"{name}.weight"
            result.masks[pname] = to_param_layout(module, mask).cpu()
            result.layer_sparsity[pname] = 1.0 - mask.float().mean().item()
            stats.pop(name, None)
            if bar is not None:
                bar.update(1)
        if use_data and i + 1 < len(blocks):
            ts = time.perf_counter()
            for item in inputs:
                hidden, args, kwargs = item
                item[0] = _block_output(block(hidden, *args, **kwargs))
            stat_time += time.perf_counter() - ts
        if device.type != "cpu":
            block.to("cpu")
    if bar is not None:
        bar.close()
    result.seconds.update(statistics=stat_time, solve=solve_time, communication=comm_time,
                          total=time.perf_counter() - t0)
    return result
