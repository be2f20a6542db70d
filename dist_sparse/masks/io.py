"""Mask files: ``sparsity_masks.safetensors``, one bit-packed uint8 tensor per parameter name.

Format (``dist_sparse.masks.v1``): tensor key = the parameter's name in ``model.named_parameters()``, value = the
flat mask packed with :func:`pack_bits`; the safetensors metadata holds ``format`` and ``shapes`` (JSON: name ->
shape). `dist-sparse sparsify` writes it next to a Hugging Face checkpoint and `dist-sparse train` starts from it
(``sparsity.init_masks``). Written atomically (temporary file + rename), read without pickle.
"""

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dist_sparse.errors import CheckpointError
from dist_sparse.masks.packing import pack_bits, unpack_bits

MASK_FILE = "sparsity_masks.safetensors"
FORMAT = "dist_sparse.masks.v1"


def save_masks(path, masks: dict) -> Path:
    """Write ``{name: bool tensor}`` to ``path`` (a file, or a directory that gets ``MASK_FILE``), atomically."""
    path = Path(path)
    if path.is_dir():
        path = path / MASK_FILE
    tensors, shapes = {}, {}
    for name, mask in masks.items():
        mask = mask.detach().to("cpu")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask {name!r} must be torch.bool, got {mask.dtype}")
        tensors[name] = pack_bits(mask).contiguous()
        shapes[name] = list(mask.shape)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "shapes": json.dumps(shapes)})
    os.replace(tmp, path)
    return path


def load_masks(path) -> dict:
    """Read a mask file written by :func:`save_masks`; returns ``{name: bool tensor of the original shape}``."""
    path = Path(path)
    if path.is_dir():
        path = path / MASK_FILE
    if not path.is_file():
        raise CheckpointError(path, "mask file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CheckpointError(path, f"not a dist_sparse mask file (format {meta.get('format')!r})")
            shapes = json.loads(meta["shapes"])
            out = {}
            for name in f.keys():
                shape = shapes[name]
                out[name] = unpack_bits(f.get_tensor(name), math.prod(shape)).reshape(shape)
            return out
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises several types for truncated/corrupt files
        raise CheckpointError(path, f"cannot read mask file: {exc}") from exc
