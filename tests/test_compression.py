"""Gradient compression without DeepSpeed: compressors on hand-checkable tensors, exact error-feedback
conservation, DGC momentum correction and warm-up, the 2-rank exchange (average, pruned coordinates never sent,
byte counter == analytic size), config errors. The DeepSpeed side is tests/test_compression_deepspeed.py."""

import math

import pytest
import torch

from dist_sparse import config as C
from dist_sparse.compression import COMPRESSORS, ErrorFeedback, GradientCompression, Outgoing, SparseExchange
from dist_sparse.compression.adam import LocalMomentAdam
from dist_sparse.compression.base import keep_count
from dist_sparse.compression.exchange import payload_elements
from dist_sparse.compression.gradient import clip_local_
from dist_sparse.errors import ConfigError
from tests.distributed_utils import run_spawned

G = torch.tensor([0.5, -3.0, 1.0, 0.0, 2.5, -0.25, 4.0, -1.5])


def select(method, values, density, eligible=None, step=0, stream=0):
    return COMPRESSORS[method](seed=1).select(values, eligible, density, step=step, stream=stream)


def test_registry_matches_config_names():
    assert set(C.compression_names()) == {"none", *COMPRESSORS}


def test_keep_count_is_ceil_and_at_least_one():
    assert [keep_count(n, 0.25) for n in (0, 1, 3, 4, 5, 8)] == [0, 1, 1, 1, 2, 2]
    assert keep_count(100, 0.01) == 1 and keep_count(101, 0.01) == 2 and keep_count(7, 1.0) == 7


def test_topk_picks_largest_magnitudes():
    assert select("topk", G, 0.25).tolist() == [1, 6]  # |-3| and |4|
    assert select("topk", G, 3 / 8).tolist() == [1, 4, 6]
    assert select("topk", G, 1.0).tolist() == list(range(8))


def test_topk_never_selects_pruned_coordinates():
    eligible = torch.tensor([1, 0, 1, 1, 1, 1, 0, 1], dtype=torch.bool)  # the two largest are pruned
    assert select("topk", G, 0.5, eligible).tolist() == [2, 4, 7]  # ceil(0.5 * 6) = 3 of the kept ones
    assert select("topk", G, 1.0, eligible).tolist() == [0, 2, 3, 4, 5, 7]


def test_randomk_is_reproducible_uniform_and_eligible():
    eligible = torch.rand(1000, generator=torch.Generator().manual_seed(0)) < 0.5
    values = torch.randn(1000)
    a = select("randomk", values, 0.1, eligible, step=3, stream=7)
    assert torch.equal(a, select("randomk", values, 0.1, eligible, step=3, stream=7))  # same draw on resume
    assert not torch.equal(a, select("randomk", values, 0.1, eligible, step=4, stream=7))  # fresh each step
    assert a.numel() == keep_count(int(eligible.sum()), 0.1) and bool(eligible[a].all())
    assert torch.equal(a, torch.sort(a).values) and a.unique().numel() == a.numel()
    # independent of the values: random-k is not magnitude-based
    assert torch.equal(a, select("randomk", values * -7, 0.1, eligible, step=3, stream=7))
    # over many steps every eligible coordinate is drawn about equally often
    hits = torch.zeros(1000)
    for step in range(200):
        hits[select("randomk", values, 0.1, eligible, step=step, stream=7)] += 1
    assert hits[~eligible].sum() == 0 and 10 < float(hits[eligible].mean()) < 30 and float(hits[eligible].min()) > 5


def test_threshold_selects_above_a_sampled_threshold():
    comp = COMPRESSORS["threshold"](seed=0)
    small = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.3, 0.05])  # sample = whole tensor: exact top-k threshold
    assert comp.threshold(small, None, 2 / 6, step=0, stream=0) == 3.0
    assert comp.select(small, None, 2 / 6, step=0, stream=0).tolist() == [1, 3]
    values = torch.randn(100_000, generator=torch.Generator().manual_seed(1))
    eligible = torch.arange(100_000) % 3 != 0
    idx = comp.select(values, eligible, 0.01, step=0, stream=0)
    assert bool(eligible[idx].all())
    assert 0.5 * 667 < idx.numel() < 1.5 * 667  # about 1% of the eligible coordinates (sampled estimate)
    tau = comp.threshold(values, eligible, 0.01, step=0, stream=0)
    assert bool((values[idx].abs() >= tau).all()) and not bool((values[eligible].abs() >= tau).logical_xor(
        torch.zeros(100_000, dtype=torch.bool).index_fill_(0, idx, True)[eligible]).any())
    assert comp.select(torch.zeros(10), None, 0.1, step=0, stream=0).numel() == 0


def scattered(n, idx, values):
    return torch.zeros(n).index_put_((idx,), values)


@pytest.mark.parametrize("method", sorted(COMPRESSORS))
def test_error_feedback_conserves_exactly(method):
    gen = torch.Generator().manual_seed(0)
    eligible = torch.rand(500, generator=gen) < 0.7
    ef = ErrorFeedback(COMPRESSORS[method](seed=0), density=0.05)
    for step in range(5):
        g = torch.randn(500, generator=gen) * 10 ** (step - 2)
        old = ef.residual.get("w", torch.zeros(500)).clone()
        idx, values, _ = ef.compress("w", g, eligible, step, stream=0)
        total = (g + old).masked_fill(~eligible, 0)  # pruned coordinates are neither sent nor kept
        assert torch.equal(scattered(500, idx, values) + ef.residual["w"], total)
        assert bool(eligible[idx].all()) and bool((ef.residual["w"][~eligible] == 0).all())
        assert bool((ef.residual["w"][idx] == 0).all())


