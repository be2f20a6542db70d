"""Sparse kernels in the training step (``sparsity.kernel``): block-sparse runs equal dense-kernel runs.

The DeepSpeed test runs tests/workers/kernels_worker.py under torchrun (2 CPU ranks, ZeRO-1, 2 and 3, ZeRO-3 with
compact state and packed shards, ZeRO-1/2 with compact state and the weights held as blocks; RigL with 16x16 blocks,
20 steps); the others check the component in one process
with a stand-in sparsifier.
"""

import json

import pytest
import torch
from dist_sparse.kernels.block_sparse_linear import expand_layout
from torch import nn

from dist_sparse.config import ConfigError, SparsityConfig, check_kernel_with_deepspeed, from_dict
from dist_sparse.integration.kernels import SparseKernels, _Layer
from dist_sparse.patterns import parse_pattern
from dist_sparse.step import StepPlan
from tests.distributed_utils import run_torchrun

# float rounding: the operator sums each output over blocks in another order than one dense matmul does
LOSS_RTOL = 1e-5
GRAD_ATOL = 1e-5


@pytest.mark.slow
def test_block_sparse_kernel_equals_dense_kernel_zero123(tmp_path):
    out = tmp_path / "report.json"
    run_torchrun("kernels_worker.py", 2, out)
    per_rank = json.loads(out.read_text())
    assert len(per_rank) == 2
    for rank, runs in enumerate(per_rank):
        for key in ("1/block_sparse", "2/block_sparse", "3/block_sparse", "3/block_sparse/compact",
                    "1/block_sparse/compact", "2/block_sparse/compact"):
            stage = int(key[0])
            dense, sparse = runs[f"{stage}/dense"], runs[key]
            where = f"{key} rank {rank}"
            assert set(dense["layer_kernel"].values()) == {"dense"}, where
            assert set(sparse["layer_kernel"].values()) == {"block_sparse"}, where
            assert dense["operator_calls"] == 0, where
            assert sparse["operator_calls"] == 20 * len(sparse["layer_kernel"]), where  # every layer, every step
            assert sparse["kernels_state"]["layer_kernel"] == sparse["layer_kernel"], where
            assert dense["updates"] == sparse["updates"] == 3, where  # steps 5, 10, 15
            assert sparse["losses"] == pytest.approx(dense["losses"], rel=LOSS_RTOL), where
            assert sparse["masks"] == dense["masks"], f"{where}: the runs chose different masks"
            assert sparse["masked_nonzero"] == [0] * 20, f"{where}: pruned weights not exactly 0"
            # RigL's growth score on its update steps: the dense gradient, pruned positions included
            assert len(sparse["dense_grads"]) == 3
            for got, want in zip(sparse["dense_grads"], dense["dense_grads"]):
                for g, w in zip(got, want):
                    assert torch.tensor(g) == pytest.approx(torch.tensor(w), abs=GRAD_ATOL), where
                # active blocks are 1/4 of every layer: the sampled dW would leave at least 3/4 of it zero
                flat = torch.tensor([v for g in got for v in g])
                assert (flat != 0).float().mean() > 0.5, where
        # ZeRO-3 with packed shards: between steps the sparsified weights are held as their active values (75%
        # sparse here), the dense weight existing only from DeepSpeed's gather to its release around the forward
        packed, dense3 = runs["3/block_sparse/compact"]["state_bytes"], runs["3/block_sparse"]["state_bytes"]
        assert packed["weights"] < 0.5 * dense3["weights"], (packed, dense3)
        # ZeRO-1/2 with compact state: every sparsified weight is held as its active blocks; DeepSpeed's dense
        # flat buffer is gone (no live tensor that large), the parameters are placeholders, the bytes are those of
        # the active values (25% here) plus the dense parameters, and a module load round trip keeps the weights
        for stage in (1, 2):
            compact, dense = runs[f"{stage}/block_sparse/compact"], runs[f"{stage}/block_sparse"]
            where = f"{stage}/block_sparse/compact rank {rank}"
            assert compact["held"] == sorted(compact["layer_kernel"]), where
            assert compact["held_placeholders"] and not compact["dense_buffer_alive"], where
            assert compact["load_round_trip"], where
            assert compact["state_bytes"]["weights"] < 0.35 * dense["state_bytes"]["weights"], (where, compact,
                                                                                              dense)
        ckpt = runs["2/block_sparse/checkpointing"]
        assert ckpt["losses"] == pytest.approx(runs["2/block_sparse"]["losses"], rel=LOSS_RTOL)
        assert ckpt["masks"] == runs["2/block_sparse"]["masks"]


# ---------------------------------------------------------------------------------------------------------------------
# the component in one process
# ---------------------------------------------------------------------------------------------------------------------


class _Sparsifier:
    """What SparseKernels reads of the sparsifier: full masks and the update counter."""

    def __init__(self, masks):
        self.masks, self.updates_done = masks, 0

    def full_mask(self, name):
        return self.masks[name]


