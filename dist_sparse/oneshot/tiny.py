"""Tiny offline models and a character-level tokenizer, for tests and benchmarks (no hub downloads).

:func:`char_tokenizer` builds a ``PreTrainedTokenizerFast`` (one token per character, ``<unk>`` for the rest) that
round-trips through ``AutoTokenizer.from_pretrained``; the ``tiny_*`` helpers save randomly initialised GPT-2,
Llama and BERT checkpoints with it.
"""

from pathlib import Path

import torch

from dist_sparse.data import char_tokenizer

__all__ = ["char_tokenizer", "tiny_gpt2", "tiny_llama", "tiny_bert"]


def _save(model, tokenizer, path) -> Path:
    path = Path(path)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def tiny_gpt2(path, tokenizer, n_embd: int = 64, n_layer: int = 2, n_head: int = 4, n_positions: int = 128,
              seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     n_positions=n_positions, bos_token_id=0, eos_token_id=0)
    return _save(GPT2LMHeadModel(cfg), tokenizer, path)


def tiny_llama(path, tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 128, positions: int = 128, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=intermediate,
                      max_position_embeddings=positions, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return _save(LlamaForCausalLM(cfg), tokenizer, path)


def tiny_bert(path, tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: int = 128,
              positions: int = 128, seed: int = 0) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=intermediate, max_position_embeddings=positions,
                     pad_token_id=0)
    return _save(BertForMaskedLM(cfg), tokenizer, path)