@pytest.mark.parametrize("method", sorted(COMPRESSORS))
def test_own_range_is_delivered_whole_and_the_rest_is_selected_outside_it(method):
    """With a local range (the rank's ZeRO partition), sent + own + residual == input + old residual, exactly;
    nothing inside the range is sent or kept; top-k/random-k still send keep_count(eligible) coordinates."""
    gen = torch.Generator().manual_seed(1)
    eligible = torch.rand(500, generator=gen) < 0.7
    ef = ErrorFeedback(COMPRESSORS[method](seed=0), density=0.05)
    start, length = 120, 200
    for step in range(4):
        g = torch.randn(500, generator=gen)
        old = ef.residual.get("w", torch.zeros(500)).clone()
        idx, values, own = ef.compress("w", g, eligible, step, stream=0, local=(start, length))
        total = (g + old).masked_fill(~eligible, 0)
        delivered = scattered(500, idx, values)
        delivered[start: start + length] += own
        assert torch.equal(delivered + ef.residual["w"], total)
        assert torch.equal(own, total[start: start + length])
        assert bool(((idx < start) | (idx >= start + length)).all()) and bool(eligible[idx].all())
        assert bool((ef.residual["w"][start: start + length] == 0).all())
        if COMPRESSORS[method].fixed_count:
            assert idx.numel() == keep_count(int(eligible.sum()), 0.05)
    # a rank that owns the whole tensor sends nothing and keeps nothing
    old = ef.residual["w"].clone()
    idx, values, own = ef.compress("w", torch.ones(500), eligible, 9, stream=0, local=(0, 500))
    assert idx.numel() == 0 and torch.equal(own, (old + 1).masked_fill(~eligible, 0))
    assert not ef.residual["w"].any()


@pytest.mark.parametrize("packed", [False, True])
def test_bf16_residuals_are_rounded_fp32_residuals_and_resume_exactly(packed):
    """compression.residual_dtype: bf16: every buffer (residual, momentum, Adam's second-moment buffers) is kept in
    bf16 between compress calls; each compress works in fp32 on the stored values and rounds back, so it equals the
    fp32 scheme started from the rounded buffers; a checkpoint (fp32 tensors) resumes bit for bit."""
    gen = torch.Generator().manual_seed(3)
    eligible = torch.rand(400, generator=gen) < 0.6

    def make(dtype):
        return ErrorFeedback(COMPRESSORS["topk"](seed=0), density=0.05, momentum=0.9, ema=True,
                             precondition_beta2=0.999, packed=packed, storage_dtype=dtype)

    ef, ref = make(torch.bfloat16), make(torch.float32)
    grads = [torch.randn(400, generator=gen) for _ in range(6)]
    for step, g in enumerate(grads[:3]):
        idx, values, _ = ef.compress("w", g, eligible, step, stream=0)
        # the reference starts each step from the stored (rounded) values
        ref.load_state_tensors(ef.state_tensors())
        ref.moment_steps = dict(ef.moment_steps)
        buffers = [t for k, t in ef.buffers().items() if not k.endswith("::layout")]
        assert len(buffers) == 4 and all(t.dtype == torch.bfloat16 for t in buffers)
        assert sum(t.numel() for t in buffers) == 4 * (int(eligible.sum()) if packed else 400)
    ridx, rvalues, _ = ref.compress("w", grads[3], eligible, 3, stream=0)
    saved = {k: t.clone() for k, t in ef.state_tensors().items()}
    idx, values, _ = ef.compress("w", grads[3], eligible, 3, stream=0)
    assert torch.equal(idx, ridx) and torch.equal(values, rvalues)
    assert torch.equal(ef.state_tensors()["w::residual"], ref.state_tensors()["w::residual"].bfloat16().float())
    # resume: a fresh bf16 store loaded from the checkpoint continues exactly as the uninterrupted one
    resumed = make(torch.bfloat16)
    resumed.load_state_tensors(saved)
    resumed.moment_steps = {"w": 3}
    a = resumed.compress("w", grads[3], eligible, 3, stream=0)
    assert torch.equal(a[0], idx) and torch.equal(a[1], values)
    assert all(torch.equal(resumed.state_tensors()[k], ef.state_tensors()[k]) for k in saved)
    # half the bytes of the fp32 store
    fp32 = {k: t for k, t in ref.buffers().items() if not k.endswith("::layout")}
    bf16 = {k: t for k, t in ef.buffers().items() if not k.endswith("::layout")}
    assert sum(t.nbytes for t in bf16.values()) * 2 == sum(t.nbytes for t in fp32.values())


def test_residual_dtype_is_checked():
    with pytest.raises(ConfigError, match="compression.residual_dtype"):
        C.from_dict({"compression": {"method": "topk", "residual_dtype": "fp16"}})


def test_without_error_feedback_the_rest_is_dropped():
    ef = ErrorFeedback(COMPRESSORS["topk"](), density=0.25, error_feedback=False)
    idx, values, _ = ef.compress("w", G, None, 0, 0)
    assert idx.tolist() == [1, 6] and values.tolist() == [-3.0, 4.0] and ef.residual == {}
    idx, values, _ = ef.compress("w", G, None, 1, 0)  # nothing carried over
    assert idx.tolist() == [1, 6]


def test_error_feedback_sends_delayed_coordinates():
    ef = ErrorFeedback(COMPRESSORS["topk"](), density=1 / 8)
    g = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.6])
    sent = [ef.compress("w", g, None, s, 0) for s in range(3)]
    # step 0 sends 1.0 (idx 0), keeps 0.6; step 1: idx 0 has 1.0, idx 7 has 1.2 -> sends idx 7
    assert [i.tolist() for i, _, _ in sent] == [[0], [7], [0]]
    assert sent[1][1].tolist() == [pytest.approx(1.2)] and sent[2][1].tolist() == [2.0]


