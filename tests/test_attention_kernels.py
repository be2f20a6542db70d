"""Block-sparse attention implementations against the dense reference: forward, gradients, GQA, masked rows.

The Triton kernels also run on CPU tensors through Triton's interpreter. ``triton.jit`` decides at decoration time
whether it builds a GPU kernel or an interpreted one, and that includes Triton's own ``@jit`` helpers (``tl.zeros``)
decorated when ``triton`` is first imported; in a shared pytest process something may have imported triton already.
So the interpreter tests run in a subprocess started with ``TRITON_INTERPRET=1``
(``test_triton_kernels_under_interpreter_subprocess``), and the ``interpreted`` fixture there checks that the kernels
really are interpreted functions.
"""

import os
from pathlib import Path

import dist_sparse.kernels.block_sparse_attn as bsa
import pytest
import torch
import torch.nn.functional as F
from dist_sparse.kernels.block_sparse_attn import effective_layout, reference_block_sparse_attention

from dist_sparse.attention import bigbird_layout, block_sparse_attention, dense_layout, global_layout, local_layout
from dist_sparse.attention.cpu import _build_plan, cpu_block_sparse_attention
from tests.interpreter import run_interpreter_subprocess

TOL = 1e-5
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(not bsa.HAS_TRITON, reason="triton is not installed")
ROOT = Path(__file__).resolve().parents[1]
_CHILD_ENV = "DIST_SPARSE_TRITON_INTERPRET_CHILD"
_CHILD = os.environ.get(_CHILD_ENV) == "1"
in_child = pytest.mark.skipif(not _CHILD, reason="runs in test_triton_kernels_under_interpreter_subprocess")


