"""Hugging Face side: which parameters are sparsifiable, building causal LMs (sizes, a config file or a checkpoint),
saving checkpoints, the FLOPs estimate.

Default selection (no patterns configured): inside a list of transformer blocks (a name component that is an
integer, e.g. ``transformer.h.3.mlp.c_fc``)

- the 2-D weights of ``nn.Linear`` / GPT-2 ``Conv1D`` modules: every attention and MLP projection of GPT-2,
  Llama, Mistral, Qwen2, GPT-NeoX, OPT, Phi-3 and BERT-family models (fused ones like Phi-3's ``qkv_proj`` too);
  a projection with a single output (Qwen2-MoE's ``shared_expert_gate``: a gate, not a matrix) stays dense;
- 3-D parameters: the experts of mixture-of-experts blocks, which transformers stores fused as one
  ``(experts, out, in)`` tensor per projection (Mixtral's and Qwen2-MoE's ``experts.gate_up_proj`` and
  ``experts.down_proj``). Each expert's matrix is its own layer for distributions and selection
  (:mod:`dist_sparse.integration.experts`). The routers are plain parameters (not ``nn.Linear``) and stay dense.

Embeddings, the LM head, norms and biases stay dense.
"""

import fnmatch
import math
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from dist_sparse.errors import ConfigError, UnsupportedModelError


