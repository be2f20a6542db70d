"""`dist-sparse plan`: the per-rank byte formula, its CLI output and its errors."""

import json
import math

import pytest

from dist_sparse.cli import plan as plan_cli
from dist_sparse.memory import plan as P


def test_formula_by_hand_zero2_bf16():
    # 1000 parameters, all sparsified at 90%, 2 ranks: one 500-element partition each, 50 active per rank
    s = P.uniform_setting(1000, 0.9, 1.0, world_size=2, zero_stage=2, precision="bf16", compact_state=True)
    compact = P.predict(s)
    # masks stay sharded: its 500 bits (63 bytes) only
    assert compact[0] == {"weights": 2000, "gradients": 100, "master_weights": 200, "optimizer_state": 404,
                          "masks": 63, "compression_residuals": 0, "total": 2767}
    # the one tensor's full mask while the reduction builds it: a 500-weight piece, broadcast by its owner
    assert P.transients(s) == {"mask_bits_in_flight": 63}
    # every packed step: the own partition's bits handed, the other's received; 100 active bf16 values reduced
    assert P.mask_traffic(s) == {"handed": 63, "received": 63, "packed_gradient": 200}
    # sparsity.replicate_masks: + the replicated full masks of both 500-weight pieces (2 x 63 bytes), no transient
    s.replicate_masks = True
    assert P.predict(s)[0]["masks"] == 189 and P.predict(s)[0]["total"] == 2893
    assert P.transients(s) == {"mask_bits_in_flight": 0}
    assert P.mask_traffic(s) == {"handed": 0, "received": 0, "packed_gradient": 200}
    dense = P.predict(P.dense_baseline(s))
    assert dense[0] == {"weights": 2000, "gradients": 1000, "master_weights": 2000, "optimizer_state": 4004,
                        "masks": 0, "compression_residuals": 0, "total": 9004}


def test_formula_partition_layout_follows_deepspeed():
    # two parameters of 6 and 5 elements in one group, 2 ranks: 11 -> aligned to 12, partitions [0, 6), [6, 12)
    group = [P.Param("a", 6, 0.5, True), P.Param("b", 5)]
    dense = P.predict(P.Setting(world_size=2, zero_stage=2, precision="fp32", groups=[group]))
    assert [r["weights"] for r in dense] == [48, 48]
    assert [r["master_weights"] for r in dense] == [24, 24]
    # DeepSpeed's contiguous gradient buffer holds the whole gradient of every parameter overlapping a partition
    assert [r["gradients"] for r in dense] == [24, 20]
    compact = P.predict(P.Setting(world_size=2, zero_stage=2, precision="fp32", compact_state=True, groups=[group]))
    assert [r["master_weights"] for r in compact] == [12, 20]  # 3 of "a" active on rank 0; 5 of "b" on rank 1
    assert [r["masks"] for r in compact] == [1, 0]  # the 6 bits of "a" on rank 0 (sharded)
    replicated = P.predict(P.Setting(world_size=2, zero_stage=2, precision="fp32", compact_state=True,
                                     groups=[group], replicate_masks=True))
    assert [r["masks"] for r in replicated] == [2, 1]  # + the replicated full mask of "a" (6 bits: 1 byte)


def test_stage0_and_stage3():
    s0 = P.predict(P.uniform_setting(800, 0.5, 1.0, world_size=4, zero_stage=0, precision="fp32"))
    assert s0[0]["weights"] == 3200 and s0[0]["master_weights"] == 0 and s0[0]["gradients"] == 3200
    # ZeRO-3: 4 pieces of 200 (each sharded 50 per rank); no persistent parameters, no bucket
    s3 = P.predict(P.uniform_setting(800, 0.5, 1.0, world_size=4, zero_stage=3, precision="bf16",
                                     persistence_threshold=0, reduce_bucket_size=0))
    assert s3[0]["weights"] == 400 and s3[0]["master_weights"] == 800 and s3[0]["optimizer_state"] == 1604
    assert s3[0]["gradients"] == 400 and s3[0]["masks"] == 4 * 7  # 50 bits per piece -> 7 bytes