def _inputs(batch=2, heads=4, kv_heads=2, seq=64, dim=16, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(batch, h, seq, dim, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    return mk(heads), mk(kv_heads), mk(kv_heads)


def _random_layout(heads, nb, seed=0, density=0.5):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(heads, nb, nb, generator=gen) < density


def _check_against_reference(fn, q, k, v, layout, block_size, causal, attn_mask=None, tol=TOL):
    out = fn(q, k, v, layout, block_size, causal, None, attn_mask)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = reference_block_sparse_attention(q, k, v, layout, block_size, causal, None, attn_mask)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not torch.isnan(out).any()
    assert (out.float() - ref.float()).abs().max().item() <= tol
    for name, g, w in zip("qkv", got, want):
        assert g.shape == w.shape, name
        assert (g.float() - w.float()).abs().max().item() <= tol, f"grad {name}"
    return out


# ---------------------------------------------------------------------------------------------------------------------
# CPU path
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("seq", [64, 57])  # 57: a partial last block, padded internally
def test_cpu_matches_reference(causal, kv_heads, seq):
    q, k, v = _inputs(kv_heads=kv_heads, seq=seq)
    layout = _random_layout(4, 4, seed=seq + kv_heads)
    _check_against_reference(cpu_block_sparse_attention, q, k, v, layout, 16, causal)


def test_cpu_merges_rows_split_over_chunks():
    # One global row (active everywhere) among short rows: the planner splits it into several chunks, and the
    # log-sum-exp merge must reproduce the reference, also with a dense mask that blanks some chunks completely.
    nb, bs = 8, 8
    layout = (local_layout(nb, 0) | torch.zeros(1, nb, nb, dtype=torch.bool).index_fill_(1, torch.tensor([3]), True))
    plan = _build_plan(effective_layout(layout, False), 1, 2, 2)
    assert bool((plan.lengths > 1).any()), "the test layout must exercise multi-chunk rows"
    q, k, v = _inputs(batch=1, heads=2, kv_heads=2, seq=nb * bs)
    mask = torch.ones(1, 1, nb * bs, nb * bs, dtype=torch.bool)
    mask[..., 3 * bs:4 * bs, : 5 * bs] = False  # row block 3 keeps only its last keys
    _check_against_reference(cpu_block_sparse_attention, q, k, v, layout, bs, False)
    _check_against_reference(cpu_block_sparse_attention, q, k, v, layout, bs, False, attn_mask=mask)


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_local_global_layout_with_padding_and_gqa(causal):
    # local window + global blocks 0 and 12 (their rows attend everywhere, their columns are hit by every row), 8
    # heads over 2 k/v heads, a partial last block, a padding mask: global rows are split over many chunks and
    # merged, global columns sit in every chunk, and the result equals the reference
    nb, bs, seq = 16, 16, 250
    layout = local_layout(nb, 1) | global_layout(nb, [0, 12])
    q, k, v = _inputs(batch=2, heads=8, kv_heads=2, seq=seq)
    mask = torch.ones(2, 1, seq, seq, dtype=torch.bool)
    mask[1, :, :, 200:] = False  # the second sequence is padded after token 200
    _check_against_reference(cpu_block_sparse_attention, q, k, v, layout, bs, causal)
    _check_against_reference(cpu_block_sparse_attention, q, k, v, layout, bs, causal, attn_mask=mask)


def test_cpu_rows_without_blocks_next_to_single_chunk_rows():
    # Every non-empty row fits one chunk, and one query block attends nothing: the workers finish each chunk as its
    # row's result, the empty row's output is 0 (its gradient too), with and without a dense mask.
    layout = local_layout(4, 1).repeat(4, 1, 1)
    layout[1, 2] = False
    plan = _build_plan(effective_layout(layout, False), 2, 4, 2)
    assert not plan.one_to_one and not plan.split.numel(), "the layout must have empty rows and no split rows"
    q, k, v = _inputs(kv_heads=2, seq=57)
    mask = torch.rand(2, 4, 57, 57, generator=torch.Generator().manual_seed(3)) < 0.9
    out = _check_against_reference(cpu_block_sparse_attention, q, k, v, layout, 16, False)
    assert torch.equal(out[:, 1, 32:48], torch.zeros_like(out[:, 1, 32:48]))
    _check_against_reference(cpu_block_sparse_attention, q, k, v, layout, 16, True, attn_mask=mask)


@pytest.mark.parametrize("seq", [128, 121])  # 121: the last block partial, on the diagonal of the last rows
def test_cpu_causal_sliding_window_masks_and_kept_plans(monkeypatch, seq):
    # A causal sliding window: every chunk's diagonal tile sits in one slot over ranges of chunks and the first rows
    # carry padding slots, so the masker fills views instead of gathering; small groups put group boundaries inside
    # those ranges. The plans are kept per layout: the same layout reuses its plan, an edited copy gets its own.
    import dist_sparse.attention.cpu as cpu

    monkeypatch.setattr(cpu, "_GROUP_ELEMS", 3 * 16 * 16 * 3)  # three chunks of width 3 per group
    monkeypatch.setattr(cpu, "_PLANS", type(cpu._PLANS)())
    nb, bs = 8, 16
    layout = local_layout(nb, 2, causal=True)
    q, k, v = _inputs(batch=1, heads=2, kv_heads=2, seq=seq)
    _check_against_reference(cpu_block_sparse_attention, q, k, v, layout, bs, True)
    ops = [op[0] for m in (hit[1] for hit in cpu._PLANS.values()) for group in m._ops.values() for op in group]
    assert "slot" in ops and "pad" in ops, ops
    assert len(cpu._PLANS) == 1
    _check_against_reference(cpu_block_sparse_attention, q, k, v, layout.clone(), bs, True)
    assert len(cpu._PLANS) == 1, "the same layout contents must reuse the kept plan"
    edited = layout.clone()
    edited[0, 5, 0] = True  # one more block: the kept plan would miss it
    _check_against_reference(cpu_block_sparse_attention, q, k, v, edited, bs, True)
    assert len(cpu._PLANS) == 2


def test_cpu_small_groups_keep_masks_aligned(monkeypatch):
    # One chunk per group: the per-group masking (padding slots, causal diagonal, padded keys, dense mask) must line
    # up with the right chunks at every group boundary.
    import dist_sparse.attention.cpu as cpu

    # Two threads: groups are spread over two workers with separate dK/dV accumulators.
    monkeypatch.setattr(cpu, "_GROUP_ELEMS", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q, k, v = _inputs(seq=57)
        mask = torch.rand(2, 4, 57, 57, generator=torch.Generator().manual_seed(3)) < 0.9
        _check_against_reference(cpu_block_sparse_attention, q, k, v, _random_layout(4, 4, seed=9), 16, True)
        _check_against_reference(cpu_block_sparse_attention, q, k, v, _random_layout(4, 4, seed=9), 16, True, mask)
        assert torch.get_num_threads() == 2, "the caller's thread count must be restored"
    finally:
        torch.set_num_threads(threads)



@pytest.mark.parametrize("ratio", [4.0, 0.0])  # the default keeps the probabilities here; 0 always recomputes them
def test_cpu_backward_with_kept_and_recomputed_probabilities(monkeypatch, ratio):
    # The backward either reuses the forward's unnormalised probabilities with one factor per row and chunk, or
    # recomputes them: both equal the reference on split rows (whose factor comes from the log-sum-exp merge), fully
    # masked chunks, rows without blocks, padding slots and the causal diagonal. A forward without autograd keeps
    # nothing, and the kept probabilities are only the active blocks', bounded by the ratio.
    import dist_sparse.attention.cpu as cpu

    monkeypatch.setattr(cpu, "_KEPT_PROBS_RATIO", ratio)
    saved = []  # per backward: the element counts of what the forward saved
    backward = cpu._BlockSparseCPU.backward

    def spy(ctx, dout):
        saved.append([t.numel() for t in ctx.saved_tensors])
        return backward(ctx, dout)

    monkeypatch.setattr(cpu._BlockSparseCPU, "backward", staticmethod(spy))
    kept = lambda: len(saved[-1]) == 7  # noqa: E731  (q, k, v, out, lse; + probabilities and factors)
    nb, bs = 8, 8
    split = local_layout(nb, 0) | torch.zeros(1, nb, nb, dtype=torch.bool).index_fill_(1, torch.tensor([3]), True)
    q, k, v = _inputs(batch=1, heads=2, kv_heads=2, seq=nb * bs - 5)
    mask = torch.ones(1, 1, nb * bs - 5, nb * bs - 5, dtype=torch.bool)
    mask[..., 3 * bs:4 * bs, : 5 * bs] = False
    for layout, causal, m in ((split, False, None), (split, False, mask), (split, True, mask),
                              (local_layout(nb, 2, causal=True), True, None)):
        _check_against_reference(cpu_block_sparse_attention, q, k, v, layout, bs, causal, attn_mask=m)
        assert kept() == (ratio > 0)
    empty_row = local_layout(4, 1).repeat(4, 1, 1)
    empty_row[1, 2] = False
    q, k, v = _inputs(kv_heads=2, seq=57)
    _check_against_reference(cpu_block_sparse_attention, q, k, v, empty_row, 16, True)
    assert kept() == (ratio > 0)
    if ratio:
        assert saved[-1][5] <= ratio * 2 * (q.numel() + k.numel())
    with torch.no_grad():
        assert cpu_block_sparse_attention(q, k, v, empty_row, 16, True).grad_fn is None
    # the explicit choices override the ratio both ways (the `attention.keep_probabilities` setting)
    for choice in (True, False):
        out = block_sparse_attention(q, k, v, empty_row, 16, True, implementation="cpu", keep_probabilities=choice)
        out.sum().backward()
        assert kept() == choice
    with pytest.raises(ValueError, match="keep_probabilities"):
        block_sparse_attention(q, k, v, empty_row, 16, True, implementation="cpu", keep_probabilities="always")

def _attention_in_child(conn, q, k, v, layout, want):
    import dist_sparse.attention.cpu as cpu

    inherited = cpu._WORKERS.pool
    # torch's own intra-op threads cannot run in a forked child (GNU OpenMP hangs there, with or without this
    # pool), which is why DataLoader workers run with one thread; the kernel then runs without workers
    torch.set_num_threads(1)
    out = cpu_block_sparse_attention(q, k, v, layout, 16, True)
    pool = cpu._WORKERS.get(2)  # the inherited pool has no threads in this process: a new one must come back
    conn.send(((out - want).abs().max().item(), pool is not inherited, pool.submit(sum, [20, 22]).result(timeout=30)))
    conn.close()


def test_cpu_worker_pool_is_kept_and_remade_after_fork(monkeypatch):
    # The workers are one pool kept across calls; a forked child (a DataLoader worker, say) inherits the pool
    # object but not its threads, so the child must get a pool of its own instead of waiting on dead threads.
    import multiprocessing

    import dist_sparse.attention.cpu as cpu

    monkeypatch.setattr(cpu, "_GROUP_ELEMS", 1)  # one chunk per group: enough groups for two workers
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q, k, v = (t.detach() for t in _inputs(seq=64))
        layout = _random_layout(4, 4, seed=5)
        want = cpu_block_sparse_attention(q, k, v, layout, 16, True)
        pool = cpu._WORKERS.pool
        assert pool is not None and cpu._WORKERS.pid == os.getpid()
        assert torch.equal(cpu_block_sparse_attention(q, k, v, layout, 16, True), want)
        assert cpu._WORKERS.pool is pool, "the pool must be reused, not made per call"
        ctx = multiprocessing.get_context("fork")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_attention_in_child, args=(child, q, k, v, layout, want))
        proc.start()
        try:
            assert parent.poll(120), "the forked child hung"
            diff, fresh, answer = parent.recv()
        finally:
            proc.kill()
            proc.join(30)
        assert fresh and answer == 42
        assert diff <= TOL
    finally:
        torch.set_num_threads(threads)


def test_cpu_dense_mask_with_gqa_and_causal():
    q, k, v = _inputs(seq=48)
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(2, 1, 48, 48, generator=gen) < 0.7
    _check_against_reference(cpu_block_sparse_attention, q, k, v, _random_layout(1, 3), 16, True, attn_mask=mask)


def test_fully_inactive_rows_give_zeros_not_nan():
    q, k, v = _inputs(seq=64)
    layout = dense_layout(4).repeat(4, 1, 1)
    layout[1, 2, :] = False  # head 1, query block 2: nothing active
    mask = torch.ones(2, 1, 64, 64, dtype=torch.bool)
    mask[0, 0, 5, :] = False  # one token row masked out entirely by the dense mask
    out = _check_against_reference(cpu_block_sparse_attention, q, k, v, layout, 16, False, attn_mask=mask)
    assert out[:, 1, 32:48].abs().max().item() == 0.0
    assert out[0, :, 5].abs().max().item() == 0.0
    assert out[:, 0, 32:48].abs().max().item() > 0.0


def test_cpu_half_precision_keeps_dtype():
    q, k, v = _inputs(dtype=torch.bfloat16)
    out = cpu_block_sparse_attention(q, k, v, _random_layout(4, 4), 16, True)
    ref = reference_block_sparse_attention(q.float(), k.float(), v.float(), _random_layout(4, 4), 16, True)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max().item() < 2e-2
    out.float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad.float()).all()


@pytest.mark.parametrize("causal", [False, True])
def test_all_ones_layout_equals_sdpa(causal):
    q, k, v = _inputs(kv_heads=4, seq=64)
    out = block_sparse_attention(q, k, v, dense_layout(4), 16, causal=causal)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert (out - want).abs().max().item() <= TOL


def test_sparse_layout_ignores_inactive_blocks():
    # Changing keys/values only inside inactive blocks must not change the output.
    q, k, v = _inputs(kv_heads=4, seq=64)
    layout = local_layout(4, 0)
    out = block_sparse_attention(q, k, v, layout, 16)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, 16:] += 5.0
    v2[:, :, 16:] -= 3.0
    out2 = block_sparse_attention(q, k2, v2, layout, 16)
    assert torch.equal(out[:, :, :16], out2[:, :, :16])
    assert not torch.allclose(out[:, :, 16:], out2[:, :, 16:])


