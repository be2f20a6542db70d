"""Compact state: packed master weights, moments and gradients for active weights only.

- packing: pack/unpack/repack on one process (survivors exact, regrown 0, dropped gone, no index tensors);
- 2 CPU ranks, ZeRO-1/2/3, fp32, bf16 and fp16 (ZeRO-3 also with 2 accumulation micro-batches and sub-groups):
  the compact run's losses and masks equal the masked-dense run's over 20 steps with RigL mask updates (fp16: the
  same overflowing steps skipped, the same loss-scale path); repack after
  regrowth; measured state bytes equal the count from the masks (tests/workers/compact_worker.py);
- ZeRO-1/2/3 (also with 2 accumulation micro-batches): the bytes handed to the gradient reduction are the packed
  active values (element size x active count) on steps without a mask update, DeepSpeed's dense reduction on them;
- config: unsupported combinations are a ConfigError naming ``sparsity.compact_state``;
- checkpoint: a compact run saves and resumes bit-identically (and a dense checkpoint resumes compact), ZeRO-2
  and ZeRO-3.
"""

import json

import pytest
import torch

from dist_sparse import config as C
from dist_sparse.compact.packed import Fragment, PackedPartition
from dist_sparse.errors import ConfigError
from tests.distributed_utils import ROOT, dist_sparse_train, run_torchrun


def _partition(masks: dict, dense: dict):
    frags, start = [], 0
    for name, n in dense.items():
        frags.append(Fragment(name, start, n, 0, name in masks))
        start += n
    return PackedPartition(frags, lambda name: masks[name])


def test_pack_unpack_roundtrip_and_layout():
    g = torch.Generator().manual_seed(0)
    masks = {"a": torch.rand(10, generator=g) < 0.3, "c": torch.rand(7, generator=g) < 0.5}
    part = _partition(masks, {"a": 10, "b": 4, "c": 7})
    dense = torch.randn(21, generator=g)
    packed = part.pack(lambda k: dense.narrow(0, part.fragments[k].start, part.fragments[k].length),
                       part.masks(), torch.float32)
    assert packed.numel() == part.numel == int(masks["a"].sum()) + 4 + int(masks["c"].sum())
    for name, lo, n in (("a", 0, 10), ("b", 10, 4), ("c", 14, 7)):
        expect = dense[lo: lo + n].clone()
        if name in masks:
            expect[~masks[name]] = 0
        assert torch.equal(part.unpack(packed, name), expect)
    target = torch.full((21,), 7.0, dtype=torch.bfloat16)
    part.scatter_into(packed, target, part.masks())
    assert bool((target[:10][~masks["a"]] == 0).all()) and bool((target[14:][~masks["c"]] == 0).all())
    assert torch.equal(target[10:14], dense[10:14].to(torch.bfloat16))


def test_repack_keeps_survivors_zeroes_regrown_drops_pruned():
    g = torch.Generator().manual_seed(1)
    old = {"w": torch.rand(50, generator=g) < 0.4}
    new = {"w": old["w"].clone()}
    on, off = old["w"].nonzero().flatten(), (~old["w"]).nonzero().flatten()
    new["w"][on[:5]] = False  # pruned
    new["w"][off[:5]] = True  # regrown
    part = _partition(old, {"w": 50, "bias": 3})
    values = torch.randn(part.numel, generator=g)
    out = part.repack(values, [old["w"], None], [new["w"], None])
    dense_old = part.unpack(values, "w", old["w"])
    part.mask_of = lambda name: new[name]
    part.relayout()
    assert out.numel() == part.numel == int(new["w"].sum()) + 3
    dense_new = part.unpack(out, "w")
    keep = old["w"] & new["w"]
    assert torch.equal(dense_new[keep], dense_old[keep])
    assert bool((dense_new[new["w"] & ~old["w"]] == 0).all())
    assert bool((dense_new[~new["w"]] == 0).all())
    assert torch.equal(part.slice(out, "bias"), values[-3:])  # the dense parameter is untouched


