"""The Hugging Face Trainer with our ``sparsity`` block in its DeepSpeed config and SparsityCallback, on 2 CPU ranks:
pruned weights 0 after every step, mask updates at the configured steps, our metrics in Trainer's logs, masks in
every checkpoint and beside ``save_model``'s weights, resume equality (tests/workers/hf_trainer_worker.py). ZeRO-2
runs compact state with top-k gradient compression on a Llama, and compact state with 8x8 blocks on the block-sparse
kernels (the weights held as blocks); ZeRO-3 the masked-dense state on a Mixtral (fused experts registered as ZeRO-3
leaves). Plus the config checks."""

import json

import pytest

from dist_sparse.errors import ConfigError
from tests.distributed_utils import run_torchrun

CASES = [(2, "compact"), (3, "dense"), (2, "held")]


@pytest.fixture(scope="module")
def _reports(tmp_path_factory):
    """One launch runs both cases (process start-up dominates a case): (stage, mode) -> per-rank results."""
    work = tmp_path_factory.mktemp("hf_trainer")
    out = work / "report.json"
    run_torchrun("hf_trainer_worker.py", 2, ",".join(f"{s}:{m}" for s, m in CASES), out, work)
    per_rank = json.loads(out.read_text())
    assert len(per_rank) == 2
    return {(s, m): [r[f"{s}:{m}"] for r in per_rank] for s, m in CASES}


@pytest.mark.slow
@pytest.mark.parametrize("stage,mode", CASES)
def test_trainer_sparse_training_and_resume(stage, mode, _reports):
    per_rank = _reports[(stage, mode)]
    for rank, r in enumerate(per_rank):
        where = f"ZeRO-{stage} {mode} rank {rank}"
        assert r["world"] == [2, 2], where
        assert not r["deepspeed_sees_block"] and not r["engine_config_has_block"], f"{where}: DeepSpeed saw our block"
        assert r["compact"] == (mode in ("compact", "held")) and r["compression"] == (mode == "compact"), where
        # compact state on the block-sparse kernels: every sparsified Llama projection held as its active blocks
        assert (r["held"] == 14) == (mode == "held") and (r["held"] == 0) == (mode != "held"), where
        assert r["owned"] < r["total"], f"{where}: masks not sharded"
        assert ("MixtralExperts" in r["leaves"]) == (stage == 3), where
        # RigL every 2 steps until step 6: updates at engine steps 2 and 4 (the Trainer's steps 3 and 5)
        assert {int(s): v["updates"] for s, v in r["a"].items()} == {1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 2, 7: 2, 8: 2}
        for run in ("a", "b"):
            assert all(v["pruned_nonzero"] == 0 for v in r[run].values()), f"{where} run {run}: pruned weights"
            assert all(v["wrapped"] == "SparseEngine" for v in r[run].values()), where
        assert r["logged_steps"] == list(range(1, 9)), where
        for key in ("sparsity", "sparsity/density", "sparsity/mask_updates", "sparsity/flops_relative_to_dense",
                    "sparsity/skipped_steps"):
            assert key in r["logged_keys"], f"{where}: {key} not in Trainer's logs"
        assert r["logged_updates"] == [0, 0, 1, 1, 2, 2, 2, 2], where
        assert all(abs(s - 0.8) < 0.01 for s in r["logged_sparsity"]), where
        assert all(0.2 < f < 0.6 for f in r["logged_flops"]), where  # 80% sparse layers, dense embeddings/attention
        assert r["logged_flops"][:3] == pytest.approx(r["expected_flops"], rel=1e-9), where
        assert sorted(r["b"]) == ["5", "6", "7", "8"], where
        assert all(r["resume_masks_equal"].values()), f"{where}: resumed masks differ"
        assert all(r["resume_weights_equal"].values()), f"{where}: resumed weights differ {r['resume_weights_maxdiff']}"
        assert r["args_reused"] == ["rigl", 0.8], where
        assert r["missing_block"][0] == "sparsity" and "no 'sparsity' block" in r["missing_block"][1], where
    r0 = per_rank[0]
    assert r0["saved_masks_equal"] and r0["saved_pruned_nonzero"] == 0 and r0["saved_weights_equal"]
    assert r0["saved_names_missing"] == []
    assert {"sparsity_masks.safetensors", "dist_sparse", "model.safetensors"} <= set(r0["checkpoint_files"])
    assert r0["checkpoint_masks_equal"]


def _ds(stage, **sparsity):
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "zero_optimization": {"stage": stage}, "bf16": {"enabled": "auto"},
            "sparsity": {"method": "rigl", "sparsity": 0.9, **sparsity}}


def test_trainer_config_checks():
    from dist_sparse.hf_trainer import split_trainer_deepspeed_config

    sparsity, compression = split_trainer_deepspeed_config(_ds(2, compact_state=True))  # "auto" values are fine
    assert sparsity.method == "rigl" and sparsity.compact_state and not compression.enabled
    with pytest.raises(ConfigError) as err:
        split_trainer_deepspeed_config({"zero_optimization": {"stage": 2}})
    assert err.value.key == "sparsity" and "no 'sparsity' block" in str(err.value)
    with pytest.raises(ConfigError) as err:
        split_trainer_deepspeed_config(_ds(3, compact_state=True))
    assert err.value.key == "sparsity.compact_state" and "DeepSpeed's own checkpoint" in str(err.value)
    # gradient compression works at ZeRO-3 (without compact state)
    assert split_trainer_deepspeed_config({**_ds(3), "compression": {"method": "topk"}})[1].enabled
    with pytest.raises(ConfigError) as err:
        split_trainer_deepspeed_config({**_ds(2), "sparsity": {"method": "rigl", "sparsity": 1.5}})
    assert err.value.key == "sparsity.sparsity"
