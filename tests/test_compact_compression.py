"""Compact state combined with gradient compression at ZeRO-1/2.

- 2 CPU ranks, 20 steps, RigL with mask updates every 4 steps, top-k 1% with error feedback (ZeRO-1 fp32, ZeRO-2
  fp32 and bf16, all with gradient clipping; ZeRO-2 fp32 with Adam momentum correction and one step whose gradient
  is non-finite on one rank):
  compact + compression equals masked-dense + compression (losses, final masks bit for bit, bytes exchanged), pruned
  model weights are exactly 0, the store is packed (one master value and one moment per active weight of the rank's
  range), compression owns the reduction (compact state's packed all-reduce is not installed), the residuals are
  packed by the masks with compact state and counted in ``state_bytes`` as the masks say
  (tests/workers/compact_compression_worker.py);
- config: the pair is accepted at ZeRO-1/2 and refused at ZeRO-3 with a ConfigError naming ``compression.method``;
- checkpoint: a compact + compression run (momentum correction) saved at step 10 and resumed gives the losses of
  the uninterrupted run exactly, residuals included; ``summary.json`` reports residuals and the stash.
"""

import json

import pytest

from dist_sparse import config as C
from dist_sparse.errors import ConfigError
from tests.distributed_utils import run_torchrun


def _raw(stage: int) -> dict:
    return {"sparsity": {"method": "rigl", "compact_state": True},
            "compression": {"method": "topk", "density": 0.01},
            "deepspeed": {"zero_optimization": {"stage": stage}}}


@pytest.mark.parametrize("stage", [1, 2])
def test_compact_state_with_compression_is_accepted_at_zero_1_and_2(stage):
    cfg = C.from_dict(_raw(stage))
    assert cfg.sparsity.compact_state and cfg.compression.enabled
    raw = _raw(stage)
    ds, sparsity, compression = C.split_deepspeed_json({**raw["deepspeed"], "sparsity": raw["sparsity"],
                                                        "compression": raw["compression"]})
    assert sparsity.compact_state and compression.enabled


def test_compact_state_with_compression_at_zero_3_is_refused():
    raw = _raw(3)
    for call in (lambda: C.from_dict(raw),
                 lambda: C.split_deepspeed_json({**raw["deepspeed"], "sparsity": raw["sparsity"],
                                                 "compression": raw["compression"]})):
        with pytest.raises(ConfigError) as err:
            call()
        assert err.value.key == "compression.method"
        assert "sparsity.compact_state needs ZeRO stage 1 or 2, not 3" in str(err.value)


# per ZeRO stage, the cases (dtype, mode, step at which rank 1's gradient is made non-finite) one launch runs
COMPRESSION_CASES = {
    1: [("fp32", "plain", None)],
    2: [("fp32", "plain", None), ("bf16", "plain", None),
        ("fp32", "mc", 6),  # Adam momentum correction, and rank 1's gradient non-finite at step 6
        ("fp32", "mc-grow2", None)]}  # ... with RigL's 2-step growth window (dense exchange, then an optimizer step)


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
def test_compact_with_compression_resume_exact(tmp_path):
    from tests.test_checkpoint_resume import losses, train

    over = ["deepspeed.zero_optimization.stage=2", "sparsity.compact_state=true", "compression.method=topk",
            "compression.density=0.05", "compression.momentum_correction=true", "train.save_interval=10"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, *over)
    proc = train(resumed, *over, fault="kill@10:1", expect_ok=False)
    assert proc.returncode != 0
    train(resumed, *over, resume="auto")
    a, b = losses(straight), losses(resumed)
    assert [a[s] for s in range(11, 21)] == [b[s] for s in range(11, 21)]  # exactly equal, not close
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["compact_state"] is True and summary["compression"] == "topk"
    assert 0 < summary["comm_bytes_per_step"] < summary["dense_comm_bytes_per_step"]
    sb, tr = summary["state_bytes_per_rank"], summary["transient_bytes_per_rank"]
    assert sb["compression_residuals"] > 0 and sb["total"] == max(
        sum(v for k, v in r.items() if k != "total") for r in summary["state_bytes_by_rank"])
    # the stash is a transient of every trainable parameter in fp32; compression owns the reduction
    assert tr["compression_local_gradient"] > 0 and tr["packed_gradient_exchange"] == 0
    assert summary["grad_reduce"]["measured"] is False
