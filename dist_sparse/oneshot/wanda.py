"""Wanda: pruning by weights and activations (Sun, Liu, Bair, Kolter 2023, "A Simple and Effective Pruning
Approach for Large Language Models", arXiv:2306.11695).

Score ``S_ij = |W_ij| * ||X_j||_2`` where ``||X_j||_2`` is the L2 norm of input feature ``j`` over every calibration
token; weights are compared within each output row (per-output), or within each group of M input columns for N:M.
No weight update.
"""

import torch

from dist_sparse.oneshot.nm import nm_mask_from_scores, rowwise_mask_from_scores


class WandaStats:
    """Accumulates ``sum_t x_tj^2`` per input feature in float64 (summable across ranks with all-reduce)."""

    def __init__(self, in_features: int, device=None):
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        self.sq_sum += (x * x).sum(0)
        self.tokens += x.shape[0]

    def tensors(self):
        return [self.sq_sum, self.tokens]

    def column_norms(self) -> torch.Tensor:
        return self.sq_sum.sqrt()


def wanda_mask(weight: torch.Tensor, col_norm: torch.Tensor, sparsity: float | None = None,
               nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Bool keep-mask for ``weight`` ``[out, in]`` given the input feature norms ``col_norm`` ``[in]``.

    Unstructured: each output row loses exactly ``round(sparsity * in)`` weights (the per-output comparison group
    the Wanda paper found best for LLMs). N:M: the N best of every M consecutive input columns are kept.
    """
    scores = weight.detach().abs().to(torch.float64) * col_norm.to(weight.device, torch.float64).reshape(1, -1)
    if nm is not None:
        return nm_mask_from_scores(scores, *nm)
    return rowwise_mask_from_scores(scores, float(sparsity))