@pytest.mark.parametrize("overrides, needle", [
    ({"deepspeed": {"zero_optimization": {"stage": 0}}}, "ZeRO stages 1, 2 and 3, not stage 0"),
    ({"deepspeed": {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}}, "offload_param"),
    ({"deepspeed": {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}}, "ZeRO stage 2"),
    ({"deepspeed": {"zero_optimization": {"stage": 2}, "optimizer": {"type": "SGD"}}}, "not 'SGD'"),
    ({"deepspeed": {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}}, "offload"),
])
def test_unsupported_combinations_are_config_errors(overrides, needle):
    raw = {"sparsity": {"method": "rigl", "compact_state": True}, **overrides}
    with pytest.raises(ConfigError) as err:
        C.from_dict(raw)
    assert err.value.key == "sparsity.compact_state" and needle in str(err.value)
    with pytest.raises(ConfigError):  # the dist_sparse.initialize path checks the same
        C.split_deepspeed_json({**overrides["deepspeed"], "sparsity": raw["sparsity"]})


def test_compact_state_key_type_checked():
    with pytest.raises(ConfigError) as err:
        C.from_dict({"sparsity": {"compact_state": "yes"}})
    assert err.value.key == "sparsity.compact_state"
    assert C.from_dict({"sparsity": {"compact_state": True},
                        "deepspeed": {"zero_optimization": {"stage": 2}}}).sparsity.compact_state
    for stage in (1, 2, 3):  # gradient accumulation at every stage (ZeRO-1/2: summed locally, reduced packed)
        assert C.from_dict({"sparsity": {"compact_state": True}, "deepspeed": {
            "zero_optimization": {"stage": stage}, "gradient_accumulation_steps": 4}}).sparsity.compact_state


# per ZeRO stage, the cases (dtype, method, gradient accumulation steps, ZeRO-3 sub_group_size); one launch runs all
COMPACT_CASES = {
    1: [("fp32", "rigl", 1, 0), ("fp32", "rigl", 2, 0), ("fp16", "rigl", 1, 0)],
    2: [("fp32", "rigl", 1, 0), ("bf16", "rigl", 1, 0), ("fp32", "magnitude", 1, 0),
        ("fp32", "rigl", 2, 0),  # 2 accumulation micro-batches, reduced once, packed
        ("fp16", "rigl", 1, 0)],  # fp16: DeepSpeed's dynamic loss scaler (CPU check lifted: workers.allow_cpu_fp16)
    3: [("fp32", "rigl", 1, 0), ("bf16", "rigl", 1, 0),
        ("bf16", "rigl", 2, 3000),  # 2 accumulation micro-batches; each rank's group split into 5 sub-groups
        ("fp16", "rigl", 1, 0)]}


@pytest.fixture(scope="module")
def _compact_reports(tmp_path_factory):
    """One launch runs every ZeRO stage's cases (process start-up dominates a case's time): stage -> per-rank
    results, one per case."""
    out = tmp_path_factory.mktemp("compact") / "report.json"
    stages = sorted(COMPACT_CASES)
    run_torchrun("compact_worker.py", 2, ",".join(map(str, stages)), out,
                 json.dumps({str(stage): COMPACT_CASES[stage] for stage in stages}), timeout=1800)
    per_rank = json.loads(out.read_text())
    assert len(per_rank) == 2
    return {stage: [r[str(stage)] for r in per_rank] for stage in stages}


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(COMPACT_CASES))
def test_compact_equals_masked_dense(stage, _compact_reports):
    cases, per_rank = COMPACT_CASES[stage], _compact_reports[stage]
    assert all(len(r) == len(cases) for r in per_rank)
    for i, case in enumerate(cases):
        _check_compact_case(stage, *case, [r[i] for r in per_rank])


