"""Write a pruned model: Hugging Face checkpoint + masks + compressed-tensors export, atomically.

``OUT_DIR`` layout::

    config.json, generation_config.json, model.safetensors   # save_pretrained (from_pretrained loads it)
    tokenizer.json, tokenizer_config.json, ...               # the source checkpoint's tokenizer
    sparsity_masks.safetensors                               # keep-masks for `dist-sparse train` (sparsity.init_masks)
    sparsify_report.json                                     # method, options, per-layer sparsity, timings
    compressed/config.json, compressed/model.safetensors     # compressed-tensors sparse export

Compressed export: pruned weights use the compressed-tensors ``sparse-bitmask`` layout (``<module>.shape``,
``.compressed`` = kept values row by row, ``.bitmask`` = keep-mask bit-packed little-endian along rows with
``compressed_tensors.utils.pack_bitmasks``, ``.row_offsets``) or, for 2:4, ``sparse-24-bitmask`` (``.shape``
``[2, 1]``, ``.compressed`` ``[rows, cols/2]``, ``.bitmask``). Every other tensor is stored dense under its own
name. Weights are stored in ``nn.Linear`` layout ``[out, in]``: GPT-2 ``Conv1D`` weights are transposed and listed
under ``dist_sparse_export.transposed`` in ``compressed/config.json``. ``quantization_config.sparsity_config`` is
the library's ``BitmaskConfig`` / ``Sparse24BitMaskConfig``. compressed-tensors >= 0.15 no longer ships the sparse
(de)compressor classes, only these configs and the bit (un)packing helpers; :func:`load_compressed` decompresses
with ``compressed_tensors.utils.unpack_bitmasks`` exactly as the library's legacy ``BitmaskCompressor`` did.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dist_sparse.errors import CheckpointError, ConfigError
from dist_sparse.masks.io import save_masks
from dist_sparse.oneshot.layers import is_conv1d

COMPRESSED_DIR = "compressed"
REPORT_FILE = "sparsify_report.json"
EXPORT_FORMAT = "dist_sparse.compressed.v1"


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _dedupe(state_dict: dict) -> tuple[dict, dict]:
    """Drop tied duplicates (same storage, shape and offset); returns ``(tensors, {duplicate: kept name})``."""
    seen, out, tied = {}, {}, {}
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        out[name] = tensor
    return out, tied


def compress_state_dict(state_dict: dict, masks: dict, transposed: set, two_four: bool) -> dict:
    """compressed-tensors tensors for ``state_dict``; ``masks`` (parameter layout) select the compressed weights."""
    from compressed_tensors.utils import pack_bitmasks

    out = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        if name not in masks:
            out[name] = tensor.contiguous()
            continue
        mask = masks[name].to(torch.bool).cpu()
        if name in transposed:
            tensor, mask = tensor.t(), mask.t()
        tensor, mask = tensor.contiguous(), mask.contiguous()
        prefix = name[: -len(".weight")] if name.endswith(".weight") else name
        values = tensor[mask]
        rows, cols = tensor.shape
        if two_four:
            out[f"{prefix}.shape"] = torch.tensor([rows, cols], dtype=torch.int64).reshape(-1, 1)
            out[f"{prefix}.compressed"] = values.reshape(rows, cols // 2).contiguous()
        else:
            counts = mask.sum(dim=1)
            out[f"{prefix}.shape"] = torch.tensor([rows, cols], dtype=torch.int64)
            out[f"{prefix}.compressed"] = values.contiguous()
            out[f"{prefix}.row_offsets"] = (torch.cumsum(counts, 0) - counts).to(torch.int64)
        out[f"{prefix}.bitmask"] = pack_bitmasks(mask).contiguous()
    return out


def save_compressed(model, masks: dict, out_dir: Path, nm: tuple[int, int] | None) -> Path:
    """Write ``out_dir/compressed`` (config.json + model.safetensors) for the pruned ``model``."""
    try:
        import compressed_tensors
        from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig
    except ImportError:
        raise ConfigError("--no-compressed", "the compressed export needs the compressed-tensors package "
                                             "(pip install 'dist_sparse[export]'), or pass --no-compressed") from None

    target = Path(out_dir) / COMPRESSED_DIR
    target.mkdir(parents=True, exist_ok=True)
    modules = dict(model.named_modules())
    transposed = {n for n in masks if is_conv1d(modules.get(n.rsplit(".", 1)[0]))}
    state, tied = _dedupe(model.state_dict())
    two_four = nm == (2, 4)  # N:M groups run along the input dim, i.e. along the rows of the [out, in] layout
    tensors = compress_state_dict(state, masks, transposed, two_four)
    zeros = sum(int((~masks[n]).sum()) for n in masks)
    total = sum(masks[n].numel() for n in masks)
    structure = f"{nm[0]}:{nm[1]}" if nm else "unstructured"
    config_cls = Sparse24BitMaskConfig if two_four else BitmaskConfig
    sparsity_config = config_cls(global_sparsity=zeros / max(total, 1), sparsity_structure=structure,
                                 targets=sorted(n[: -len(".weight")] for n in masks), ignore=[]).model_dump()
    config = model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": sparsity_config["format"],
        "version": compressed_tensors.__version__,
        "sparsity_config": sparsity_config,
    }
    config["dist_sparse_export"] = {"format": EXPORT_FORMAT, "transposed": sorted(transposed), "tied": tied}
    weights = target / "model.safetensors"
    tmp = weights.with_name(weights.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, weights)
    _write_json(target / "config.json", config)
    return target


def load_compressed(path) -> dict:
    """Decompress a ``compressed/`` export back to the model's state dict (original names and layouts, tied
    duplicates restored), using compressed-tensors' ``unpack_bitmasks``."""
    from compressed_tensors.utils import unpack_bitmasks

    path = Path(path)
    if (path / COMPRESSED_DIR).is_dir():
        path = path / COMPRESSED_DIR
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise CheckpointError(path, "not a compressed export (config.json / model.safetensors missing)")
    config = json.loads(cfg_file.read_text())
    qcfg = config.get("quantization_config", {})
    sparsity = qcfg.get("sparsity_config") or {}
    extra = config.get("dist_sparse_export", {})
    if extra.get("format") != EXPORT_FORMAT:
        raise CheckpointError(path, f"unknown export format {extra.get('format')!r}")
    targets = set(sparsity.get("targets") or [])
    transposed = set(extra.get("transposed", []))
    out = {}
    with safe_open(str(weights), framework="pt") as f:
        keys = set(f.keys())
        if not keys:
            raise CheckpointError(path, "compressed export holds no tensors")
        for prefix in targets:
            shape = f.get_tensor(f"{prefix}.shape").flatten().tolist()
            values = f.get_tensor(f"{prefix}.compressed").flatten()
            mask = unpack_bitmasks(f.get_tensor(f"{prefix}.bitmask"), shape)
            dense = torch.zeros(shape, dtype=values.dtype)
            dense[mask] = values
            name = f"{prefix}.weight"
            out[name] = dense.t().contiguous() if name in transposed else dense
            keys -= {f"{prefix}.{s}" for s in ("shape", "compressed", "bitmask", "row_offsets")}
        for key in keys:
            out[key] = f.get_tensor(key)
    for dup, name in extra.get("tied", {}).items():
        out[dup] = out[name]
    return out