def _setup(setting="block_sparse"):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    linear, conv = nn.Linear(64, 32), Conv1D(48, 64)  # Conv1D(nf=out, nx=in) stores (in, out)
    gen = torch.Generator().manual_seed(1)
    lay_lin = torch.rand(2, 4, generator=gen) < 0.5
    lay_conv = torch.rand(3, 4, generator=gen) < 0.5
    masks = {"lin.weight": expand_layout(lay_lin, (16, 16), (32, 64)),
             "conv.weight": expand_layout(lay_conv, (16, 16), (48, 64)).t().contiguous()}
    with torch.no_grad():
        linear.weight.mul_(masks["lin.weight"])
        conv.weight.mul_(masks["conv.weight"])
    layers = [_Layer("lin.weight", linear, False), _Layer("conv.weight", conv, True)]
    sp = _Sparsifier(masks)
    kernels = SparseKernels(sp, layers, (16, 16), setting, tokens=64)
    return kernels, sp, linear, conv


def test_component_runs_operator_and_refreshes_after_mask_update():
    kernels, sp, linear, conv = _setup()
    kernels.choose(parse_pattern("block:16x16"))
    assert kernels.layer_kernel() == {"lin.weight": "block_sparse", "conv.weight": "block_sparse"}
    x = torch.randn(5, 64)
    assert (linear(x) - (x @ linear.weight.t() + linear.bias)).abs().max() <= 1e-5
    assert (conv(x) - (x @ conv.weight + conv.bias)).abs().max() <= 1e-5
    # dense_grad follows the plan: the whole dW on dense-gradient steps, active blocks only otherwise
    for dense_grad in (False, True):
        kernels.before_forward(StepPlan(0, dense_grad=dense_grad))
        linear.weight.grad = None
        linear(x).sum().backward()
        pruned = ~sp.masks["lin.weight"]
        assert (linear.weight.grad[pruned] != 0).any() == dense_grad
    # a mask update: the next forward rebuilds the index (a block grown from zero weights is active at once)
    sp.masks["lin.weight"] = torch.ones(32, 64, dtype=torch.bool)
    sp.updates_done = 1
    kernels.before_forward(StepPlan(1))
    linear.weight.grad = None
    linear(x).sum().backward()
    assert (linear.weight.grad != 0).all()
    assert kernels.layers[0].index.density == 1.0


def test_state_dict_restores_choice_and_work_fractions():
    kernels, sp, linear, conv = _setup("auto")
    kernels.choose(parse_pattern("block:16x16"))  # measured: either answer is valid, both ranks would agree
    chosen = kernels.layer_kernel()
    assert set(chosen.values()) <= {"dense", "block_sparse"} and len(kernels.timings) == 2
    other, _, _, _ = _setup("auto")
    flipped = {n: "dense" if k == "block_sparse" else "block_sparse" for n, k in chosen.items()}
    other.refresh()
    other.load_state_dict({"setting": "auto", "layer_kernel": flipped})
    assert other.layer_kernel() == flipped  # a resume runs what the checkpoint says, without measuring again
    fwd, dw = other.work_fractions(dense_grad=False)
    for lay in other.layers:
        want = lay.index.density if lay.kind == "block_sparse" else 1.0
        assert fwd[lay.name] == dw[lay.name] == want
    assert set(other.work_fractions(dense_grad=True)[1].values()) == {1.0}


def test_kernel_config_errors():
    with pytest.raises(ConfigError, match="sparsity.kernel"):
        from_dict({"sparsity": {"method": "rigl", "kernel": "fast"}})
    with pytest.raises(ConfigError, match="block pattern"):
        from_dict({"sparsity": {"method": "rigl", "kernel": "block_sparse"}})
    with pytest.raises(ConfigError, match="2:4"):
        from_dict({"sparsity": {"method": "rigl", "kernel": "semi_structured", "pattern": "block:4x4"}})
    # block_sparse runs at ZeRO-3 (the worker above); the 2:4 semi-structured kernels do not
    check_kernel_with_deepspeed(SparsityConfig(method="rigl", pattern="block:16x16", kernel="block_sparse"),
                                {"zero_optimization": {"stage": 3}})
    sp = SparsityConfig(method="rigl", pattern="2:4", sparsity=0.5, kernel="semi_structured")
    with pytest.raises(ConfigError, match="sparsity.kernel.*stage 3"):
        check_kernel_with_deepspeed(sp, {"zero_optimization": {"stage": 3}})
    check_kernel_with_deepspeed(SparsityConfig(method="rigl", kernel="auto"), {"zero_optimization": {"stage": 3}})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_semi_structured_linear_matches_masked_dense():
    from dist_sparse.linear.semi_structured import semi_structured_available, semi_structured_linear, two_four_mask

    if semi_structured_available(torch.device("cuda")) is not None:
        pytest.skip(semi_structured_available(torch.device("cuda")))
    torch.manual_seed(0)
    w = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mask = two_four_mask(w.detach())
    y = semi_structured_linear(x, w, b, mask)
    ref = torch.nn.functional.linear(x.float(), (w * mask).float(), b.float())
    assert (y.float() - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()
    dy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    rx, rw = torch.autograd.grad(ref, (x, w), dy.float())
    assert (gx.float() - rx).abs().max().item() <= 2e-2 * rx.abs().max().item()
    assert (gw.float() - rw * mask).abs().max().item() <= 2e-2 * rw.abs().max().item()
