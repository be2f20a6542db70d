"""Find the transformer blocks of a model and the prunable layers inside them.

Supported: any model whose blocks are a ``nn.ModuleList`` of modules holding ``nn.Linear`` or GPT-2 ``Conv1D``
layers: GPT-2 (``transformer.h``), Llama/Mistral/Qwen (``model.layers``), BERT/RoBERTa (``encoder.layer``),
OPT (``decoder.layers``), GPT-NeoX (``gpt_neox.layers``) and, failing those known paths, the largest such list.
Everything outside the blocks (embeddings, LM head, classifier) is left dense.
"""

import re

import torch
from torch import nn

from dist_sparse.errors import ConfigError, UnsupportedModelError

# attribute paths of the block list, tried in order
KNOWN_BLOCK_PATHS = (
    "transformer.h",            # GPT-2, GPT-J
    "model.layers",             # Llama, Mistral, Qwen, Gemma
    "model.decoder.layers",     # OPT
    "gpt_neox.layers",          # GPT-NeoX, Pythia
    "bert.encoder.layer",       # BERT heads
    "roberta.encoder.layer",    # RoBERTa heads
    "encoder.layer",            # BertModel, RobertaModel
    "layers",                   # bare decoder models (LlamaModel)
    "h",                        # GPT2Model
)


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_prunable(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def is_conv1d(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def _get(model: nn.Module, path: str):
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _has_prunable(module: nn.Module) -> bool:
    return any(is_prunable(m) for m in module.modules())


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(prefix, blocks)``: the dotted path of the block list and the list itself.

    Raises :class:`UnsupportedModelError` when the model has no list of blocks holding Linear/Conv1D layers.
    """
    for path in KNOWN_BLOCK_PATHS:
        obj = _get(model, path)
        if isinstance(obj, nn.ModuleList) and len(obj) and all(_has_prunable(b) for b in obj):
            return path, obj
    best, best_size = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(_has_prunable(b) for b in module):
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = (name, module), size
    if best is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no list of transformer blocks with nn.Linear / Conv1D layers found; "
            "dist-sparse sparsify supports GPT-2, Llama-family, BERT-family and other models whose blocks are a "
            "ModuleList of Linear/Conv1D layers")
    return best


def find_prunable(block: nn.Module, block_name: str = "", include: str | None = None,
                  exclude: str | None = None) -> dict[str, nn.Module]:
    """``{full module name: module}`` of the Linear/Conv1D layers of ``block`` selected by the regexes.

    ``include`` / ``exclude`` are matched with ``re.search`` against the full module name (``transformer.h.0.attn.
    c_attn``); by default every Linear/Conv1D in the block is pruned.
    """
    try:
        inc = re.compile(include) if include else None
        exc = re.compile(exclude) if exclude else None
    except re.error as err:
        raise ConfigError("--include/--exclude", f"bad regular expression: {err}") from None
    out = {}
    for name, module in block.named_modules():
        if not is_prunable(module):
            continue
        full = f"{block_name}.{name}" if block_name else name
        if inc is not None and not inc.search(full):
            continue
        if exc is not None and exc.search(full):
            continue
        out[full] = module
    return out


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The layer weight in ``nn.Linear`` layout ``[out, in]`` (a transposed view for GPT-2 ``Conv1D``)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def set_linear_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write ``weight`` given in ``[out, in]`` layout back into ``module`` in place."""
    with torch.no_grad():
        target = module.weight
        src = weight.t() if is_conv1d(module) else weight
        target.copy_(src.to(target.dtype))


def to_param_layout(module: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """A ``[out, in]`` mask in the parameter's own layout (transposed for ``Conv1D``), contiguous."""
    return (mask.t() if is_conv1d(module) else mask).contiguous()


def in_features(module: nn.Module) -> int:
    return int(linear_weight(module).shape[1])