def test_stage3_layout_persistent_bucket_and_compact():
    """Shards of ceil(numel / N) per parameter (padded on the last rank), persistent parameters kept whole,
    DeepSpeed's reduction bucket in the dense gradients, compact: active positions only (fp32: no master)."""
    group = [P.Param("w", 10, 0.5, True), P.Param("b", 3)]
    dense = P.predict(P.Setting(world_size=4, zero_stage=3, precision="bf16", groups=[group],
                                reduce_bucket_size=100, persistence_threshold=3))
    # shards: w 3 per rank (rank 3 holds 1 real + 2 padding), b 1 per rank; b (3 <= 3) is also kept whole
    assert [r["weights"] for r in dense] == [2 * (3 + 1 + 3)] * 4
    assert dense[3]["gradients"] == 2 * 4 + 2 * 100 and dense[3]["master_weights"] == 16
    assert [r["masks"] for r in dense] == [1, 1, 1, 1]
    for prec, master in (("bf16", 4), ("fp32", 0)):
        compact = P.predict(P.Setting(world_size=4, zero_stage=3, precision=prec, compact_state=True, groups=[group],
                                      reduce_bucket_size=100, persistence_threshold=3))
        lp = P.LP_BYTES[prec]
        # rank 0: 3 of w at density 0.5 + 1 of b; rank 3: 1 of w + 0 of b (b's 3 elements end on rank 2)
        assert compact[0]["gradients"] == round(lp * 2.5) and compact[3]["gradients"] == round(lp * 0.5)
        assert compact[0]["master_weights"] == round(master * 2.5)
        assert compact[0]["optimizer_state"] == round(8 * 2.5) + 4
        # its shard's mask bits only (sharded); w's 3-element shards: 1 byte each, gathered from 4 ranks in flight
        assert [r["masks"] for r in compact] == [1] * 4
        setting = P.Setting(world_size=4, zero_stage=3, precision=prec, compact_state=True, groups=[group],
                            reduce_bucket_size=100, persistence_threshold=3)
        assert P.transients(setting) == {"mask_bits_in_flight": 4}
        setting.replicate_masks = True  # + the replicated full mask of w (10 bits) for the packed reduction
        assert [r["masks"] for r in P.predict(setting)] == [1 + 2] * 4


def test_compression_residuals_by_hand():
    """Every rank keeps its buffers for its whole local gradient: full tensors, or (compact state) a sparsified
    tensor's active coordinates plus its mask bits; inter-node scope: one node-slice of each tensor."""
    from dist_sparse.config import CompressionConfig

    adam_mc = CompressionConfig(method="topk")  # Adam: momentum correction on by default -> 4 buffers
    assert P.residual_buffers(adam_mc, adam=True) == 4 and P.residual_buffers(adam_mc, adam=False) == 1
    assert P.residual_buffers(CompressionConfig(method="topk", momentum_correction=True), adam=False) == 2
    assert P.residual_buffers(CompressionConfig(method="topk", error_feedback=False), adam=True) == 0
    assert P.residual_buffers(CompressionConfig(), adam=True) == 0
    group = [P.Param("w", 1000, 0.1, True), P.Param("b", 24)]
    dense = P.Setting(world_size=2, zero_stage=2, groups=[group], residual_buffers=4)
    assert [r["compression_residuals"] for r in P.predict(dense)] == [4 * 4 * 1024] * 2
    compact = P.Setting(world_size=2, zero_stage=2, compact_state=True, groups=[group], residual_buffers=4,
                        residual_bytes=2)
    assert P.compression_residual_bytes(compact) == 2 * 4 * (100 + 24) + 125
    inter = P.Setting(world_size=4, zero_stage=2, compact_state=True, groups=[group], residual_buffers=1,
                      residual_slice=2)
    assert P.compression_residual_bytes(inter) == 4 * (50 + 12) + 125 + 3
    assert P.predict(P.dense_baseline(compact))[0]["compression_residuals"] == 0


