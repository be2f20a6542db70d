"""``block_sparse_linear``: the block-sparse linear operator (one autograd Function) and the choice of backend.

``y = block_sparse_linear(x, weight, bias, index)`` equals ``x @ (weight * mask)ᵀ + bias`` for the block mask of
``index`` (:class:`~dist_sparse.linear.index.BlockIndex`), computed over the active blocks only:

* forward ``Y = X Wᵀ`` and backward ``dX = dY W`` from the active blocks;
* ``dW`` for the active blocks only (the *sampled* product; zeros elsewhere, in the weight's shape, which is what
  DeepSpeed reduces), unless ``dense_grad=True``: then the full ``dYᵀ X`` (one dense matmul), the gradient RigL's
  growth scores on its mask-update steps and growth window (``StepPlan.dense_grad``);
* ``transposed=True``: ``weight`` is stored ``(in, out)`` (GPT-2's ``Conv1D``); its gradient comes back in that shape.

Backends: ``"cpu"`` (``dist_sparse/linear/cpu.py``), ``"triton"`` (``kernels/block_sparse_linear.py``: CUDA, or
CPU tensors under ``TRITON_INTERPRET=1``) and ``"reference"`` (masked dense matmuls). ``"auto"`` follows the
device: Triton on CUDA when installed and the block sides are powers of two >= 16, the CPU path on CPU, the
reference elsewhere. ``implementation=`` wins over ``DIST_SPARSE_LINEAR_IMPL``, which wins over ``"auto"``.
"""

from __future__ import annotations

import os

import torch

import dist_sparse.kernels.block_sparse_linear as _kernels
from dist_sparse.cpu_memory import keep_freed_memory

from .cpu import cpu_grad_input, cpu_grad_weight_blocks, cpu_linear_forward
from .index import BlockIndex

__all__ = ["IMPLEMENTATIONS", "block_sparse_linear", "resolve_implementation"]

IMPLEMENTATIONS = ("auto", "triton", "cpu", "reference")
ENV_VAR = "DIST_SPARSE_LINEAR_IMPL"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_implementation(device: torch.device, block, implementation: str | None = None) -> str:
    """The backend that runs for tensors on ``device`` with ``block`` = (bh, bw)."""
    choice = implementation or os.environ.get(ENV_VAR) or "auto"
    if choice not in IMPLEMENTATIONS:
        source = "implementation" if implementation else ENV_VAR
        raise ValueError(f"{source} must be one of {', '.join(IMPLEMENTATIONS)}, got {choice!r}")
    if choice == "auto":
        if device.type == "cuda" and _kernels.HAS_TRITON and _kernels.triton_block_ok(tuple(block)):
            return "triton"
        return "cpu" if device.type == "cpu" else "reference"
    if choice == "cpu" and device.type != "cpu":
        raise ValueError(f"implementation 'cpu' needs CPU tensors, got {device.type} tensors")
    return choice


def _pad_cols(t: torch.Tensor, width: int) -> torch.Tensor:
    return t if t.shape[1] == width else torch.nn.functional.pad(t, (0, width - t.shape[1]))


