"""Hugging Face transformers integration: ``attn_implementation="block_sparse"``.

``register()`` adds "block_sparse" to transformers' ``AttentionInterface`` (the attention function) and
``AttentionMaskInterface`` (the mask builder: transformers only hands a padding/causal mask to implementations that
have one registered; we reuse SDPA's, which returns ``None`` when the mask is plain causal or absent, and a 4-D bool
mask otherwise).

``prepare(model_config, attention_cfg)`` registers, stores the layout settings on the model config as the
``dist_sparse_attention`` attribute (saved in ``config.json``, so ``from_pretrained`` of a saved model keeps them) and
returns the string to pass as ``attn_implementation``::

    attn_impl = dist_sparse.attention.hf.prepare(hf_config, cfg.attention)
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn_impl)

Works for any model whose attention goes through ``ALL_ATTENTION_FUNCTIONS`` (GPT-2, the Llama family, BERT-family
encoders, ...). Decoding with a KV cache (fewer queries than keys) uses a dense path restricted to the same layout:
one query row costs O(seq) either way.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache

import torch

from dist_sparse.kernels.block_sparse_attn import expand_layout_to_tokens, masked_attention

from .config import AttentionConfig
from .dispatch import block_sparse_attention
from .layouts import build_layout

__all__ = ["IMPLEMENTATION_NAME", "SETTINGS_ATTR", "block_sparse_attention_forward", "prepare", "register",
           "settings_for"]

IMPLEMENTATION_NAME = "block_sparse"
SETTINGS_ATTR = "dist_sparse_attention"
logger = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def register() -> None:
    """Register "block_sparse" with transformers (idempotent; safe to call from every process)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if AttentionInterface._global_mapping.get(IMPLEMENTATION_NAME) is not block_sparse_attention_forward:
        AttentionInterface.register(IMPLEMENTATION_NAME, block_sparse_attention_forward)
    if AttentionMaskInterface._global_mapping.get(IMPLEMENTATION_NAME) is not sdpa_mask:
        AttentionMaskInterface.register(IMPLEMENTATION_NAME, sdpa_mask)


def prepare(model_config, attention_cfg: AttentionConfig | dict | None) -> str:
    """Get ``model_config`` ready for ``attention_cfg`` and return the ``attn_implementation`` string to load with.

    For "sdpa" and "eager" this only returns the name. For "block_sparse" it registers the implementation and stores
    the settings on ``model_config`` (and on its sub-configs that have attention, e.g. ``text_config``).
    """
    if not isinstance(attention_cfg, AttentionConfig):
        attention_cfg = AttentionConfig.from_dict(attention_cfg or {})
    if attention_cfg.implementation != IMPLEMENTATION_NAME:
        return attention_cfg.implementation
    register()
    settings = attention_cfg.to_dict()
    setattr(model_config, SETTINGS_ATTR, settings)
    for name in getattr(model_config, "sub_configs", {}) or {}:
        sub = getattr(model_config, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            setattr(sub, SETTINGS_ATTR, settings)
    return IMPLEMENTATION_NAME


def settings_for(model_config) -> AttentionConfig:
    """The block-sparse settings stored on a model config, or the defaults (``DEFAULT_LAYOUT``) if there are none."""
    raw = getattr(model_config, SETTINGS_ATTR, None) if model_config is not None else None
    return _parse_settings(json.dumps(raw, sort_keys=True) if raw else "")


@lru_cache(maxsize=64)
def _parse_settings(raw_json: str) -> AttentionConfig:
    raw = json.loads(raw_json) if raw_json else {}
    cfg = AttentionConfig.from_dict({**raw, "implementation": IMPLEMENTATION_NAME}, path=f"config.{SETTINGS_ATTR}")
    return cfg


@lru_cache(maxsize=64)
def _cached_layout(layout_json: str, seed: int, num_blocks: int, num_heads: int, causal: bool) -> torch.Tensor:
    return build_layout(json.loads(layout_json), num_blocks, num_heads=num_heads, causal=causal, seed=seed)


def _layout(cfg: AttentionConfig, num_blocks: int, num_heads: int, causal: bool, device) -> torch.Tensor:
    layout = _cached_layout(json.dumps(cfg.layout, sort_keys=True), cfg.seed, num_blocks, num_heads, causal)
    return layout.to(device)


def _bool_mask(attention_mask: torch.Tensor | None, kv_len: int) -> torch.Tensor | None:
    """The 4-D mask transformers passes, as bool "may attend" (None when it allows everything)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 4:
        raise ValueError(f"block_sparse attention expects a 4-D attention mask, got {tuple(attention_mask.shape)}")
    mask = attention_mask[..., :kv_len]
    if mask.dtype != torch.bool:
        # Additive masks (eager style): 0 = attend, a very negative value = masked. A bias (ALiBi, relative
        # positions) cannot be expressed as a block-sparse mask, so refuse it rather than silently drop it.
        very_negative = mask <= torch.finfo(mask.dtype).min / 2
        if not bool(((mask == 0) | very_negative).all()):
            raise ValueError("block_sparse attention supports boolean or 0/-inf additive masks, not attention biases")
        mask = ~very_negative
    return None if bool(mask.all()) else mask


def block_sparse_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: (batch, heads, seq, dim) in, (batch, seq, heads, dim) out, no weights."""
    if kwargs.get("output_attentions"):
        _warn_once("weights", "block_sparse attention does not return attention weights (output_attentions ignored)")
    if dropout and module.training:
        _warn_once("dropout", f"block_sparse attention has no attention dropout; dropout={dropout} is ignored")
    cfg = settings_for(getattr(module, "config", None))
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    q_len, kv_len = query.shape[2], key.shape[2]
    mask = _bool_mask(attention_mask, kv_len)
    num_blocks = -(-kv_len // cfg.block_size)
    layout = _layout(cfg, num_blocks, query.shape[1], causal, query.device)

    if q_len == kv_len:
        out = block_sparse_attention(query, key, value, layout, cfg.block_size, causal=causal, scale=scaling,
                                     attn_mask=mask, implementation=cfg.kernel,
                                     keep_probabilities=cfg.keep_probabilities)
    else:
        # Cached decoding: the queries are the last q_len positions. Same allowed set, computed densely.
        q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)
        allowed = expand_layout_to_tokens(layout, cfg.block_size, kv_len)[:, q_pos].unsqueeze(0)
        if causal:
            allowed = allowed & (torch.arange(kv_len, device=query.device) <= q_pos[:, None])
        if mask is not None:
            allowed = allowed & mask
        out = masked_attention(query, key, value, allowed, scaling)
    return out.transpose(1, 2).contiguous(), None