# ---------------------------------------------------------------------------------------------------------------------
# Dispatch and input checks
# ---------------------------------------------------------------------------------------------------------------------


def test_dispatch_choice_and_override(monkeypatch):
    from dist_sparse.attention import resolve_implementation

    monkeypatch.delenv("DIST_SPARSE_ATTENTION_IMPL", raising=False)
    assert resolve_implementation(torch.device("cpu")) == "cpu"
    if bsa.HAS_TRITON:
        assert resolve_implementation(torch.device("cuda")) == "triton"
    assert resolve_implementation(torch.device("meta")) == "reference"
    with pytest.raises(ValueError, match="CPU tensors"):
        resolve_implementation(torch.device("meta"), "cpu")
    monkeypatch.setenv("DIST_SPARSE_ATTENTION_IMPL", "reference")
    assert resolve_implementation(torch.device("cpu")) == "reference"
    assert resolve_implementation(torch.device("cpu"), "cpu") == "cpu"
    monkeypatch.setenv("DIST_SPARSE_ATTENTION_IMPL", "fast")
    with pytest.raises(ValueError, match="DIST_SPARSE_ATTENTION_IMPL"):
        resolve_implementation(torch.device("cpu"))


def test_dispatch_routes_to_the_chosen_implementation(monkeypatch):
    calls = []
    monkeypatch.setattr(bsa, "reference_block_sparse_attention",
                        lambda *a: calls.append("reference") or reference_block_sparse_attention(*a))
    q, k, v = _inputs()
    block_sparse_attention(q, k, v, dense_layout(4), 16, implementation="reference")
    assert calls == ["reference"]


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda q, k, v, lay: (q[0], k, v, lay), ValueError, "q must be a 4-D"),
    (lambda q, k, v, lay: (q, k[:, :, :32], v[:, :, :32], lay), ValueError, "seq"),
    (lambda q, k, v, lay: (q, k[:, :1].expand(2, 3, 64, 16), v[:, :1].expand(2, 3, 64, 16), lay), ValueError,
     "multiple of k/v heads"),
    (lambda q, k, v, lay: (q, k, v, lay[:, :3, :3]), ValueError, "layout must have shape"),
    (lambda q, k, v, lay: (q, k, v, lay.expand(3, 4, 4)), ValueError, "layout must have shape"),
    (lambda q, k, v, lay: (q, k, v, lay.float()), TypeError, "layout must be bool"),
    (lambda q, k, v, lay: (q.double(), k, v, lay), TypeError, "q must be float16"),
    (lambda q, k, v, lay: (q, k.half(), v, lay), TypeError, "share a dtype"),
])
def test_bad_inputs_raise_clear_errors(mutate, exc, match):
    q, k, v = _inputs()
    args = mutate(q.detach(), k.detach(), v.detach(), dense_layout(4))
    with pytest.raises(exc, match=match):
        block_sparse_attention(*args, 16)


