"""Compact state combined with gradient compression at ZeRO-1/2/3.

- 2 CPU ranks, 20 steps, RigL with mask updates every 4 steps, top-k 1% with error feedback (ZeRO-1 fp32, ZeRO-2
  fp32 and bf16, ZeRO-3 fp32 and bf16, all with gradient clipping; ZeRO-2 and ZeRO-3 fp32 with Adam momentum
  correction and one step whose gradient is non-finite on one rank):
  compact + compression equals masked-dense + compression (losses, final masks bit for bit, bytes exchanged), pruned
  model weights are exactly 0, the store is packed (one master value and one moment per active weight of the rank's
  range), compression owns the reduction (compact state's packed all-reduce is not installed), the residuals are
  packed by the masks with compact state and counted in ``state_bytes`` as the masks say
  (tests/workers/compact_compression_worker.py);
- config: the pair is accepted at ZeRO-1/2/3 and refused at stage 0 and with fp16 by a ConfigError;
- checkpoint (ZeRO-2 and ZeRO-3): a compact + compression run (momentum correction) resumed from its step-10
  checkpoint gives the losses and the final residuals of the uninterrupted run exactly; at ZeRO-3 (bf16, packed
  shards) it also resumes on one rank, the residuals restarting at 0; ``summary.json`` reports residuals and the stash.
"""

import json

import pytest
import torch

from dist_sparse import config as C
from dist_sparse.errors import ConfigError
from tests.distributed_utils import run_torchrun
from tests.test_compression_deepspeed import _residuals


def _raw(stage: int) -> dict:
    return {"sparsity": {"method": "rigl", "compact_state": True},
            "compression": {"method": "topk", "density": 0.01},
            "deepspeed": {"zero_optimization": {"stage": stage}}}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_compact_state_with_compression_is_accepted_at_zero_1_2_and_3(stage):
    cfg = C.from_dict(_raw(stage))
    assert cfg.sparsity.compact_state and cfg.compression.enabled
    raw = _raw(stage)
    ds, sparsity, compression = C.split_deepspeed_json({**raw["deepspeed"], "sparsity": raw["sparsity"],
                                                        "compression": raw["compression"]})
    assert sparsity.compact_state and compression.enabled