def _check_compact_case(stage, dtype, method, gas, sub_group_size, per_rank):
    for rank, r in enumerate(per_rank):
        where = f"ZeRO-{stage} {dtype} {method} gas {gas} sub-groups {sub_group_size} rank {rank}"
        dense, compact = r["dense"], r["compact"]
        # the trajectory: the same losses, bit for bit. Both paths compute the gradient norm with DeepSpeed's own
        # function over the same active values in the same order, so they clip alike on any CPU. The one exception
        # is fp32 gradient accumulation at ZeRO-2/3: the packed reduction sums a rank's micro-batches locally in
        # fp32 and reduces once, DeepSpeed reduces every micro-batch and sums the reductions, so the gradient sums
        # are reassociated (an ulp per element) and only closeness holds there.
        if gas > 1 and dtype == "fp32" and stage in (2, 3):
            torch.testing.assert_close(torch.tensor(compact["losses"]), torch.tensor(dense["losses"]))
        else:
            assert compact["losses"] == dense["losses"], f"{where}: losses differ"
        assert compact["final_masks"] == dense["final_masks"], f"{where}: masks diverged"
        # fp16: the same steps overflow and are skipped, and the loss scale follows the same path
        assert compact["skipped"] == dense["skipped"] and compact["loss_scale"] == dense["loss_scale"], where
        assert compact["overflow_skips"] == dense["overflow_skips"] == sum(dense["skipped"]), where
        if dtype == "fp16":  # overflows at the start and the injected one; the scale comes down and rises again
            assert dense["skipped"][0] and dense["skipped"][8] and sum(dense["skipped"]) >= 4, where
            assert min(dense["loss_scale"]) < 2 ** 20 and max(dense["loss_scale"][4:]) > min(dense["loss_scale"]), where
        else:
            assert not any(dense["skipped"]), where
        # fp16: the worker makes one update step overflow (an inf at a pruned position): no update on it
        assert compact["updates"] == dense["updates"] == compact["scheduled_updates"] - (dtype == "fp16") >= 3, where
        # the worker's optimizer groups (decay / no decay, split by SμPar's learning-rate scale), split further by a
        # small ZeRO-3 sub_group_size
        supar = compact["method"] in ("static", "set", "rigl")  # magnitude pruning starts dense: standard
        assert (compact["param_groups"] > 2) == supar, f"{where}: {compact['param_groups']} optimizer groups"
        assert (compact["groups"] > compact["param_groups"]) == bool(sub_group_size), \
            f"{where}: {compact['groups']} packed groups from {compact['param_groups']} optimizer groups"
        assert compact["masked_nonzero"] == [0] * 20, f"{where}: pruned model weights not exactly 0"
        # masked-dense: regrown weights start at 0 with zero moments too (also when DeepSpeed's first optimizer
        # step was skipped: fp16 overflows, then RigL's update replacing the step)
        assert len(dense["repack"]) == dense["updates"], where
        assert all(rp["regrown_zero"] for rp in dense["repack"]), f"{where}: masked-dense regrown moments not 0"
        # repack after regrowth
        assert len(compact["repack"]) == compact["updates"], where
        for rp in compact["repack"]:
            assert rp["regrown_zero"], f"{where}: a regrown or pruned weight is not 0 (or its moments are not 0)"
            if method == "rigl":  # RigL's update replaces the optimizer step: survivors must not move at all
                assert rp["regrown"] > 0 or rp is compact["repack"][-1], where
                assert rp["survivors_exact"], f"{where}: a surviving weight's master or moments changed in the repack"
            else:  # magnitude pruning only drops weights (and the optimizer steps after the update)
                assert rp["regrown"] == 0, where
        # accounting: measured == counted from the masks, on every measured step
        for measured, expected in zip(compact["bytes"], compact["expected"]):
            for key, value in expected.items():
                assert measured[key] == value, f"{where}: {key} measured {measured[key]} != {value}"
        assert compact["dense_master_freed"], f"{where}: DeepSpeed's dense fp32 partition is still referenced"
        # RigL's dense gradient on update steps (a transient); magnitude pruning needs none, so none is kept
        assert (compact["transient_dense_grad_bytes"] > 0) == (method == "rigl"), where
        d, c = dense["bytes"][-1], compact["bytes"][-1]
        assert d["weights"] == c["weights"], where
        # masks stay sharded: the packed reduction builds each tensor's full mask when needed, keeps none
        assert c["masks"] == d["masks"], where
        # only active gradients are reduced, except on steps that use the dense gradient (RigL)
        reduce = compact["reduce"]
        dense_steps = compact["scheduled_updates"] if method == "rigl" else 0  # magnitude: always packed
        assert len(reduce) == 20 and sum(r["dense"] for r in reduce) == dense_steps, where
        for k, r in enumerate(reduce):
            assert r["measured"] == r["expected"], f"{where} step {k}: reduced {r['measured']} bytes, " \
                                                   f"expected {r['expected']} (dense step: {r['dense']})"
        if dense_steps:
            packed = [r["measured"] for r in reduce if not r["dense"]]
            assert max(packed) < 0.5 * min(r["measured"] for r in reduce if r["dense"]), where
        for key in ("master_weights", "optimizer_state", "gradients"):
            assert c[key] < 0.5 * d[key], f"{where}: {key} {c[key]} not below half of dense {d[key]}"
        # ZeRO-3 fp32: the active master values live in the lp shard, no packed copy between steps
        assert compact["master_in_lp"] == (stage == 3 and dtype == "fp32"), where
        if compact["master_in_lp"]:
            assert c["master_weights"] == 0, where