def test_momentum_correction_is_dgc():
    """u <- m u + g, v <- v + u; send top-k of v; u and v zeroed where sent (momentum factor masking)."""
    m = 0.9
    ef = ErrorFeedback(COMPRESSORS["topk"](), density=0.5, momentum=m)
    g1, g2 = torch.tensor([1.0, 0.5, 0.0, -2.0]), torch.tensor([0.5, 0.5, 0.1, 0.0])
    idx, values, _ = ef.compress("w", g1, None, 0, 0)  # u = v = g1: send idx 0 and 3
    assert idx.tolist() == [0, 3] and values.tolist() == [1.0, -2.0]
    assert ef.velocity_momentum["w"].tolist() == [0.0, 0.5, 0.0, 0.0] and ef.residual["w"].tolist() == [0, 0.5, 0, 0]
    idx, values, _ = ef.compress("w", g2, None, 1, 0)
    u = torch.tensor([0.5, 0.5 * m + 0.5, 0.1, 0.0])
    v = torch.tensor([0.0, 0.5, 0.0, 0.0]) + u
    assert idx.tolist() == [0, 1] and torch.equal(values, v[[0, 1]])
    assert torch.equal(ef.residual["w"], torch.tensor([0.0, 0.0, v[2], 0.0]))
    assert torch.equal(ef.velocity_momentum["w"], torch.tensor([0.0, 0.0, u[2], 0.0]))


def test_warmup_ramps_density_exponentially_from_dense():
    ef = ErrorFeedback(COMPRESSORS["topk"](), density=0.001, warmup_steps=4)
    assert [ef.density(s) for s in range(6)] == pytest.approx([1.0, 0.001 ** 0.25, 0.001 ** 0.5, 0.001 ** 0.75,
                                                               0.001, 0.001])
    assert ErrorFeedback(COMPRESSORS["topk"](), density=0.1).density(0) == 0.1


# ---------------------------------------------------------------------------------------------------------------
# the exchange on 2 ranks


def _exchange_worker(rank, world, method):
    """Every rank compresses its own gradients; the result must equal the average of what each rank sent."""
    cfg = C.CompressionConfig(method=method, density=0.1, min_tensor_size=20)
    comp = GradientCompression(cfg, seed=5)
    gen = torch.Generator().manual_seed(rank)
    masks = {"w": torch.arange(1000) % 4 != 0}  # a sparsified tensor; "b" (small) and "e" are dense parameters
    for step in range(3):
        grads = {"w": torch.randn(1000, generator=gen), "b": torch.randn(10, generator=gen),
                 "e": torch.randn(300, generator=gen)}
        before = {n: comp.feedback.residual.get(n, torch.zeros(grads[n].numel())).clone() for n in grads}
        out = comp.run(grads, masks, step)
        sent = {n: scattered(grads[n].numel(), comp.last_sent[n],
                             (grads[n] + before[n]).masked_fill(~masks.get(n, torch.ones(grads[n].numel(),
                                                                                          dtype=torch.bool)), 0)
                             [comp.last_sent[n]]) for n in grads}
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, sent)
        for n in grads:
            torch.testing.assert_close(out[n], sum(g[n] for g in gathered) / world, rtol=0, atol=1e-6)
        # pruned coordinates are never sent (the sent indices themselves), small tensors go dense
        assert bool(masks["w"][comp.last_sent["w"]].all())
        assert comp.last_sent["b"].tolist() == list(range(10)) and bool((comp.feedback.residual["b"] == 0).all())
        # the byte counter equals the analytic size of the payload (+ the count header for threshold)
        n_pos = {"w": int(masks["w"].sum()), "b": 10, "e": 300}
        mine = sum(payload_elements(comp.last_sent[n].numel(), n_pos[n]) for n in grads)
        longest = torch.tensor([mine])
        torch.distributed.all_reduce(longest, op=torch.distributed.ReduceOp.MAX)
        header = 0 if COMPRESSORS[method].fixed_count else 4 * len(grads)
        assert comp.exchange.last_bytes == header + 4 * int(longest)
        assert comp.exchange.collectives == (1 if COMPRESSORS[method].fixed_count else 2)
        if method == "topk":  # analytic: ceil(0.1 * 750) = 75 indices + values, 10 dense, ceil(0.1 * 300) = 30 x 2
            assert comp.exchange.last_bytes == 4 * (2 * 75 + 10 + 2 * 30)
    # the RigL dense step: all coordinates of "w" (pruned ones too), no residual change; "e" skipped
    residual = {n: t.clone() for n, t in comp.feedback.residual.items()}
    grads = {"w": torch.full((1000,), float(rank + 1)), "b": torch.zeros(10), "e": torch.ones(300)}
    out = comp.run(grads, masks, 3, dense={"w"}, skip={"e"})
    assert set(out) == {"w", "b"} and torch.equal(out["w"], torch.full((1000,), 1.5))
    assert all(torch.equal(residual[n], comp.feedback.residual[n]) for n in residual)
    # a dense step the optimizer applies (a growth window's): unpruned coordinates deliver gradient + residual in
    # full (the residual drops to 0), pruned ones the raw gradient
    before = comp.feedback.residual["w"].clone()
    assert bool(before.abs().sum() > 0)
    grads = {"w": torch.randn(1000, generator=gen), "b": torch.randn(10, generator=gen), "e": torch.ones(300)}
    mine = torch.where(masks["w"], grads["w"] + before, grads["w"])
    out = comp.run(grads, masks, 4, dense={"w"}, skip={"e"}, dense_applied=True)
    reference = mine.clone()
    torch.distributed.all_reduce(reference)
    torch.testing.assert_close(out["w"], reference / world, rtol=0, atol=1e-6)
    assert not bool(comp.feedback.residual["w"].any()) and comp.last_sent["w"].numel() == 1000