def _copy_tokenizer(tokenizer, source_dir: Path, target: Path) -> None:
    tokenizer.save_pretrained(str(target))
    for extra in ("tokenizer.model", "special_tokens_map.json", "added_tokens.json"):
        src = Path(source_dir) / extra
        if src.is_file() and not (target / extra).exists():
            shutil.copy2(src, target / extra)


def prepare_out_dir(out_dir, model_dir=None, overwrite: bool = False) -> Path:
    """Check ``--out``: not the source checkpoint, and empty or absent unless ``overwrite``."""
    out = Path(out_dir)
    if model_dir is not None and out.resolve() == Path(model_dir).resolve():
        raise ConfigError("--out", "must differ from MODEL_DIR (the source checkpoint is never overwritten)")
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError("--out", f"{out} exists and is not empty (pass --overwrite to replace it)")
    return out


def save_pruned_checkpoint(model, tokenizer, masks: dict, out_dir, *, source_dir, report: dict,
                           nm: tuple[int, int] | None = None, compressed: bool = True,
                           overwrite: bool = False) -> Path:
    """Write everything into a temporary sibling of ``out_dir`` and rename it into place."""
    out = prepare_out_dir(out_dir, source_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        model.save_pretrained(str(tmp))
        _copy_tokenizer(tokenizer, Path(source_dir), tmp)
        save_masks(tmp, masks)
        if compressed:
            save_compressed(model, masks, tmp, nm)
        _write_json(tmp / REPORT_FILE, report)
        if out.exists():
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
