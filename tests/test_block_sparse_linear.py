"""The block-sparse linear operator against the masked dense reference: forward, dX, dW (active blocks / dense),
bias, Conv1D's transposed layout, irregular shapes, empty block rows and columns, a fully dense mask, bf16.

The Triton kernels run in a subprocess started with ``TRITON_INTERPRET=1`` (see tests/test_attention_kernels.py for
why a subprocess): ``test_triton_linear_under_interpreter_subprocess``.
"""

import os
from pathlib import Path

import dist_sparse.kernels.block_sparse_linear as bsl
import pytest
import torch
from dist_sparse.kernels.block_sparse_linear import expand_layout, reference_block_sparse_linear

from dist_sparse.linear import BlockIndex, block_sparse_linear, resolve_implementation
from tests.interpreter import run_interpreter_subprocess

TOL = 1e-5
BF16_TOL = 2e-2  # relative to the output's scale: bf16 keeps 8 mantissa bits (2**-8 = 0.4%) per rounded value
ROOT = Path(__file__).resolve().parents[1]
_CHILD_ENV = "DIST_SPARSE_TRITON_LINEAR_CHILD"
_CHILD = os.environ.get(_CHILD_ENV) == "1"
in_child = pytest.mark.skipif(not _CHILD, reason="runs in test_triton_linear_under_interpreter_subprocess")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _layout(out, inp, block, density, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(-(-out // block[0]), -(-inp // block[1]), generator=gen) < density


def _case(out, inp, block, layout, transposed=False, bias=True, lead=(3, 37), dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*((inp, out) if transposed else (out, inp)), generator=gen).to(dtype).requires_grad_()
    b = torch.randn(out, generator=gen).to(dtype).requires_grad_() if bias else None
    x = torch.randn(*lead, inp, generator=gen).to(dtype).requires_grad_()
    return x, w, b, BlockIndex.from_layout(layout, block, (out, inp))


def _compare(x, w, b, index, transposed, dense_grad, impl, tol=TOL):
    inputs = [t for t in (x, w, b) if t is not None]
    y = block_sparse_linear(x, w, b, index, transposed=transposed, dense_grad=dense_grad, implementation=impl)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, inputs, grad)
    ref = reference_block_sparse_linear(x, w, b, index.layout, index.block, transposed, dense_grad)
    want = torch.autograd.grad(ref, inputs, grad)
    assert y.shape == (*x.shape[:-1], index.shape[0]) and y.dtype == x.dtype
    # tolerances are absolute for values up to 1 and relative to the largest magnitude above (a dW summed over 100
    # tokens reaches ~10, where fp32's different summation orders differ by ~1e-6 relative)
    scale = lambda t: max(1.0, t.float().abs().max().item())  # noqa: E731
    assert (y.float() - ref.float()).abs().max().item() <= tol * scale(ref)
    for name, g, r, t in zip(("x", "weight", "bias"), got, want, inputs):
        assert g.shape == t.shape and g.dtype == t.dtype, name
        assert (g.float() - r.float()).abs().max().item() <= tol * scale(r), f"grad {name}"
    return y, got


IMPLS = ["cpu", "reference"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("out, inp, block, transposed, bias", [
    (64, 96, (16, 16), False, True),
    (64, 96, (16, 32), True, True),  # Conv1D layout, non-square blocks
    (70, 45, (16, 8), False, True),  # irregular: partial edge blocks on both sides
    (33, 17, (8, 4), True, False),  # irregular + transposed, no bias
])
@pytest.mark.parametrize("dense_grad", [False, True])
def test_matches_reference(impl, out, inp, block, transposed, bias, dense_grad):
    layout = _layout(out, inp, block, 0.4, seed=out + inp)
    layout[1, :] = False  # an empty block row: zero outputs there, zero dW
    layout[:, 0] = False  # an empty block column: zero dX there
    x, w, b, index = _case(out, inp, block, layout, transposed, bias)
    y, (dx, dw, *_) = _compare(x, w, b, index, transposed, dense_grad, impl)
    bh, bw = block
    assert (y[..., bh:2 * bh] - (b[bh:2 * bh] if bias else 0)).abs().max().item() == 0.0
    assert dx[..., :bw].abs().max().item() == 0.0
    mask = expand_layout(layout, block, (out, inp))
    dw_oi = dw.t() if transposed else dw
    if dense_grad:  # the dense gradient reaches pruned positions too
        assert dw_oi[~mask].abs().max().item() > 0
    else:  # the sampled product: exactly 0 outside the active blocks
        assert dw_oi[~mask].abs().max().item() == 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_dense_and_empty_masks(impl):
    x, w, b, index = _case(48, 32, (16, 16), torch.ones(3, 2, dtype=torch.bool))
    y, _ = _compare(x, w, b, index, False, False, impl)
    assert (y - torch.nn.functional.linear(x, w, b)).abs().max().item() <= TOL
    x, w, b, index = _case(48, 32, (16, 16), torch.zeros(3, 2, dtype=torch.bool))
    y, (dx, dw, db) = _compare(x, w, b, index, False, False, impl)
    assert (y - b).abs().max().item() == 0.0 and dx.abs().max().item() == 0.0 and dw.abs().max().item() == 0.0


def test_from_mask_blocks_and_masked_product():
    # an element mask that is not block-aligned: a block is active if any of its entries is, and the output still
    # equals the masked dense product once the weight itself is masked
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(40, 24, generator=gen) < 0.05
    index = BlockIndex.from_mask(mask, (16, 8))
    assert index.layout.shape == (3, 3)
    assert torch.equal(index.layout, torch.nn.functional.pad(mask, (0, 0, 0, 8)).view(3, 16, 3, 8).any(3).any(1))
    w = torch.randn(40, 24, generator=gen) * mask
    x = torch.randn(5, 24, generator=gen)
    assert (block_sparse_linear(x, w, None, index) - x @ w.t()).abs().max().item() <= TOL


def test_pack_unpack_round_trip_both_layouts():
    layout = _layout(50, 40, (16, 16), 0.5, seed=7)
    index = BlockIndex.from_layout(layout, (16, 16), (50, 40))
    w = torch.randn(50, 40) * expand_layout(layout, (16, 16), (50, 40))
    assert torch.equal(index.unpack(index.pack(w)), w)
    assert torch.equal(index.unpack(index.pack(w.t().contiguous(), True), True), w.t())
    assert index.pack(w).shape == (index.nnz, 16, 16)


@pytest.mark.parametrize("needs", ["weight only", "input only"])
def test_cpu_one_sided_gradients(needs):
    # the CPU backward computes dX and the sampled dW in one pass; either one alone must still be right
    layout = _layout(64, 96, (16, 16), 0.4, seed=5)
    layout[:, 2] = False
    x, w, b, index = _case(64, 96, (16, 16), layout, transposed=True, lead=(70,))
    (x if needs == "weight only" else w).requires_grad_(False)
    wanted = [t for t in (x, w) if t.requires_grad]
    y = block_sparse_linear(x, w, b, index, transposed=True, implementation="cpu")
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, wanted, grad)
    want = torch.autograd.grad(reference_block_sparse_linear(x, w, b, index.layout, index.block, True, False),
                               wanted, grad)
    for g, r in zip(got, want):
        assert (g - r).abs().max().item() <= TOL * max(1.0, r.abs().max().item())


def test_bf16_against_fp32_reference():
    layout = _layout(64, 64, (16, 16), 0.5, seed=1)
    x, w, b, index = _case(64, 64, (16, 16), layout, dtype=torch.bfloat16)
    _compare(x, w, b, index, False, False, "cpu", tol=BF16_TOL)


def test_cpu_path_uses_several_tiles_and_workers(monkeypatch):
    # more tokens than one tile, two workers: the dW partial sums of both workers must add up
    import dist_sparse.linear.cpu as cpu

    monkeypatch.setattr(cpu, "_TILE", 16)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        layout = _layout(64, 64, (16, 16), 0.5, seed=2)
        x, w, b, index = _case(64, 64, (16, 16), layout, lead=(100,))
        _compare(x, w, b, index, False, False, "cpu")
    finally:
        torch.set_num_threads(threads)


def test_typed_errors():
    index = BlockIndex.from_layout(torch.ones(2, 2, dtype=torch.bool), (16, 16), (32, 32))
    x, w = torch.randn(4, 32), torch.randn(32, 32)
    with pytest.raises(TypeError, match="BlockIndex"):
        block_sparse_linear(x, w, None, index.layout)
    with pytest.raises(ValueError, match="does not match"):
        block_sparse_linear(x, torch.randn(32, 48), None, index)
    with pytest.raises(ValueError, match="input features"):
        block_sparse_linear(torch.randn(4, 16), w, None, index)
    with pytest.raises(ValueError, match="bias"):
        block_sparse_linear(x, w, torch.randn(3), index)
    with pytest.raises(ValueError, match="implementation"):
        block_sparse_linear(x, w, None, index, implementation="fast")
    with pytest.raises(ValueError, match="layout must have shape"):
        BlockIndex.from_layout(torch.ones(3, 2, dtype=torch.bool), (16, 16), (32, 32))
    assert resolve_implementation(torch.device("cpu"), (16, 16)) == "cpu"


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels on CPU through the interpreter (in a subprocess started with TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------------------------------


@in_child
@pytest.mark.parametrize("out, inp, transposed, dense_grad, n_tok", [
    (64, 48, False, False, 40),  # irregular: 48 = 3 blocks of 16, 40 tokens = a partial token tile
    (48, 64, True, False, 32),  # Conv1D layout
    (64, 32, False, True, 33),  # dense dW
    (40, 24, False, False, 20),  # irregular feature counts (padded inside)
])
def test_triton_linear_interp_matches_reference(out, inp, transposed, dense_grad, n_tok):
    assert bsl.triton_interpreting(), "kernels were not built for the interpreter"
    layout = _layout(out, inp, (16, 16), 0.5, seed=out)
    layout[0, :] = False
    x, w, b, index = _case(out, inp, (16, 16), layout, transposed, lead=(n_tok,))
    _compare(x, w, b, index, transposed, dense_grad, "triton")


N_CHILD_TESTS = 4


@pytest.mark.skipif(not bsl.HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(_CHILD, reason="this process is the interpreter subprocess")
def test_triton_linear_under_interpreter_subprocess():
    run_interpreter_subprocess(__file__, "triton_linear_interp", _CHILD_ENV, N_CHILD_TESTS)


# ---------------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.skipif(not bsl.HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, BF16_TOL)])
@pytest.mark.parametrize("transposed", [False, True])
def test_triton_gpu_matches_reference(dtype, tol, transposed):
    layout = _layout(512, 256, (64, 64), 0.3, seed=5)
    gen_args = dict(lead=(4, 250), dtype=dtype)
    x, w, b, index = _case(512, 256, (64, 64), layout, transposed, **gen_args)
    x, w, b = (t.detach().cuda().requires_grad_() for t in (x, w, b))
    assert resolve_implementation(x.device, index.block) == "triton"
    _compare(x, w, b, index, transposed, False, "triton", tol=tol)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path, capsys):
    from bench import gpu_check

    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 0
    assert "skipped, no CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