def test_bad_block_size_and_mask():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="block_size"):
        block_sparse_attention(q, k, v, dense_layout(4), 0)
    with pytest.raises(ValueError, match="attn_mask"):
        block_sparse_attention(q, k, v, dense_layout(4), 16, attn_mask=torch.ones(2, 4, 64, 32, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels on CPU through the interpreter (in a subprocess started with TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def interpreted():
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    # Both our kernels and Triton's own @jit helpers (tl.zeros, ...) must have been built for the interpreter.
    assert bsa.triton_interpreting(), "kernels were not built for the interpreter"
    assert isinstance(tl.zeros, InterpretedFunction), "triton was imported before TRITON_INTERPRET=1 was set"
    return bsa


@in_child
@pytest.mark.parametrize("causal, kv_heads, seq, with_mask", [
    (False, 4, 64, False),
    (True, 2, 64, False),  # GQA
    (True, 1, 50, True),  # partial last block + dense mask
    (False, 2, 64, True),
])
def test_triton_interp_matches_reference(interpreted, causal, kv_heads, seq, with_mask):
    q, k, v = _inputs(kv_heads=kv_heads, seq=seq)
    nb = -(-seq // 16)
    layout = _random_layout(4, nb, seed=seq + kv_heads)
    mask = None
    if with_mask:
        mask = torch.rand(2, 1, seq, seq, generator=torch.Generator().manual_seed(2)) < 0.8
    _check_against_reference(interpreted.triton_block_sparse_attention, q, k, v, layout, 16, causal, mask)


@in_child
def test_triton_interp_fully_masked_rows_and_dispatch(interpreted):
    q, k, v = _inputs(heads=2, kv_heads=2, seq=32, dim=8)  # head_dim 8 is padded to 16 inside
    layout = torch.ones(2, 2, 2, dtype=torch.bool)
    layout[0, 1, :] = False
    out = _check_against_reference(interpreted.triton_block_sparse_attention, q, k, v, layout, 16, False)
    assert out[:, 0, 16:].abs().max().item() == 0.0
    via_api = block_sparse_attention(q, k, v, layout, 16, implementation="triton")
    assert (via_api - out).abs().max().item() <= TOL


N_CHILD_TESTS = 5


@needs_triton
@pytest.mark.skipif(_CHILD, reason="this process is the interpreter subprocess")
def test_triton_kernels_under_interpreter_subprocess():
    # A fresh interpreter process is the only reliable way to get TRITON_INTERPRET=1 in before triton is imported.
    run_interpreter_subprocess(__file__, "triton_interp", _CHILD_ENV, N_CHILD_TESTS)


def test_triton_refuses_cpu_tensors_without_interpreter():
    if not bsa.HAS_TRITON or bsa.triton_interpreting():
        pytest.skip("only meaningful when the kernels are compiled for a GPU")
    q, k, v = _inputs()
    with pytest.raises(RuntimeError, match="CUDA"):
        bsa.triton_block_sparse_attention(q, k, v, dense_layout(4), 16)


# ---------------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------------


@gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("causal", [False, True])
def test_triton_gpu_matches_reference(dtype, tol, causal):
    q, k, v = _inputs(batch=2, heads=8, kv_heads=2, seq=1000, dim=64, dtype=dtype, device="cuda")
    layout = bigbird_layout(-(-1000 // 64), 1, 1, 2, num_heads=8, causal=causal)
    _check_against_reference(bsa.triton_block_sparse_attention, q, k, v, layout, 64, causal, tol=tol)
    assert block_sparse_attention(q, k, v, layout, 64, causal=causal).is_cuda


@gpu
@needs_cuda
@needs_triton
def test_triton_gpu_block_128_and_mask():
    q, k, v = _inputs(batch=1, heads=4, kv_heads=4, seq=512, dim=128, device="cuda")
    mask = torch.rand(1, 1, 512, 512, device="cuda") < 0.9
    _check_against_reference(bsa.triton_block_sparse_attention, q, k, v, local_layout(4, 1), 128, True, mask,
                             tol=1e-4)