def _owned_exchange_worker(rank, world, method, density):
    """ZeRO-1/2 layout: each rank owns a range of each tensor; over its own range the result is the average of its
    own whole contribution and what the other ranks sent; nothing inside a rank's own range leaves it."""
    cfg = C.CompressionConfig(method=method, density=density, min_tensor_size=20)
    comp = GradientCompression(cfg, seed=5)
    gen = torch.Generator().manual_seed(rank)
    masks = {"w": torch.arange(1000) % 4 != 0}
    owned = {"w": [(0, 640), (640, 360)], "b": [(0, 10), (10, 0)], "e": [(0, 0), (0, 300)]}
    for step in range(3):
        grads = {"w": torch.randn(1000, generator=gen), "b": torch.randn(10, generator=gen),
                 "e": torch.randn(300, generator=gen)}
        before = {n: comp.feedback.residual.get(n, torch.zeros(grads[n].numel())).clone() for n in grads}
        out = comp.run(grads, masks, step, owned=owned)
        acc = {n: (grads[n] + before[n]).masked_fill(~masks.get(n, torch.ones(grads[n].numel(), dtype=torch.bool)),
                                                     0) for n in grads}
        sent = {n: scattered(grads[n].numel(), comp.last_sent[n], acc[n][comp.last_sent[n]]) for n in grads}
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, {"sent": sent, "acc": acc})
        for n in grads:
            start, length = owned[n][rank]
            idx = comp.last_sent[n]
            assert bool(((idx < start) | (idx >= start + length)).all())
            expected = sum(g["sent"][n] for g in gathered)
            expected[start: start + length] = sum(
                (g["acc"][n] if r == rank else g["sent"][n])[start: start + length] for r, g in enumerate(gathered))
            torch.testing.assert_close(out[n][start: start + length], expected[start: start + length] / world,
                                       rtol=0, atol=1e-6)
            if density == 1.0:  # everything is delivered: the plain average over the own range
                reference = acc[n].clone()
                torch.distributed.all_reduce(reference)
                torch.testing.assert_close(out[n][start: start + length], (reference / world)[start: start + length])
        # one collective for top-k/random-k: every rank's count is derived locally from masks and ranges
        assert comp.exchange.collectives == (1 if COMPRESSORS[method].fixed_count else 2)
        # dense encodings cover only the coordinates outside the sender's own range
        start, length = owned["w"][rank]
        n_pos = {"w": 750 - int(masks["w"][start: start + length].sum()), "b": 10 - owned["b"][rank][1],
                 "e": 300 - owned["e"][rank][1]}
        mine = sum(payload_elements(comp.last_sent[n].numel(), n_pos[n]) for n in grads)
        longest = torch.tensor([mine])
        torch.distributed.all_reduce(longest, op=torch.distributed.ReduceOp.MAX)
        header = 0 if COMPRESSORS[method].fixed_count else 4 * len(grads)
        assert comp.exchange.last_bytes == header + 4 * int(longest)


    # the RigL dense step: raw gradients of "w", each rank sending only outside its own range
    grads = {"w": torch.randn(1000, generator=gen), "b": torch.randn(10, generator=gen), "e": torch.ones(300)}
    out = comp.run(grads, masks, 3, dense={"w"}, skip={"e"}, owned=owned)
    reference = grads["w"].clone()
    torch.distributed.all_reduce(reference)
    start, length = owned["w"][rank]
    torch.testing.assert_close(out["w"][start: start + length], (reference / world)[start: start + length])
    outside = [1000 - ln for _, ln in owned["w"]]
    assert comp.last_sent["w"].numel() == outside[rank]
    assert comp.exchange.last_bytes == 4 * max(o + 10 - ob for o, (_, ob) in zip(outside, owned["b"])) + (
        0 if COMPRESSORS[method].fixed_count else 4 * 2)




def _density_one_worker(rank, world):
    gen = torch.Generator().manual_seed(10 + rank)
    grads = {"a": torch.randn(64, generator=gen), "b": torch.randn(7, generator=gen)}
    out = GradientCompression(C.CompressionConfig(method="topk", density=1.0)).run(grads, {}, 0)
    for n, g in grads.items():
        reference = g.clone()
        torch.distributed.all_reduce(reference)
        torch.testing.assert_close(out[n], reference / world)


def _two_rank_exchanges_worker(rank, world):
    """Every two-rank exchange property in one spawn (process start-up dominates each): per method the average
    equals what was sent; with ZeRO-1/2 ranges the own range stays local; density 1.0 is the all-reduce average."""
    for method in ("topk", "randomk", "threshold"):
        _case(f"exchange averages what was sent, {method}", _exchange_worker, rank, world, method)
    for method, density in (("topk", 0.1), ("randomk", 0.1), ("threshold", 0.1), ("topk", 1.0)):
        _case(f"own range kept local, {method} at {density}", _owned_exchange_worker, rank, world, method, density)
    _case("density 1.0 equals the all-reduce average", _density_one_worker, rank, world)


def _case(what, fn, *args):
    try:
        fn(*args)
    except Exception as exc:  # name the case: the spawn reports only the exception
        raise AssertionError(f"{what}: {exc}") from exc


