"""N:M helpers: parse ``N:M``, keep the N best of every M consecutive input columns, check a mask.

Groups run along the *input* (reduction) dimension of a layer, i.e. along the columns of an ``nn.Linear`` weight
``[out, in]``; that is the layout sparse tensor cores (2:4) and the compressed-tensors ``sparse-24-bitmask`` format
use. Callers with a GPT-2 ``Conv1D`` weight ``[in, out]`` pass its transpose.
"""

import torch

from dist_sparse.errors import ConfigError


def parse_pattern(text: str, key: str = "--pattern") -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``: keep N of every M weights. Raises :class:`ConfigError` naming ``key``."""
    parts = str(text).split(":")
    if len(parts) != 2:
        raise ConfigError(key, f"expected N:M (e.g. 2:4), got {text!r}")
    try:
        n, m = int(parts[0]), int(parts[1])
    except ValueError:
        raise ConfigError(key, f"expected integers N:M (e.g. 2:4), got {text!r}") from None
    if not 0 < n < m:
        raise ConfigError(key, f"need 0 < N < M, got {n}:{m}")
    return n, m


def check_divisible(cols: int, m: int, layer: str) -> None:
    if cols % m:
        raise ConfigError("--pattern", f"layer {layer} has {cols} input features, not a multiple of M={m}")


def nm_mask_from_scores(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive columns of ``scores`` ``[rows, cols]``.

    Returns a bool mask (True = kept) of the same shape. Ties are broken by ``torch.topk`` (deterministic on CPU).
    """
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} columns is not a multiple of M={m}")
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.topk(groups, n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, keep, True)
    return mask.reshape(rows, cols)


def rowwise_mask_from_scores(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-output-row selection: prune the ``round(sparsity * cols)`` lowest scores of every row."""
    rows, cols = scores.shape
    k = int(round(sparsity * cols))
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        drop = torch.topk(scores, k, dim=1, largest=False).indices
        mask.scatter_(1, drop, False)
    return mask


def is_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive columns of ``mask`` ``[rows, cols]`` keeps at most ``n``."""
    rows, cols = mask.shape
    if cols % m:
        return False
    return bool((mask.reshape(rows, cols // m, m).sum(-1) <= n).all())