def test_compact_state_with_compression_refuses_stage_0_and_fp16():
    for raw, why in ((_raw(0), "needs ZeRO stage 1, 2 or 3, not 0"),
                     ({**_raw(2), "deepspeed": {"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}},
                      "does not support fp16")):
        with pytest.raises(ConfigError) as err:
            C.from_dict(raw)
        assert err.value.key == "compression.method" and why in str(err.value), err.value


# per ZeRO stage, the cases (dtype, mode, step at which rank 1's gradient is made non-finite) one launch runs
COMPRESSION_CASES = {
    1: [("fp32", "plain", None)],
    2: [("fp32", "plain", None), ("bf16", "plain", None),
        ("fp32", "mc", 6),  # Adam momentum correction, and rank 1's gradient non-finite at step 6
        ("fp32", "mc-grow2", None)],  # ... with RigL's 2-step growth window (dense exchange, then an optimizer step)
    # ZeRO-3: the exchange reduces into each rank's shards; fp32 (the master lives in the lp shard between steps)
    # with momentum correction and a non-finite step, bf16 plain
    3: [("fp32", "mc", 6), ("bf16", "plain", None)]}


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(COMPRESSION_CASES))
def test_compact_with_compression_equals_masked_dense_with_compression(stage, tmp_path):
    out = tmp_path / "report.json"
    cases = COMPRESSION_CASES[stage]
    run_torchrun("compact_compression_worker.py", 2, stage, out, json.dumps(cases), timeout=1800)
    runs = json.loads(out.read_text())
    assert len(runs) == 2 and all(len(r) == len(cases) for r in runs)
    for i, case in enumerate(cases):
        _check_case(stage, *case, [r[i] for r in runs])


def _check_case(stage, dtype, mc, nan_step, per_rank):
    assert len(per_rank) == 2
    for rank, r in enumerate(per_rank):
        where = f"ZeRO-{stage} {dtype} {mc} rank {rank}"
        dense, compact = r["dense"], r["compact"]
        # bit for bit, clipped: both compute the norm with DeepSpeed's own function over the same active values
        assert compact["losses"] == dense["losses"], f"{where}: losses differ"
        assert compact["final_masks"] == dense["final_masks"], f"{where}: masks diverged"
        assert compact["updates"] == dense["updates"] >= 4, where
        # the same compressed exchange: the same bytes every step
        assert compact["comm_bytes"] == dense["comm_bytes"], where
        assert compact["comm_bytes_per_step"] == dense["comm_bytes_per_step"] > 0, where
        assert compact["adam"] == dense["adam"] == mc.startswith("mc"), where
        assert compact["masked_nonzero"] == [0] * 20, f"{where}: pruned model weights not exactly 0"
        # packed: one fp32 master value and one first moment per active weight of the rank's range
        assert len(compact["packed"]) == 20, where
        for step, (masters, moments, active) in enumerate(compact["packed"]):
            assert masters == active, f"{where} step {step}: packed master {masters} != active {active}"
            assert moments in (0, active), f"{where} step {step}: packed moments {moments} != active {active}"
        # compression owns the reduction: compact state's packed all-reduce is not installed
        assert compact["packed_reduction"] is False and compact["store_grads_released"], where
        # residuals (and momentum-correction buffers): full fp32 tensors in the masked-dense run; packed by the
        # masks with compact state (unpruned coordinates + the layout's bits); measured == counted from the masks
        for run in (dense, compact):
            assert [b["compression_residuals"] for b in run["bytes"]] == run["residual_expected"], where
            assert run["residual_planned"] == run["residual_expected"], f"{where}: dist-sparse plan's formula"
        d, c = dense["bytes"][-1], compact["bytes"][-1]
        assert 0 < c["compression_residuals"] < 0.5 * d["compression_residuals"], where
        for key in ("master_weights", "optimizer_state", "gradients"):
            assert c[key] < 0.5 * d[key], f"{where}: {key} {c[key]} not below half of dense {d[key]}"
        # the local-gradient stash (fp32, every trainable parameter) is a transient: released after the exchange
        assert compact["stash_bytes"] == dense["stash_bytes"] > 0, where
        if nan_step is not None:  # both runs skip the step on every rank; residuals untouched
            for run in (dense, compact):
                assert run["skipped"] == [s == nan_step for s in range(20)], where
                assert run["residual_untouched"] and run["residual_nonzero"] > 0, where
        else:
            assert not any(compact["skipped"]), where


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_compact_with_compression_resume_exact(tmp_path, stage):
    """The uninterrupted run saves at step 10; a second run resumes from that checkpoint into its own directory
    (a kill before the resume is test_resume_is_bit_identical's and the compression tests')."""
    from tests.test_checkpoint_resume import losses, train

    over = [f"deepspeed.zero_optimization.stage={stage}", "sparsity.compact_state=true", "compression.method=topk",
            "compression.density=0.05", "compression.momentum_correction=true", "train.save_interval=10"]
    if stage == 3:  # with packed shards (bf16): the gathers read packed values, the exchange writes packed shards
        over += ["deepspeed.bf16={enabled: true}", "sparsity.packed_gather=true"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, *over)
    train(resumed, *over, resume=str(straight / "checkpoints" / "step_00000010"))
    a, b = losses(straight), losses(resumed)
    assert [a[s] for s in range(11, 21)] == [b[s] for s in range(11, 21)]  # exactly equal, not close
    ra, rb = (_residuals(d / "checkpoints" / "step_00000020") for d in (straight, resumed))
    assert set(ra) == set(rb) and len(ra) > 0 and all(torch.equal(ra[k], rb[k]) for k in ra)
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["compact_state"] is True and summary["compression"] == "topk"
    assert summary["resumed_from"].endswith("step_00000010")
    assert 0 < summary["comm_bytes_per_step"] < summary["dense_comm_bytes_per_step"]
    sb, tr = summary["state_bytes_per_rank"], summary["transient_bytes_per_rank"]
    assert sb["compression_residuals"] > 0 and sb["total"] == max(
        sum(v for k, v in r.items() if k != "total") for r in summary["state_bytes_by_rank"])
    # the stash is a transient of every trainable parameter in fp32; compression owns the reduction
    assert tr["compression_local_gradient"] > 0 and tr["packed_gradient_exchange"] == 0
    assert summary["grad_reduce"]["measured"] is False
    if stage == 3:  # packed shards: the weights are the active values (+ bits), gathered packed
        assert summary["param_gather_bytes_per_step"] < 0.5 * summary["dense_param_gather_bytes_per_step"]
        # 2 -> 1 ranks: masks, weights and moments reshard; the residuals cannot (they restart at 0, with a warning)
        proc = train(tmp_path / "one_rank", *over, "train.steps=12", nproc=None,
                     resume=str(straight / "checkpoints" / "step_00000010"))
        assert "residuals restart at 0" in proc.stdout + proc.stderr
        one = json.loads((tmp_path / "one_rank" / "summary.json").read_text())
        assert one["resumed_from"].endswith("step_00000010") and one["compact_state"] is True
