"""Tiny random-init configs of the Hugging Face causal LMs dist_sparse is tested on (no downloads): 2 layers,
width 32, a 64-token vocabulary, 64 positions. ``tied`` says whether the LM head shares the embedding."""

import json
from pathlib import Path

VOCAB = 64
POSITIONS = 64

_COMMON = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}

ARCHITECTURES = {
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": POSITIONS,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": True},
    "llama": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": POSITIONS,
              "tie_word_embeddings": True},
    "mistral": {"model_type": "mistral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": POSITIONS,
                "sliding_window": 16, "tie_word_embeddings": False},
    "qwen2": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": POSITIONS,
              "tie_word_embeddings": True},
    "gpt_neox": {"model_type": "gpt_neox", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "max_position_embeddings": POSITIONS, "rotary_pct": 0.5,
                 "hidden_dropout": 0.0, "attention_dropout": 0.0, "tie_word_embeddings": False},
    "opt": {"model_type": "opt", "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": POSITIONS, "word_embed_proj_dim": 32,
            "dropout": 0.0, "attention_dropout": 0.0, "tie_word_embeddings": True},
    "phi3": {"model_type": "phi3", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": POSITIONS,
             "original_max_position_embeddings": POSITIONS, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
             "attention_dropout": 0.0, "tie_word_embeddings": False},
    "mixtral": {"model_type": "mixtral", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": POSITIONS,
                "num_local_experts": 4, "num_experts_per_tok": 2, "router_jitter_noise": 0.0,
                "tie_word_embeddings": False},
}


def write_config(directory, arch: str) -> Path:
    """``directory/config.json`` for one architecture (what a user passes as ``model.config``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps({**_COMMON, **ARCHITECTURES[arch]}, indent=1))
    return path


def build(arch: str, seed: int = 0):
    """The model of one architecture, random init from ``seed`` (same on every rank)."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from dist_sparse.integration.hf import load_model_config

    with tempfile.TemporaryDirectory() as d:
        cfg = load_model_config(write_config(d, arch))
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)