def test_cli_shows_the_residual_dtype_trade_off(capsys):
    rc = plan_cli.main(["--params", "1e6", "--world-size", "8", "--zero-stage", "3", "--compact-state",
                        "--compression-density", "0.01", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    r = out["compression_residuals_by_dtype"]
    assert r["fp32"] == out["state_bytes_per_rank"]["compression_residuals"] > r["bf16"] > r["fp32"] / 2
    rc = plan_cli.main(["--params", "1e6", "--world-size", "8", "--zero-stage", "3", "--compact-state",
                        "--compression-density", "0.01", "--residual-dtype", "bf16", "--json"])
    assert json.loads(capsys.readouterr().out)["state_bytes_per_rank"]["compression_residuals"] == r["bf16"]


def test_cli_params_json(capsys):
    rc = plan_cli.main(["--params", "7e9", "--world-size", "8", "--zero-stage", "2", "--sparsity", "0.9",
                        "--precision", "bf16", "--compact-state", "--json", "--device-memory-gib", "80"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    sb, dense = out["state_bytes_per_rank"], out["dense_deepspeed_state_bytes_per_rank"]
    assert set(sb) == {*P.CATEGORIES, "total"}
    assert sb["weights"] == dense["weights"] == 2 * 7_000_000_000  # bf16 weights are replicated at ZeRO-2
    assert sb["master_weights"] < 0.2 * dense["master_weights"]
    assert out["fits"] is True and out["zero_stage"] == 2 and out["compact_state"] is True
    assert len(out["state_bytes_by_rank"]) == 8


def test_cli_masks_stay_sharded_at_any_scale(capsys):
    """Issue 18: 7B, ZeRO-3 bf16, 90%, compact state: masks per rank are the rank's own bits (1/world of the full
    bits), the one tensor's full mask is a separate transient, and the ratio to dense no longer rises with the rank
    count; --replicate-masks predicts the replicated copy as before."""
    def plan(world, *extra):
        assert plan_cli.main(["--params", "7e9", "--world-size", str(world), "--zero-stage", "3", "--sparsity",
                              "0.9", "--precision", "bf16", "--compact-state", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    sparsified = 6_650_000_000
    ratios = []
    for world in (8, 64, 512):
        out = plan(world)
        assert out["state_bytes_per_rank"]["masks"] <= sparsified / 8 / world + 8 * world  # + per-piece rounding
        largest = round(sparsified * plan_cli.LARGEST_TENSOR_SHARE)
        shard_bytes = math.ceil(math.ceil(largest / world) / 8)  # the largest tensor's shard bits, from each rank
        assert out["transient_bytes_per_rank"]["mask_bits_in_flight"] == world * shard_bytes
        # every step the other ranks' bits of every sparsified tensor arrive (1 bit per weight, less the own)
        assert out["mask_sync_received_bytes_per_step"] >= sparsified / 8 * (world - 1) / world
        ratios.append(out["ratio_to_dense"])
        replicated = plan(world, "--replicate-masks")
        assert replicated["state_bytes_per_rank"]["masks"] >= sparsified / 8
        assert replicated["transient_bytes_per_rank"]["mask_bits_in_flight"] == 0
        assert replicated["mask_sync_bytes_per_step"] == 0
    assert ratios == sorted(ratios, reverse=True), ratios


def test_cli_text_output(capsys):
    assert plan_cli.main(["--params", "1e6", "--world-size", "2"]) == 0
    text = capsys.readouterr().out
    for word in ("weights", "gradients", "master_weights", "optimizer_state", "masks", "total", "ratio to dense"):
        assert word in text


def test_cli_config_counts_the_model(capsys, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from dist_sparse.integration.hf import sparsifiable_parameters

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {n_layer: 2, n_head: 2, n_embd: 32, block_size: 16}\n"
                   "data: {max_chars: 5000}\n"
                   "deepspeed: {zero_optimization: {stage: 2}, bf16: {enabled: true}}\n"
                   "sparsity: {method: rigl, sparsity: 0.8, compact_state: true}\n")
    assert plan_cli.main([str(cfg), "--world-size", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["precision"] == "bf16" and out["compact_state"] is True and out["zero_stage"] == 2
    # the same sizes built for real (the vocabulary is the char tokenizer's, read from the corpus)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=out["vocab_size"], n_positions=16, n_embd=32, n_layer=2, n_head=2))
    assert out["parameters"] == sum(p.numel() for p in model.parameters())
    params = dict(model.named_parameters())
    assert out["sparsified_parameters"] == sum(params[n].numel() for n in sparsifiable_parameters(model))
    assert out["ratio_to_dense"] < 0.6


@pytest.mark.parametrize("argv, needle", [
    (["--params", "1e9", "--world-size", "0"], "--world-size"),
    (["--params", "1e9", "--world-size", "2", "--sparsity", "1.0"], "--sparsity"),
    (["--params", "0", "--world-size", "2"], "--params"),
    (["--params", "1e9", "--world-size", "2", "--zero-stage", "5"], "--zero-stage"),
    (["--params", "1e9", "--world-size", "2", "--zero-stage", "0", "--compact-state"], "--compact-state"),
    (["--params", "1e9", "--world-size", "2", "--sparsified-fraction", "1.5"], "--sparsified-fraction"),
    (["--world-size", "2"], "either a CONFIG or --params"),
])
def test_cli_errors(argv, needle, capsys):
    assert plan_cli.main(argv) == 2
    assert needle in capsys.readouterr().err


def test_cli_config_error_names_the_key(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("sparsity: {method: rigl, compact_state: true}\ndeepspeed: {zero_optimization: {stage: 0}}\n")
    assert plan_cli.main([str(cfg), "--world-size", "2"]) == 2
    assert "sparsity.compact_state" in capsys.readouterr().err


@pytest.mark.slow
def test_plan_counts_the_growth_window_kept_by_the_compressed_exchange(tmp_path, capsys):
    """RigL under gradient compression keeps its default growth window in the exchange: every rank holds an fp32
    sum of its full local gradient of the sparsified tensors (not of its partition), which `dist-sparse plan`
    predicts as `dist-sparse train` measures it (within 1%, every category)."""
    from tests.distributed_utils import ROOT, dist_sparse_train

    run = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32", "train.steps=8",
           "train.eval_interval=8", "train.log_interval=4", "train.eval_batches=2", "data.max_chars=100000",
           "deepspeed.train_micro_batch_size_per_gpu=4", "train.progress=false", "train.save_interval=0",
           "train.save_final_model=false", "sparsity.method=rigl", "sparsity.sparsity=0.5",
           "sparsity.update_interval=2",
           # the last update is the last step: its growth window's sums are held when the state is measured
           "sparsity.end_step=9", "compression.method=topk", "compression.density=0.1"]
    dist_sparse_train(tmp_path, run, nproc=2)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["grow_grad_steps"] == 2 and summary["comm_bytes_per_step"] < summary["dense_comm_bytes_per_step"]

    def plan(overrides):
        sets = [x for o in overrides for x in ("--set", o)]
        assert plan_cli.main([str(ROOT / "configs" / "demo.yaml"), "--world-size", "2", "--json", *sets]) == 0
        return json.loads(capsys.readouterr().out)

    predicted, measured = plan(run), summary["state_bytes_per_rank"]
    for key, value in predicted["state_bytes_per_rank"].items():
        assert abs(value - measured[key]) <= 0.01 * measured[key], f"{key}: predicted {value}, measured {measured[key]}"
    without = plan([*run, "sparsity.grow_grad_steps=1"])["state_bytes_per_rank"]["gradients"]
    assert predicted["state_bytes_per_rank"]["gradients"] - without == 4 * predicted["sparsified_parameters"]