def test_two_rank_exchanges():
    run_spawned(_two_rank_exchanges_worker, 2)


def test_exchange_single_process_is_identity_average():
    ex = SparseExchange()
    item = Outgoing("x", 5, None, torch.tensor([1, 3]), torch.tensor([2.0, -1.0]))
    assert ex.run([item], fixed_counts=True)["x"].tolist() == [0.0, 2.0, 0.0, -1.0, 0.0] and ex.last_bytes == 0


# ---------------------------------------------------------------------------------------------------------------
# momentum correction for Adam: moments on the local gradient (dist_sparse.compression.adam)


def _adam_pair(opt_cls, **kw):
    torch.manual_seed(0)
    w = torch.randn(12)
    ref, ours = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    return ref, ours, opt_cls([ref], lr=0.01, **kw), opt_cls([ours], lr=0.01, **kw)


@pytest.mark.parametrize("opt_cls,kw", [(torch.optim.AdamW, {"weight_decay": 0.1}),
                                        (torch.optim.Adam, {"betas": (0.8, 0.99)}),
                                        (torch.optim.AdamW, {})])
def test_adam_momentum_correction_at_density_one_is_adam(opt_cls, kw):
    """One rank, nothing dropped: the first moment accumulated before the exchange (EMA form, error feedback,
    no momentum masking) + the second moment estimated by the exchange (on one rank: exactly Adam's) reproduce
    torch's Adam/AdamW step by step."""
    ref, ours, opt_ref, opt = _adam_pair(opt_cls, **kw)
    adam = LocalMomentAdam(opt)
    ef = ErrorFeedback(COMPRESSORS["topk"](), density=1.0, momentum=adam.beta1, ema=True,
                       precondition_beta2=adam.beta2)
    g = torch.Generator().manual_seed(1)
    for step in range(12):
        grad = torch.randn(12, generator=g) * (1 + step)
        ref.grad = grad.clone()
        opt_ref.step()
        idx, values, _ = ef.compress("w", grad, None, step, 0)
        sent = torch.zeros(12).index_put_((idx,), values)
        ours.grad = sent
        adam.stage([(ours.data, ef.second_moment_estimate("w"), sent)])
        adam.step()
        torch.testing.assert_close(ours.data, ref.data, msg=f"step {step}")
        torch.testing.assert_close(opt.state[ours]["exp_avg_sq"], opt_ref.state[ref]["exp_avg_sq"])
    assert float(opt.state[ours]["step"]) == 12


def test_adam_momentum_correction_scales_the_local_gradient_like_the_engine():
    """The engine clips the average it received (here by 1/4): the second moment gets the same factor (squared),
    so the step equals Adam on the clipped gradient."""
    ref, ours, opt_ref, opt = _adam_pair(torch.optim.AdamW)
    adam = LocalMomentAdam(opt)
    grad = torch.linspace(-1, 1, 12)
    ref.grad = grad / 4
    opt_ref.step()
    ours.grad = (1 - adam.beta1) * grad / 4  # first step: m = (1 - b1) g, clipped
    adam.stage([(ours.data, (1 - adam.beta2) * grad.square(), (1 - adam.beta1) * grad)])
    adam.step()
    torch.testing.assert_close(ours.data, ref.data)


def test_adam_momentum_correction_without_moment_masking_delivers_every_first_moment():
    """Top-k with error feedback on Adam's EMA momentum: over time the sent values sum to the sum of the first
    moments (minus what is still in the residual): nothing is lost, unlike DGC's momentum factor masking."""
    ef = ErrorFeedback(COMPRESSORS["topk"](), density=0.25, momentum=0.9, ema=True)
    g = torch.Generator().manual_seed(2)
    u, total_u, total_sent = torch.zeros(8), torch.zeros(8), torch.zeros(8)
    for step in range(30):
        grad = torch.randn(8, generator=g)
        u = 0.9 * u + 0.1 * grad
        total_u += u
        idx, values, _ = ef.compress("w", grad, None, step, 0)
        total_sent.index_add_(0, idx, values)
        torch.testing.assert_close(ef.velocity_momentum["w"], u)  # the momentum is never masked
    torch.testing.assert_close(total_sent + ef.residual["w"], total_u)


def test_adam_selection_ranks_by_the_step_a_coordinate_would_make():
    """With Adam preconditioning top-k ranks |acc| / sqrt(v): a coordinate with a large but noisy gradient loses
    to a small consistent one whose pending step is larger."""
    ef = ErrorFeedback(COMPRESSORS["topk"](), density=0.5, momentum=0.5, ema=True, precondition_beta2=0.99)
    ef.second_moment["w"] = torch.tensor([16.0, 0.01])  # coordinate 0 has been large (and noisy) so far
    g = torch.tensor([1.0, 0.1])
    idx, values, _ = ef.compress("w", g, None, 0, 0)
    # acc = u = 0.5 g = [0.5, 0.05]; v = 0.99 v + 0.01 g^2; steps 0.5 / 3.98 < 0.05 / 0.1
    assert idx.tolist() == [1] and values.tolist() == [pytest.approx(0.05)]
    torch.testing.assert_close(ef.second_moment["w"], torch.tensor([0.99 * 16 + 0.01, 0.99 * 0.01 + 0.01 * 0.01]))
    # without preconditioning the same accumulator ranks by magnitude
    plain = ErrorFeedback(COMPRESSORS["topk"](), density=0.5, momentum=0.5, ema=True)
    assert plain.compress("w", g, None, 0, 0)[0].tolist() == [0]
    # pruned coordinates keep no second moment
    ef.compress("w", torch.tensor([4.0, 0.1]), torch.tensor([True, False]), 1, 0)
    assert ef.second_moment["w"][1] == 0 and "w::second_moment" in ef.state_tensors()