@pytest.mark.slow
def test_fp16_compact_checkpoint_resume_exact(tmp_path, capsys):
    """fp16 with dynamic loss scaling through the trainer (tests/workers/fp16_train_worker.py): the first steps
    overflow, the checkpoint keeps the loss scaler's state, and the resumed run continues at the same scale with
    the same losses (restarting at the initial scale would overflow again and skip steps the other run took)."""
    common = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32", "data.max_chars=20000",
              "deepspeed.train_micro_batch_size_per_gpu=2", "deepspeed.zero_optimization.stage=2",
              "deepspeed.fp16.enabled=true", "deepspeed.fp16.initial_scale_power=20",
              "deepspeed.fp16.loss_scale_window=3", "deepspeed.gradient_clipping=0.0",
              "train.log_interval=1", "train.eval_interval=1000", "train.eval_batches=2", "train.progress=false",
              "train.save_final_model=false", "train.tensorboard=false", "sparsity.update_interval=3",
              "sparsity.end_step=9", "train.steps=10", "train.threads=1",
              "sparsity.compact_state=true"]
    # the uninterrupted run is the reference and, through its step-4 checkpoint, the resume source (resumed into a
    # fresh directory); it also saves at step 8, which the resumed run does not: a save that disturbed training
    # would show in steps 9 and 10
    full, part = tmp_path / "full", tmp_path / "part"
    run_torchrun("fp16_train_worker.py", 2, *common, f"train.output_dir={full}", "train.save_interval=4")
    ckpt = full / "checkpoints" / "step_00000004"
    run_torchrun("fp16_train_worker.py", 2, *common, f"train.output_dir={part}", "--resume", ckpt)
    scaler = json.loads((ckpt / "trainer.json").read_text())["loss_scaler"]
    assert scaler["cur_scale"] < 2 ** 20, scaler  # the scale had come down by step 4

    def losses(d):
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    ref, got = losses(full), losses(part)
    for step in range(5, 11):
        assert got[step] == ref[step], f"step {step}: resumed loss {got[step]} != {ref[step]}"
    summary = json.loads((full / "summary.json").read_text())
    assert summary["fp16_overflow_steps"] > 0 and summary["skipped_steps"] == 0, summary
    assert summary["compact_state"] is True
    # `dist-sparse plan` predicts fp16 like bf16 (2-byte weights and gradients): within 1% of the measurement
    from dist_sparse.cli import plan as plan_cli

    sets = [x for o in common for x in ("--set", o)]
    assert plan_cli.main([str(ROOT / "configs" / "demo.yaml"), "--world-size", "2", "--json", *sets]) == 0
    predicted = json.loads(capsys.readouterr().out)
    assert predicted["precision"] == "fp16" and predicted["compact_state"] is True
    measured = summary["state_bytes_per_rank"]
    for key, value in predicted["state_bytes_per_rank"].items():
        assert abs(value - measured[key]) <= 0.01 * measured[key], f"{key}: predicted {value}, measured {measured[key]}"


@pytest.mark.slow
def test_fp16_static_loss_scale_overflow_aborts(tmp_path):
    """A static fp16 loss scale that always overflows is a failure, not routine: the skips count against
    train.max_skipped_steps and the run stops with a message naming the cause (masked-dense, ZeRO-2)."""
    overrides = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32",
                 "data.max_chars=20000", "deepspeed.train_micro_batch_size_per_gpu=2",
                 "deepspeed.zero_optimization.stage=2", "deepspeed.fp16={enabled: true, loss_scale: 1.0e+30}",
                 "train.max_skipped_steps=3", "train.steps=10", "train.progress=false", "train.tensorboard=false",
                 "train.save_final_model=false", f"train.output_dir={tmp_path}"]
    with pytest.raises(AssertionError, match="3 consecutive steps overflowed with a static fp16 loss scale"):
        run_torchrun("fp16_train_worker.py", 2, *overrides)


