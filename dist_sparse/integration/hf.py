"""Hugging Face side: which parameters are sparsifiable, building small causal LMs from sizes, saving checkpoints.

Default selection (no patterns configured): the 2-D weights of ``nn.Linear`` / GPT-2 ``Conv1D`` modules that sit
inside a list of transformer blocks (a name component that is an integer, e.g. ``transformer.h.3.mlp.c_fc``).
That is every attention and MLP projection of GPT-2, Llama-family and BERT-family models; embeddings, the LM head,
norms and biases stay dense.
"""

import fnmatch
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
            if not _is_projection(module):
                continue
            in_block = any(part.isdigit() for part in mod_name.split("."))
            weight = getattr(module, "weight", None)
            # ZeRO-3 replaces partitioned tensors by empty ones; ds_shape keeps the real shape
            if in_block and weight is not None and len(getattr(weight, "ds_shape", weight.shape)) == 2:
                names.append(f"{mod_name}.weight" if mod_name else "weight")
        names = sorted(names)
    names = [n for n in names if not any(fnmatch.fnmatchcase(n, e) for e in exclude)]
    if not names:
        raise UnsupportedModelError(
            f"no sparsifiable parameters found in {type(model).__name__}: no nn.Linear/Conv1D weights inside a "
            "list of blocks; set sparsity.params to glob patterns of parameter names")
    return names


def build_causal_lm(model_cfg, vocab_size: int, attention_cfg=None):
    """A causal LM built from ``model`` config sizes (or loaded from ``model.pretrained``; never downloads)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig

    attn_kwargs = {}
    if model_cfg.pretrained:
        hf_config = AutoConfig.from_pretrained(model_cfg.pretrained, local_files_only=True)
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
    return AutoModelForCausalLM.from_config(hf_config, **attn_kwargs)


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
    return sum(p.numel() for p in model.parameters())


def training_flops_per_token(model: nn.Module, densities: dict, seq_len: int, n_layer: int, n_embd: int) -> float:
    """Estimated training FLOPs per token (forward + backward = 3x forward, 2 FLOPs per multiply-add).

    Every 2-D weight that is a product (not an embedding lookup) counts at its density (``densities``: name ->
    density; absent = dense), a tied LM head counts once as a product, and the attention score/value products
    (``4 * seq_len * n_embd`` forward FLOPs per layer and token) stay dense.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    matmul = 0.0
    for name, p in model.named_parameters():
        if p.dim() == 2 and id(p) not in embeddings:
            matmul += p.numel() * densities.get(name, 1.0)
    head = model.get_output_embeddings()
    if head is not None and id(head.weight) in embeddings:
        matmul += head.weight.numel()
    attention = 4.0 * seq_len * n_embd * n_layer
    return 3.0 * (2.0 * matmul + attention)


def to_cpu_state_dict(state_dict: dict) -> dict:
    return {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
