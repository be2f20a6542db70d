"""Perplexity on held-out text (strided windows, as in the SparseGPT and Wanda evaluations) and weight sparsity.

The text is tokenized once and cut into windows of ``seqlen`` tokens starting every ``stride`` tokens (default
``stride = seqlen``: the non-overlapping windows of the SparseGPT/Wanda WikiText-2 evaluation; a trailing piece
shorter than a window is dropped). The first window scores all its ``seqlen - 1`` next-token predictions; a later
window scores only the predictions of its last ``stride`` tokens (the Hugging Face sliding-window recipe), so no
token is scored twice; with ``stride = seqlen`` the first token of each window has no context and is not scored.
Perplexity = ``exp(mean NLL)``.
"""

import math

import torch
from torch import nn

from dist_sparse.errors import ConfigError
from dist_sparse.oneshot.layers import find_blocks, find_prunable

ENCODER_ONLY = {"bert", "roberta", "xlm-roberta", "electra", "camembert", "distilbert", "deberta", "deberta-v2"}


def is_causal_lm(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if type(model).__name__ not in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        return False
    config = model.config
    return not (config.model_type in ENCODER_ONLY and not getattr(config, "is_decoder", False))


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int, stride: int | None = None, batch_size: int = 4,
               device=None) -> dict:
    """Strided-window perplexity of ``model`` on the 1-D token ids ``ids``."""
    stride = seqlen if stride is None else stride
    if seqlen < 2:
        raise ConfigError("--seqlen", f"must be at least 2, got {seqlen}")
    if not 0 < stride <= seqlen:
        raise ConfigError("--stride", f"must be in [1, --seqlen], got {stride}")
    if ids.numel() < seqlen:
        raise ConfigError("--seqlen", f"evaluation text has {ids.numel()} tokens, fewer than --seqlen {seqlen}")
    device = torch.device(device or "cpu")
    model.eval()
    starts = list(range(0, ids.numel() - seqlen + 1, stride))
    total_nll, total_tokens = 0.0, 0
    for b in range(0, len(starts), batch_size):
        chunk = starts[b:b + batch_size]
        batch = torch.stack([ids[s:s + seqlen] for s in chunk]).to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                          reduction="none").reshape(len(chunk), seqlen - 1)
        for row, s in enumerate(chunk):
            first = 0 if s == 0 else max(0, seqlen - 1 - stride)  # only predictions of tokens not scored yet
            total_nll += nll[row, first:].double().sum().item()
            total_tokens += seqlen - 1 - first
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": total_tokens, "windows": len(starts)}


def weight_sparsity(model: nn.Module) -> dict:
    """Fraction of exactly-zero weights in the Linear/Conv1D layers of the transformer blocks (what sparsify
    prunes), and over every parameter of the model."""
    prefix, blocks = find_blocks(model)
    zeros = total = 0
    for i, block in enumerate(blocks):
        for module in find_prunable(block, f"{prefix}.{i}").values():
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    all_zeros = sum(int((p == 0).sum()) for p in model.parameters())
    all_total = sum(p.numel() for p in model.parameters())
    return {"sparsity": zeros / max(total, 1), "sparsity_all_params": all_zeros / max(all_total, 1),
            "block_linear_params": total}


def evaluate_checkpoint(model_dir, data, seqlen: int = 512, stride: int | None = None, batch_size: int = 4,
                        max_tokens: int | None = None, text_column: str | None = None, device=None,
                        prepared=None, split: str = "val") -> dict:
    """What ``dist-sparse eval`` prints: ``perplexity`` (None for models that are not causal LMs), ``sparsity``
    (zero fraction of the block Linear/Conv1D weights) and the window bookkeeping.

    ``prepared``: a ``dist-sparse prepare-data`` directory instead of ``data``; its ``split`` is evaluated, read
    through memory maps (no tokenizing)."""
    from dist_sparse.oneshot.calibration import load_text, tokenize_text
    from dist_sparse.oneshot.pipeline import load_model, load_tokenizer, max_positions

    for key, value in (("--seqlen", seqlen), ("--batch-size", batch_size), ("--max-tokens", max_tokens)):
        if value is not None and value < 1:
            raise ConfigError(key, f"must be at least 1, got {value}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(model_dir, device)
    out = {"model": str(model_dir)}
    out.update(weight_sparsity(model))
    if not is_causal_lm(model):
        out.update(perplexity=None, note=f"{type(model).__name__} is not a causal LM; perplexity not defined")
        return out
    limit = max_positions(model.config)
    if limit is not None and seqlen > limit:
        raise ConfigError("--seqlen", f"{seqlen} exceeds the model's {limit} positions")
    if prepared is not None:
        ids = _prepared_tokens(prepared, split, model_dir, model.get_input_embeddings().num_embeddings, max_tokens)
        out.update(prepared=str(prepared), split=split)
    else:
        tok = load_tokenizer(model_dir, model.get_input_embeddings().num_embeddings)
        ids = tokenize_text(tok, load_text(data, "--data", text_column))
        if max_tokens is not None:
            ids = ids[:max_tokens]
    out.update(perplexity(model, ids, seqlen, stride, batch_size, device))
    out.update(seqlen=seqlen, stride=stride or seqlen)
    return out


def _prepared_tokens(directory, split: str, model_dir, rows: int, max_tokens: int | None):
    """A prepared split as the perplexity loop's token sequence, after checking it belongs to this model: its ids
    must index the embedding and, where the checkpoint has a tokenizer, it must be the one the data was
    tokenized with (same SHA-256)."""
    from dist_sparse.prepared.data import PreparedData
    from dist_sparse.prepared.format import read_index, tokenizer_sha256

    if split not in ("train", "val"):
        raise ConfigError("--split", f"must be 'train' or 'val', got {split!r}")
    index = read_index(directory, "--prepared")
    if index["max_token_id"] >= rows:
        raise ConfigError("--prepared", f"{directory} holds token ids up to {index['max_token_id']}, beyond the "
                                        f"{rows}-row embedding of {model_dir}")
    theirs = tokenizer_sha256(model_dir)
    if theirs is not None and theirs != index["tokenizer"]["sha256"]:
        raise ConfigError("--prepared", f"{directory} was tokenized with {index['tokenizer'].get('name')}, not with "
                                        f"the tokenizer of {model_dir} (tokenizer sha256 differs)")
    return PreparedData(directory, 1, 0, key="--prepared").tokens(split, max_tokens)
