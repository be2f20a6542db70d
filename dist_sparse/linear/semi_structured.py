"""2:4 semi-structured sparse linear layers on CUDA (``torch.sparse.to_sparse_semi_structured``: CUTLASS or
cuSPARSELt), the approach of PyTorch's 2:4 training work: the forward product and ``dX`` run on the sparse tensor
cores, ``dW`` is a dense product masked to the pattern (dense on the steps that need the dense gradient).

Mask constraint: the weight ``(out, in)`` keeps 2 of every 4 consecutive inputs of each row (``sparsity.pattern:
"2:4"``). The forward multiplies by ``W``, whose rows are 2:4. ``dX = dY W`` multiplies by ``Wᵀ``, which is 2:4 only
when the mask is *transposable* (2:4 along columns too); for such masks ``dX`` runs sparse as well, for the others it
runs as a dense matmul on the masked weight (stated in docs/kernels.md). Only CUDA devices of compute capability 8.0
or newer have the kernels; ``semi_structured_available`` says why not otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["semi_structured_available", "semi_structured_linear", "transposable", "two_four_mask"]


def semi_structured_available(device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """None when 2:4 kernels can run on ``device`` (for ``dtype``, when given); otherwise the reason."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "2:4 semi-structured kernels need a CUDA device"
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return f"2:4 semi-structured kernels take float16 or bfloat16 weights, got {dtype} (enable bf16 or fp16)"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return f"2:4 semi-structured kernels need compute capability >= 8.0, got {torch.cuda.get_device_capability()}"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    return None


def two_four_mask(weight: torch.Tensor) -> torch.Tensor:
    """The 2:4 mask keeping the 2 largest ``|w|`` of every 4 consecutive inputs of each row of ``(out, in)``."""
    out, inp = weight.shape
    groups = weight.detach().abs().reshape(out, inp // 4, 4)
    keep = groups.topk(2, dim=-1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True).reshape(out, inp)


def transposable(mask: torch.Tensor) -> bool:
    """Whether ``mask`` is 2:4 along both rows and columns (then ``Wᵀ`` is a valid 2:4 operand for ``dX``)."""
    def two_four(m):
        return bool((m.reshape(m.shape[0], -1, 4).sum(-1) == 2).all())
    return mask.shape[0] % 4 == 0 and mask.shape[1] % 4 == 0 and two_four(mask) and two_four(mask.t().contiguous())


class _SemiStructuredLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias, mask, dense_grad, sparse_dx):
        from torch.sparse import to_sparse_semi_structured

        w = weight * mask
        y = F.linear(x2, to_sparse_semi_structured(w.to(x2.dtype)), None)
        if bias is not None:
            y = y + bias.to(y.dtype)
        ctx.save_for_backward(x2, w, mask)
        ctx.dense_grad, ctx.sparse_dx, ctx.has_bias = dense_grad, sparse_dx, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        from torch.sparse import to_sparse_semi_structured

        x2, w, mask = ctx.saved_tensors
        dy = dy.contiguous()
        if ctx.sparse_dx:
            dx = F.linear(dy, to_sparse_semi_structured(w.t().contiguous().to(dy.dtype)), None)
        else:
            dx = dy @ w.to(dy.dtype)
        dw = dy.t() @ x2
        if not ctx.dense_grad:
            dw = dw * mask
        db = dy.sum(0) if ctx.has_bias else None
        return dx, dw.to(w.dtype), db, None, None, None


def semi_structured_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor,
                           *, dense_grad: bool = False) -> torch.Tensor:
    """``x @ (weight * mask)ᵀ + bias`` with the 2:4 kernels (``weight`` ``(out, in)``, ``mask`` 2:4 along inputs)."""
    why = semi_structured_available(x.device, x.dtype)
    if why is not None:
        raise RuntimeError(why)
    lead = x.shape[:-1]
    y = _SemiStructuredLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias, mask.to(weight.dtype), dense_grad,
                                    transposable(mask))
    return y.reshape(*lead, y.shape[-1])