def _is_projection(module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - very old transformers
        return False
    return isinstance(module, Conv1D)


def stored_transposed(model: nn.Module, names) -> set:
    """Of the parameter ``names``, those stored (in, out): the weights of GPT-2's ``Conv1D`` (``nn.Linear`` stores
    (out, in)). Structured sparsity patterns define their cells on the (out, in) matrix."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - very old transformers
        return set()
    modules = dict(model.named_modules())
    return {n for n in names if n.endswith(".weight") and isinstance(modules.get(n[: -len(".weight")]), Conv1D)}


def _shape(p) -> tuple:
    # ZeRO-3 replaces partitioned tensors by empty ones; ds_shape keeps the real shape
    return tuple(getattr(p, "ds_shape", p.shape))


def _in_block(name: str) -> bool:
    return any(part.isdigit() for part in name.split("."))


def sparsifiable_parameters(model: nn.Module, patterns=None, exclude=()) -> list:
    """Names of the parameters to sparsify, sorted. ``patterns``/``exclude`` are fnmatch globs over names."""
    names = []
    if patterns:
        all_names = [n for n, _ in model.named_parameters()]
        for pat in patterns:
            hits = [n for n in all_names if fnmatch.fnmatchcase(n, pat)]
            if not hits:
                raise ConfigError("sparsity.params", f"pattern {pat!r} matches no parameter of the model")
            names.extend(hits)
        names = sorted(set(names))
    else:
        for mod_name, module in model.named_modules():
            if not _in_block(mod_name):
                continue
            prefix = f"{mod_name}." if mod_name else ""
            if _is_projection(module):
                weight = getattr(module, "weight", None)
                if weight is not None and len(_shape(weight)) == 2 and min(_shape(weight)) > 1:
                    names.append(f"{prefix}weight")
            for pname, p in module.named_parameters(recurse=False):
                if len(_shape(p)) == 3:  # fused experts: (experts, out, in)
                    names.append(prefix + pname)
        names = sorted(set(names))
    names = [n for n in names if not any(fnmatch.fnmatchcase(n, e) for e in exclude)]
    if not names:
        raise UnsupportedModelError(
            f"no sparsifiable parameters found in {type(model).__name__}: no nn.Linear/Conv1D weights or fused "
            "expert tensors inside a list of blocks; set sparsity.params to glob patterns of parameter names")
    return names


def expert_module_classes(model: nn.Module) -> list:
    """Classes of the modules that hold fused expert tensors (3-D parameters) inside blocks. Under ZeRO-3 they are
    registered as leaf modules (``deepspeed.utils.set_z3_leaf_modules``): a rank's tokens reach only some experts,
    and DeepSpeed must fetch the block's parameters as one unit instead of tracing per-expert accesses that differ
    between ranks."""
    classes = []
    for mod_name, module in model.named_modules():
        if _in_block(mod_name) and any(len(_shape(p)) == 3 for p in module.parameters(recurse=False)):
            if type(module) not in classes:
                classes.append(type(module))
    return classes


def load_model_config(path, key: str = "model.config"):
    """A Hugging Face ``config.json`` (or a directory holding one) as a config object of a causal LM; local files
    only. A missing file, unreadable JSON, an unknown ``model_type`` or an architecture without a causal-LM head
    is a ConfigError naming ``key`` and the file."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    p = Path(path)
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        raise ConfigError(key, f"no Hugging Face config found: {file} does not exist"
                          + (" (the directory holds no config.json)" if p.is_dir() else ""))
    try:
        hf_config = AutoConfig.from_pretrained(str(file if not p.is_dir() else p), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(key, f"cannot read {file} as a Hugging Face config: {exc}") from exc
    if type(hf_config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ConfigError(key, f"{file}: model_type {hf_config.model_type!r} has no causal LM class "
                               "(AutoModelForCausalLM cannot build it)")
    return hf_config


def build_causal_lm(model_cfg, vocab_size: int, attention_cfg=None):
    """A causal LM built from ``model`` config sizes, from a Hugging Face config file (``model.config``, random
    init) or loaded from ``model.pretrained``; never downloads."""
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig

    attn_kwargs = {}
    if model_cfg.pretrained:
        hf_config = AutoConfig.from_pretrained(model_cfg.pretrained, local_files_only=True)
    elif model_cfg.config:
        hf_config = load_model_config(model_cfg.config)
    elif model_cfg.type == "gpt2":
        hf_config = GPT2Config(vocab_size=vocab_size, n_positions=model_cfg.block_size, n_embd=model_cfg.n_embd,
                               n_layer=model_cfg.n_layer, n_head=model_cfg.n_head, resid_pdrop=model_cfg.dropout,
                               embd_pdrop=model_cfg.dropout, attn_pdrop=model_cfg.dropout,
                               bos_token_id=0, eos_token_id=0, **model_cfg.extra)
    else:
        hf_config = LlamaConfig(vocab_size=vocab_size, hidden_size=model_cfg.n_embd,
                                intermediate_size=model_cfg.intermediate_size or 4 * model_cfg.n_embd,
                                num_hidden_layers=model_cfg.n_layer, num_attention_heads=model_cfg.n_head,
                                num_key_value_heads=model_cfg.n_kv_head or model_cfg.n_head,
                                max_position_embeddings=model_cfg.block_size, attention_dropout=model_cfg.dropout,
                                bos_token_id=0, eos_token_id=0, tie_word_embeddings=True, **model_cfg.extra)
    if attention_cfg is not None:
        from dist_sparse.attention import hf as attention_hf

        attn_kwargs["attn_implementation"] = attention_hf.prepare(hf_config, attention_cfg)
    if model_cfg.pretrained:
        model = AutoModelForCausalLM.from_pretrained(model_cfg.pretrained, config=hf_config, local_files_only=True,
                                                     **attn_kwargs)
        if model.get_input_embeddings().weight.shape[0] < vocab_size:
            raise ConfigError("model.pretrained", f"the checkpoint's vocabulary "
                              f"({model.get_input_embeddings().weight.shape[0]}) is smaller than the data's "
                              f"tokenizer ({vocab_size})")
        return model
    model = AutoModelForCausalLM.from_config(hf_config, **attn_kwargs)
    rows = model.get_input_embeddings().weight.shape[0]
    if model_cfg.config and rows < vocab_size:
        raise ConfigError("model.config", f"the vocabulary of {model_cfg.config} ({rows}) is smaller than the "
                                          f"data's tokenizer ({vocab_size})")
    return model


def save_pretrained_atomic(model, out_dir, state_dict=None, writers=()) -> Path:
    """``save_pretrained`` (safetensors) into a temporary directory, run ``writers`` (callables taking that
    directory, e.g. to add a tokenizer or masks), then rename it into place."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    for writer in writers:
        writer(tmp)
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + f".old{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)
    return out_dir


def count_parameters(model: nn.Module) -> int:
    return sum(math.prod(_shape(p)) for p in model.parameters())


def _active_expert_fraction(model: nn.Module) -> float:
    """The fraction of experts each token runs through (top-k of n), 1 for dense models."""
    cfg = getattr(model, "config", None)
    k = getattr(cfg, "num_experts_per_tok", None)
    n = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    return k / n if isinstance(k, int) and isinstance(n, int) and n > 0 else 1.0


def training_flops_per_token(model: nn.Module, densities: dict, seq_len: int, n_layer: int, n_embd: int) -> float:
    """Estimated training FLOPs per token (forward + backward = 3x forward, 2 FLOPs per multiply-add).

    Every 2-D weight that is a product (not an embedding lookup) counts at its density (``densities``: name ->
    density; absent = dense), fused expert tensors (3-D) at their density times the fraction of experts a token
    is routed to (top-k of n), a tied LM head counts once as a product, and the attention score/value products
    (``4 * seq_len * n_embd`` forward FLOPs per layer and token) stay dense. Shapes are the real ones under
    ZeRO-3 too (``ds_shape``).
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    experts = _active_expert_fraction(model)
    matmul = 0.0
    for name, p in model.named_parameters():
        shape = _shape(p)
        if len(shape) == 2 and id(p) not in embeddings:
            matmul += math.prod(shape) * densities.get(name, 1.0)
        elif len(shape) == 3:
            matmul += math.prod(shape) * densities.get(name, 1.0) * experts
    head = model.get_output_embeddings()
    if head is not None and id(head.weight) in embeddings:
        matmul += math.prod(_shape(head.weight))
    attention = 4.0 * seq_len * n_embd * n_layer
    return 3.0 * (2.0 * matmul + attention)


def to_cpu_state_dict(state_dict: dict) -> dict:
    return {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