def test_second_moment_estimate_for_the_average_of_n_ranks():
    """v_local / N + (1 - 1/N) avg(u^2): N = 1 is the local second moment itself."""
    one = ErrorFeedback(COMPRESSORS["topk"](), density=1.0, momentum=0.5, ema=True, precondition_beta2=0.5)
    two = ErrorFeedback(COMPRESSORS["topk"](), density=1.0, momentum=0.5, ema=True, precondition_beta2=0.5, world=2)
    for ef in (one, two):
        for g in (torch.tensor([2.0, -1.0]), torch.tensor([-2.0, 3.0])):
            ef.compress("w", g, None, 0, 0)
    # u: [1, -0.5] then [-0.5, 1.25], bias-corrected (1 - 0.5^t): [2, -1] then [-2/3, 5/3]; v = avg(g^2): [2, 0.5]
    # then [3, 4.75]; avg(u_hat^2): [2, 0.5] then [(2 + 4/9) / 2, (0.5 + 25/9) / 2]
    torch.testing.assert_close(one.second_moment_estimate("w"), torch.tensor([3.0, 4.75]))
    w = torch.tensor([(2 + 4 / 9) / 2, (0.5 + 25 / 9) / 2])
    torch.testing.assert_close(two.second_moment_estimate("w"), torch.tensor([1.5, 2.375]) + w / 2)
    assert {k.rsplit("::", 1)[1] for k in two.state_tensors()} == {"residual", "momentum", "second_moment",
                                                                   "momentum_square", "moment_steps"}
    # the momentum's update count survives a checkpoint (it sets the bias correction)
    again = ErrorFeedback(COMPRESSORS["topk"](), density=1.0, momentum=0.5, ema=True, precondition_beta2=0.5, world=2)
    again.load_state_tensors(two.state_tensors())
    assert again.moment_steps == {"w": 2}


def test_local_clipping_scales_by_the_norm_over_eligible_coordinates():
    grads = {"a": torch.tensor([3.0, 100.0]), "b": torch.tensor([4.0]), "c": torch.tensor([50.0])}
    # a's pruned coordinate (100) and the skipped tensor c do not count: norm 5, clipped to 1
    norm = clip_local_(grads, {"a": torch.tensor([True, False])}, 1.0, skip={"c"})
    assert norm == pytest.approx(5.0)
    torch.testing.assert_close(grads["b"], torch.tensor([4.0 / (5.0 + 1e-6)]))
    assert grads["a"][0] == pytest.approx(0.6, rel=1e-5) and grads["c"].item() == 50.0
    small = {"a": torch.tensor([0.3, 0.4])}
    assert clip_local_(small, {}, 1.0) == pytest.approx(0.5) and small["a"].tolist() == pytest.approx([0.3, 0.4])


def test_adam_momentum_correction_refuses_what_it_does_not_cover():
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ConfigError, match="SGD") as err:
        LocalMomentAdam(torch.optim.SGD(p, lr=0.1))
    assert err.value.key == "compression.momentum_correction"
    with pytest.raises(ConfigError, match="decoupled"):
        LocalMomentAdam(torch.optim.Adam(p, weight_decay=0.1))
    with pytest.raises(ConfigError, match="amsgrad"):
        LocalMomentAdam(torch.optim.AdamW(p, amsgrad=True))
    with pytest.raises(ConfigError, match="beta1"):
        LocalMomentAdam(torch.optim.AdamW([{"params": p[:1]}, {"params": [torch.nn.Parameter(torch.zeros(2))],
                                                                 "betas": (0.5, 0.9)}]))
    adam = LocalMomentAdam(torch.optim.AdamW(p))
    p[0].grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="stage"):
        adam.step()


# ---------------------------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize("overrides,key", [
    (["compression.method=top-k"], "compression.method"),
    (["compression.density=0"], "compression.density"),
    (["compression.density=1.5"], "compression.density"),
    (["compression.density=.nan"], "compression.density"),
    (["compression.density='0.1'"], "compression.density"),
    (["compression.warmup_steps=-1"], "compression.warmup_steps"),
    (["compression.min_tensor_size=-5"], "compression.min_tensor_size"),
    (["compression.error_feedback=yes please"], "compression.error_feedback"),
    (["compression.ratio=0.1"], "compression.ratio"),
    (["compression.method=topk", "compression.error_feedback=false", "compression.momentum_correction=true"],
     "compression.momentum_correction"),
    (["compression.method=topk", "compression.momentum_correction=true",
      "deepspeed.optimizer={type: Lamb, params: {lr: 0.1}}"], "compression.momentum_correction"),
    (["compression.method=topk", "deepspeed.zero_optimization.offload_optimizer={device: cpu}"],
     "compression.method"),
    # fp16: at ZeRO-0 DeepSpeed does not scale the loss as the exchange unscales it; compact state's packed store
    (["compression.method=topk", "deepspeed.fp16={enabled: true}", "deepspeed.zero_optimization.stage=0"],
     "compression.method"),
    (["compression.method=topk", "deepspeed.fp16={enabled: true}", "deepspeed.zero_optimization.stage=2",
      "sparsity.method=rigl", "sparsity.compact_state=true"], "compression.method"),
])
def test_bad_compression_config_names_its_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        C.load(None, overrides)
    assert err.value.key == key and key in str(err.value)