@pytest.mark.slow
@pytest.mark.parametrize("stage, gas", [(2, 1), (3, 1), (1, 2)])  # ZeRO-1: 2 micro-batches summed, reduced packed
def test_compact_checkpoint_resume_exact(stage, gas, tmp_path):
    common = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32", "data.max_chars=20000",
              "deepspeed.train_micro_batch_size_per_gpu=2", f"deepspeed.zero_optimization.stage={stage}",
              "train.log_interval=1", "train.eval_interval=1000", "train.eval_batches=2", "train.progress=false",
              "train.save_final_model=false", "train.tensorboard=false", "sparsity.update_interval=3",
              "sparsity.end_step=9", "train.steps=10", "train.threads=1",
              "sparsity.grow_grad_steps=1",  # explicit: the default window differs between compact and masked-dense
              f"deepspeed.gradient_accumulation_steps={gas}"]
    # the uninterrupted compact run is the reference and, through its step-4 checkpoint, the resume source (resumed
    # into a fresh directory; a kill before a resume is test_checkpoint_resume.py's). It also saves at step 8,
    # which the resumed run does not: a save that disturbed training would show in steps 9 and 10
    full, part = tmp_path / "full", tmp_path / "part"
    dist_sparse_train(full, common + ["sparsity.compact_state=true", "train.save_interval=4"], nproc=2)
    dist_sparse_train(part, common + ["sparsity.compact_state=true"], nproc=2,
                      resume=full / "checkpoints" / "step_00000004")
    # a dense (masked) run's checkpoint resumes as a compact run: the checkpoint format is the same (checked at
    # ZeRO-2 and ZeRO-3, whose compact state differs; ZeRO-1 shares ZeRO-2's)
    dense, mixed = tmp_path / "dense", tmp_path / "mixed"
    if stage != 1:
        dist_sparse_train(dense, common + ["train.save_interval=4"], nproc=2)
        dist_sparse_train(mixed, common + ["sparsity.compact_state=true"], nproc=2,
                          resume=dense / "checkpoints" / "step_00000004")

    def losses(d):
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    ref = losses(full)
    for d in (part, mixed) if stage != 1 else (part,):
        got = losses(d)
        for step in range(5, 11):
            assert got[step] == ref[step], f"ZeRO-{stage} gas {gas} {d.name}: step {step} loss {got[step]} != " \
                                           f"{ref[step]}"
    summary = json.loads((full / "summary.json").read_text())
    sb = summary["state_bytes_per_rank"]
    assert summary["compact_state"] is True
    assert set(sb) == {"weights", "gradients", "master_weights", "optimizer_state", "masks",
                       "compression_residuals", "total"}
    assert sb["total"] == max(sum(v for k, v in r.items() if k != "total") for r in summary["state_bytes_by_rank"])
    assert summary["transient_bytes_per_rank"]["dense_gradient_on_update_steps"] > 0
    # only active gradients were reduced on the steps without a mask update (update steps: DeepSpeed, dense)
    reduce = summary["grad_reduce"]
    assert reduce["measured"] and reduce["packed_steps"] + reduce["dense_steps"] == 10, reduce
    assert reduce["packed_bytes_per_step"] < 0.5 * reduce["dense_deepspeed_bytes_per_step"], reduce
    assert summary["transient_bytes_per_rank"]["packed_gradient_exchange"] > 0
    # masks stay sharded: each tensor's full mask is built in the gradient hooks (bytes counted, in the total),
    # one tensor's bits in flight at a time (tests/test_sharded_masks.py checks the figures exactly)
    assert reduce["replicate_masks"] is False and reduce["mask_sync_bytes_per_step"] > 0, reduce
    assert summary["mask_sync_bytes_per_step"] == reduce["mask_sync_bytes_per_step"]
    assert summary["grad_reduce_bytes_per_step"] > reduce["mask_sync_bytes_per_step"]
    assert summary["transient_bytes_per_rank"]["mask_bits_in_flight"] > 0
    # fp32 at ZeRO-3: no packed master between steps, only inside them (reported as a transient)
    assert (summary["transient_bytes_per_rank"]["packed_master_during_step"] > 0) == (stage == 3)
    assert (sb["master_weights"] == 0) == (stage == 3)
