"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
arXiv:2301.00774).

For a linear layer ``Y = W X`` with layer Hessian ``H = 2 X X^T / n`` (``n`` calibration tokens), columns are
visited left to right; pruning a weight is compensated by an Optimal-Brain-Surgeon update of the not yet visited
weights of the same row, using the upper Cholesky factor of the damped inverse Hessian (``H + lambda I``, ``lambda``
= ``damp`` times the mean diagonal). Columns are processed in blocks of ``blocksize`` with lazy batched updates of
the columns right of the block; the mask is chosen adaptively at the start of each block (unstructured: per output
row, from ``w^2 / [H^-1]_jj^2``) or at the start of each group of M columns (N:M).
"""

import torch

from dist_sparse.oneshot.nm import check_divisible


class HessianStats:
    """Accumulates ``sum_t x_t x_t^T`` in float64 and the token count; all-reduce both, then call :meth:`hessian`.

    Summing raw float64 sums (not running means) makes the result independent of how tokens are split across ranks
    up to float64 rounding of the summation order.
    """

    def __init__(self, in_features: int, device=None):
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        self.xtx.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    def tensors(self):
        return [self.xtx, self.tokens]

    def hessian(self) -> torch.Tensor:
        return self.xtx * (2.0 / max(float(self.tokens), 1.0))


def _prune_counts(cols: int, blocksize: int, sparsity: float) -> list[int]:
    """Weights to prune per row in each column block, so that every row loses exactly ``round(sparsity*cols)``."""
    counts, done = [], 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        target = int(round(sparsity * cols * i2 / cols))
        counts.append(target - done)
        done = target
    return counts


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float | None = None,
                    nm: tuple[int, int] | None = None, blocksize: int = 128, damp: float = 0.01,
                    dtype: torch.dtype = torch.float64, layer: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` ``[out, in]`` with the layer Hessian ``[in, in]``; returns ``(new_weight, keep_mask)``.

    Unstructured: every output row loses exactly ``round(sparsity * in)`` weights (spread over the column blocks in
    proportion to their width). N:M: in every group of M consecutive input columns the M-N weights of smallest
    ``w^2 / [H^-1]_jj^2`` are pruned. ``new_weight`` has the input's dtype and zeros wherever the mask is False.
    """
    out_dtype = weight.dtype
    W = weight.detach().to(dtype).clone()
    rows, cols = W.shape
    if nm is not None:
        n_keep, m = nm
        check_divisible(cols, m, layer)
        blocksize = max(m, blocksize - blocksize % m)  # N:M groups never straddle two blocks
    H = hessian.to(W.device, torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0

    diag = torch.arange(cols, device=W.device)
    lam = damp * torch.mean(torch.diag(H))
    H[diag, diag] += lam
    for attempt in range(5):  # if H is numerically indefinite, raise the dampening tenfold and retry
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            break
        H[diag, diag] += lam * (10 ** (attempt + 1))
    else:
        raise RuntimeError(f"{layer}: Hessian is not positive definite even after dampening")
    Hinv = torch.cholesky_inverse(L)
    Hinv = torch.linalg.cholesky(Hinv, upper=True).to(dtype)

    mask = torch.ones(rows, cols, dtype=torch.bool, device=W.device)
    counts = None if nm is not None else _prune_counts(cols, blocksize, float(sparsity))
    for b, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        mask1 = torch.ones_like(W1, dtype=torch.bool)
        if nm is None and counts[b] > 0:
            scores = W1 ** 2 / d1.reshape(1, -1) ** 2
            drop = torch.topk(scores, counts[b], dim=1, largest=False).indices
            mask1.scatter_(1, drop, False)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if nm is not None and i % m == 0:
                scores = W1[:, i:i + m] ** 2 / d1[i:i + m].reshape(1, -1) ** 2
                drop = torch.topk(scores, m - n_keep, dim=1, largest=False).indices
                mask1[:, i:i + m].scatter_(1, drop, False)
            q = w.clone()
            q[~mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    W[~mask] = 0
    return W.to(out_dtype), mask