def test_compression_config_defaults_and_overrides():
    cfg = C.load(None, ["compression.method=randomk", "compression.density=0.02", "compression.warmup_steps=10"])
    c = cfg.compression
    # momentum correction follows the optimizer: the CLI's default optimizer is AdamW, so it is on
    assert (c.method, c.density, c.error_feedback, c.momentum_correction, c.warmup_steps, c.min_tensor_size) == (
        "randomk", 0.02, True, True, 10, 0)
    assert cfg.to_dict()["compression"]["density"] == 0.02
    # momentum correction: SGD only; through dist_sparse.initialize (the CLI checkpoints Adam only, refused there)
    sgd = {"optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}}
    ds, _, comp = C.split_deepspeed_json({**sgd, "compression": {"method": "topk", "momentum_correction": True}})
    assert comp.momentum_correction and "compression" not in ds and "sparsity" not in ds
    with pytest.raises(ConfigError, match="dist_sparse.initialize") as err:
        C.load(None, ["deepspeed.optimizer={type: SGD, params: {lr: 0.1, momentum: 0.9}}",
                      "compression.method=topk", "compression.momentum_correction=true"])
    assert err.value.key == "compression.momentum_correction"
    with pytest.raises(ConfigError, match="momentum SGD") as err:
        C.split_deepspeed_json({"optimizer": {"type": "Lamb"},
                                "compression": {"method": "topk", "momentum_correction": True}})
    # with Adam/AdamW (the default optimizer) the CLI takes it: the moments stay local (compression/adam.py)
    assert C.load(None, ["compression.method=topk", "compression.momentum_correction=true"]).compression.enabled
    assert not C.load(None, []).compression.enabled
    assert set(C.CompressionConfig.__dataclass_fields__) == {"method", "density", "error_feedback",
                                                             "momentum_correction", "warmup_steps",
                                                             "min_tensor_size", "scope", "residual_dtype"}
    # ZeRO-3 without compression stays fine
    assert C.load(None, ["deepspeed.zero_optimization.stage=3"]).zero_stage == 3
    # compression alone works at ZeRO-3
    assert C.load(None, ["compression.method=topk", "deepspeed.zero_optimization.stage=3"]).compression.enabled
    assert math.isclose(C.load(None, ["compression.density=1"]).compression.density, 1.0)


def test_count_sketch_energy_is_exact_without_collisions_and_unbiased_with_them():
    from dist_sparse.compression import sketch

    x = torch.randn(10, generator=torch.Generator().manual_seed(0))
    assert sketch.buckets(10) == 10  # fewer coordinates than buckets: one per bucket, |sign| = 1
    assert sketch.energy(sketch.count_sketch(x, 0, 3, 1), 1) == pytest.approx(float(x.square().sum()), rel=1e-6)
    y = torch.randn(4000, generator=torch.Generator().manual_seed(1))
    draws = torch.tensor([sketch.energy(sketch.count_sketch(y, 0, step, 2), 1) for step in range(400)])
    exact = float(y.square().sum())
    # 16 buckets: one draw is off by ~35%, the mean of 400 independent draws by ~2%
    assert abs(float(draws.mean()) / exact - 1) < 0.08 and float(draws.std()) / exact > 0.1
    # linear: the sketch of a sum is the sum of the sketches (what the all-reduce relies on)
    a, b = y[:2000], y[2000:]
    torch.testing.assert_close(sketch.count_sketch(a + b, 0, 5, 2),
                               sketch.count_sketch(a, 0, 5, 2) + sketch.count_sketch(b, 0, 5, 2))


def test_second_moment_blend_is_fitted_to_the_energy_of_the_average():
    """lam v + (1 - lam) avg(u^2) sums to the running energy of the averaged gradient; lam within [1/N, 1]."""
    ef = ErrorFeedback(COMPRESSORS["topk"](), density=1.0, momentum=0.5, ema=True, precondition_beta2=0.5, world=2)
    assert ef.wants_energy
    g = torch.tensor([2.0, -1.0, 0.5, 0.0])
    ef.compress("w", g, None, 0, 0, energy=3.0)
    v, w = ef.second_moment["w"], ef.momentum_square["w"]  # 0.5 g^2, and 0.5 g^2 (u bias-corrected = g)
    assert ef.blend["w"] == 0.5  # v == w: undetermined, 1/N
    g2 = torch.tensor([-2.0, 1.0, 0.5, 1.0])
    ef.compress("w", g2, None, 1, 0, energy=6.0)
    v, w = ef.second_moment["w"], ef.momentum_square["w"]
    energy = 0.5 * (0.5 * 3.0) + 0.5 * 6.0  # running averages start at 0, like v and avg(u^2)
    lam = (energy - float(w.sum())) / (float(v.sum()) - float(w.sum()))
    assert 0.5 < lam < 1 and ef.blend["w"] == pytest.approx(lam)
    torch.testing.assert_close(ef.second_moment_estimate("w"), lam * v + (1 - lam) * w)
    torch.testing.assert_close(float(ef.second_moment_estimate("w").sum()), energy)
    # avg(u^2) above v (early on, or a steady gradient): the same fit, not the fallback
    assert ef._fit_blend(1.2, 1.0, 2.0) == pytest.approx(0.8) and ef._fit_blend(0.9, 1.0, 2.0) == 1.0
    assert ef._fit_blend(5.0, 2.0, 2.0) == 0.5  # undetermined
    # clamped: an energy above the local second moment means fully correlated ranks (lam = 1)
    ef.compress("w", g2, None, 2, 0, energy=1e6)
    assert ef.blend["w"] == 1.0 and torch.equal(ef.second_moment_estimate("w"), ef.second_moment["w"])
    # a restored checkpoint restores the running energy and the blend exactly
    again = ErrorFeedback(COMPRESSORS["topk"](), density=1.0, momentum=0.5, ema=True, precondition_beta2=0.5, world=2)
    again.load_state_tensors(ef.state_tensors())
    assert again.energy == ef.energy and again.blend == ef.blend


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_packed_buffers_equal_dense_buffers_bit_for_bit(momentum):
    """``packed=True`` (compact state) keeps each masked tensor's buffers as its unpruned coordinates only; with
    masks that change between steps (pruned and regrown coordinates), an own range, Adam's preconditioned ranking
    and the energy fit, everything sent, the second-moment estimate and the checkpoint tensors equal the dense
    buffers' exactly, and the stored residual has one value per unpruned coordinate."""
    gen = torch.Generator().manual_seed(3)
    kw = dict(momentum=momentum, ema=momentum is not None, precondition_beta2=0.999 if momentum else None, world=2)
    dense, packed = (ErrorFeedback(COMPRESSORS["topk"](seed=0), 0.05, True, packed=p, **kw) for p in (False, True))
    eligible = torch.rand(400, generator=gen) < 0.3
    for step in range(8):
        if step % 3 == 2:  # a mask update: some coordinates pruned, others regrown
            eligible = eligible ^ (torch.rand(400, generator=gen) < 0.1)
        g, energy = torch.randn(400, generator=gen), float(torch.rand(1, generator=gen)) * 100
        outs = [ef.compress("w", g, eligible, step, stream=0, local=(100, 50), energy=energy)
                for ef in (dense, packed)]
        for a, b in zip(*outs):
            assert torch.equal(a, b), step
        if momentum is not None:
            assert torch.equal(dense.second_moment_estimate("w", 100, 50), packed.second_moment_estimate("w", 100, 50))
        assert packed.residual["w"].numel() == int(eligible.sum()) and dense.residual["w"].numel() == 400
    sd, sp = dense.state_tensors(), packed.state_tensors()
    assert set(sd) == set(sp) and all(torch.equal(sd[k], sp[k]) for k in sd)
    assert "w::layout" in packed.buffers() and "w::layout" not in dense.buffers()


def test_momentum_correction_default_follows_the_optimizer():
    """Unset, momentum correction is on with error feedback for Adam/AdamW and for momentum SGD in one's own loop
    (the best measured recipes), off for plain SGD, for SGD under dist-sparse train (which cannot checkpoint SGD)
    and without error feedback; an explicit value is kept; an optimizer built in code decides at attach."""
    def mc(*over, ds=None):
        return C.load(None, list(over)).compression.momentum_correction if ds is None else \
            C.split_deepspeed_json({**ds, "compression": dict(o.split("=") for o in over)})[2].momentum_correction

    assert mc("compression.method=topk") is True
    assert mc("compression.method=topk", "deepspeed.optimizer={type: Adam, params: {lr: 0.001}}") is True
    assert mc("compression.method=topk", "compression.error_feedback=false") is False
    assert mc("compression.method=topk", "compression.momentum_correction=false") is False
    assert mc("compression.method=topk", "deepspeed.optimizer={type: SGD, params: {lr: 0.1, momentum: 0.9}}") is False
    assert mc() is False  # no compression: nothing to correct
    assert mc("method=topk", ds={"optimizer": {"type": "AdamW"}}) is True
    assert mc("method=topk", ds={"optimizer": {"type": "SGD"}}) is False  # plain SGD: no momentum to move
    # momentum SGD in a loop of one's own: DGC (bench/bench_compression_sgd.py measured it better)
    assert mc("method=topk", ds={"optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}}) is True
    assert mc("method=topk", ds={}) is None  # the optimizer comes from code: resolved_for() at attach
    c = C.CompressionConfig(method="topk")
    assert c.resolved_for("adamw").momentum_correction and not c.resolved_for("SGD").momentum_correction
    assert c.resolved_for("SGD", 0.9).momentum_correction
    assert not c.resolved_for("SGD", 0.9, checkpoints_sgd=False).momentum_correction  # dist-sparse train
    assert not C.CompressionConfig(method="topk", error_feedback=False).resolved_for("SGD", 0.9).momentum_correction
    assert C.CompressionConfig(method="topk", momentum_correction=False).resolved_for("adamw").momentum_correction \
        is False


def test_adam_momentum_correction_floors_the_second_moment_where_this_rank_saw_no_gradient():
    """The rank owning a coordinate may have seen no gradient there while the others did (an embedding row of a
    token only they had): its local second moment is ~0 while the received first moment is not. Adam's own moments
    obey m^2 <= v (1 - b1)^2 / ((1 - b2)(1 - b1^2 / b2)); as a floor on v it keeps the step a few lr, where
    dividing by the local estimate would step by ~lr * m / eps."""
    ref, ours, _, opt = _adam_pair(torch.optim.Adam)  # (no weight decay: the step is Adam's alone)
    adam = LocalMomentAdam(opt)
    b1, b2 = adam.beta1, adam.beta2
    avg = torch.linspace(-1, 1, 12)  # the averaged gradient; this rank's own was 0
    ours.grad = (1 - b1) * avg  # first step: the received first moment
    before = ours.data.clone()
    adam.stage([(ours.data, torch.zeros(12), ours.grad.clone())])
    adam.step()
    step = (ours.data - before).abs()
    bound = 0.01 / (1 - b1 ** 2 / b2) ** 0.5  # lr / sqrt(1 - b1^2 / b2): Adam's largest first step
    assert float(step.max()) <= bound * (1 + 1e-5) and float(step.min()) >= 0
    assert float(step.max()) > 0.01  # (not the local estimate's: that would be ~1e5 lr)