class _BlockSparseLinear(torch.autograd.Function):
    """Inputs: ``x`` flattened to ``(n_tok, in)``; the backend computes the three products on padded operands."""

    @staticmethod
    def forward(ctx, x, weight, bias, index: BlockIndex, transposed: bool, dense_grad: bool, impl: str,
                blocks=None):
        bh, bw = index.block
        xp = _pad_cols(x.contiguous(), index.nc * bw)
        if blocks is None:  # the active blocks of the dense weight (else: held as blocks, the weight is not read)
            blocks = index.pack(weight.detach(), transposed)
        if impl == "cpu":
            keep_freed_memory()
            packed = blocks.float()
            y = cpu_linear_forward(xp, packed, index)
        else:
            packed = blocks.to(x.dtype)
            y = _kernels.triton_linear_forward(xp, packed, index.row_lut(x.device), index.nr, index.block)
        y = y[:, : index.shape[0]] if index.padded else y
        if bias is not None:
            y = y.add_(bias.to(y.dtype)) if not index.padded else y + bias.to(y.dtype)
        ctx.save_for_backward(xp, packed)
        ctx.index, ctx.transposed, ctx.dense_grad, ctx.impl = index, transposed, dense_grad, impl
        ctx.w_dtype, ctx.in_features = weight.dtype, x.shape[1]
        ctx.b_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        xp, packed = ctx.saved_tensors
        index, impl = ctx.index, ctx.impl
        bh, bw = index.block
        dyp = _pad_cols(dy.contiguous(), index.nr * bh)
        dx = dw = db = blocks = None
        want_dx, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        sampled = want_dw and not ctx.dense_grad
        if impl == "cpu" and sampled:  # one pass for the sampled dW and dX: they share dY's gathers
            dx, blocks = cpu_grad_weight_blocks(dyp, xp, index, packed if want_dx else None)
        elif want_dx:
            if impl == "cpu":
                dx = cpu_grad_input(dyp, packed, index)
            else:
                dx = _kernels.triton_grad_input(dyp, packed, index.col_lut(dy.device), index.nc, index.block)
        if dx is not None and index.padded:
            dx = dx[:, : ctx.in_features]
        if want_dw:
            if ctx.dense_grad:
                # RigL's growth needs dL/dW at pruned positions too: the one dense product of the step
                x_u, dy_u = xp[:, : index.shape[1]].float(), dy.float()
                dw = (x_u.t() @ dy_u if ctx.transposed else dy_u.t() @ x_u).to(ctx.w_dtype)
            else:
                if blocks is None:
                    rows, cols = index.device_lists(dy.device)
                    blocks = _kernels.triton_grad_weight_blocks(dyp, xp, rows, cols, index.block)
                dw = index.unpack(blocks, ctx.transposed, ctx.w_dtype)
        if ctx.b_dtype is not None and ctx.needs_input_grad[2]:
            db = dy.float().sum(0).to(ctx.b_dtype)
        return dx, dw, db, None, None, None, None, None


class _DenseFromBlocks(torch.autograd.Function):
    """The dense weight rebuilt from held blocks, standing in for ``weight`` (whose values are not read): its
    gradient is ``weight``'s."""

    @staticmethod
    def forward(ctx, weight, dense):
        return dense

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _check(x, weight, bias, index, transposed) -> None:
    if not isinstance(index, BlockIndex):
        raise TypeError(f"index must be a BlockIndex, got {type(index).__name__}")
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be a float32, bfloat16 or float16 tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    out, inp = weight.shape[::-1] if transposed else weight.shape
    if (out, inp) != index.shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} (transposed={transposed}) does not match the block "
                         f"index's (out, in) = {index.shape}")
    if x.dim() < 1 or x.shape[-1] != inp:
        raise ValueError(f"x must end in {inp} input features, got shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (out,):
        raise ValueError(f"bias must have shape ({out},), got {tuple(bias.shape)}")
    if x.device != weight.device:
        raise ValueError(f"x and weight must be on one device, got {x.device} and {weight.device}")


def block_sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, index: BlockIndex, *,
                        transposed: bool = False, dense_grad: bool = False, implementation: str | None = None,
                        packed: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (weight * block mask)ᵀ + bias`` over the active blocks of ``index``; shaped ``(*x.shape[:-1], out)``
    and typed like ``x``. See the module docstring for ``transposed``, ``dense_grad`` and ``implementation``.
    ``packed``: the active blocks themselves, ``(nnz, bh, bw)`` in the index's order (weights held as blocks);
    ``weight`` then only receives the gradient (its shape and dtype are checked, its values are not read)."""
    _check(x, weight, bias, index, transposed)
    impl = resolve_implementation(x.device, index.block, implementation)
    if packed is not None and tuple(packed.shape) != (index.nnz, *index.block):
        raise ValueError(f"packed must have shape ({index.nnz}, {index.block[0]}, {index.block[1]}) for this index, "
                         f"got {tuple(packed.shape)}")
    if impl == "reference":
        if packed is not None:  # the reference multiplies the dense weight: rebuilt from the blocks
            weight = _DenseFromBlocks.apply(weight, index.unpack(packed.detach(), transposed, weight.dtype))
        return _kernels.reference_block_sparse_linear(x, weight, bias, index.layout, index.block, transposed,
                                                      dense_grad)
    lead = x.shape[:-1]
    y = _BlockSparseLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias, index, transposed, dense_grad, impl,
                                 packed)
    return y.reshape(*lead, y.shape[-1]).to(x.dtype)
