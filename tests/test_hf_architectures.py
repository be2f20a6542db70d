"""Any Hugging Face causal LM through ``model.config``: tiny random-init GPT-2, Llama, Mistral, Qwen2, GPT-NeoX,
OPT, Phi-3 and Mixtral (fused experts) on 2 CPU ranks, all architectures and both ZeRO stages in one launch (ZeRO-2
and ZeRO-3; each architecture runs compact state at one stage and the masked-dense state at the other);
tests/workers/hf_arch_worker.py says what each rank checks. Plus the config rules
of ``model.config`` (precedence over the size keys, bad files)."""

import json
import math

import pytest

from dist_sparse import config as C
from dist_sparse.errors import ConfigError
from tests.distributed_utils import run_torchrun
from tests.hf_architectures import ARCHITECTURES, build, write_config

# the default choice, per architecture: suffixes of the sparsified names in block 0 (everything else stays dense)
EXPECTED = {
    "gpt2": {"attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"},
    "llama": {f"self_attn.{p}_proj.weight" for p in "qkvo"} | {f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
    "gpt_neox": {"attention.query_key_value.weight", "attention.dense.weight", "mlp.dense_h_to_4h.weight",
                 "mlp.dense_4h_to_h.weight"},
    "opt": {f"self_attn.{p}_proj.weight" for p in "qkv"} | {"self_attn.out_proj.weight", "fc1.weight", "fc2.weight"},
    "phi3": {"self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight",
             "mlp.down_proj.weight"},
    "mixtral": {f"self_attn.{p}_proj.weight" for p in "qkvo"} | {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"},
}
EXPECTED["mistral"] = EXPECTED["qwen2"] = EXPECTED["llama"]
BLOCK0 = {"gpt2": "transformer.h.0.", "gpt_neox": "gpt_neox.layers.0.", "opt": "model.decoder.layers.0."}


@pytest.fixture(scope="module")
def _reports(tmp_path_factory):
    """One launch runs both ZeRO stages (process start-up dominates): stage -> per-rank results."""
    work = tmp_path_factory.mktemp("archs")
    run_torchrun("hf_arch_worker.py", 2, "2,3", work / "report.json", "alternate", work, timeout=1800)
    per_rank = json.loads((work / "report.json").read_text())
    assert len(per_rank) == 2
    return {stage: [r[str(stage)] for r in per_rank] for stage in (2, 3)}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_architectures_sparse_training(stage, _reports):
    per_rank = _reports[stage]
    assert set(per_rank[0]) == set(ARCHITECTURES)
    for rank, results in enumerate(per_rank):
        for arch, r in results.items():
            where = f"ZeRO-{stage} {arch} rank {rank}"
            prefix = BLOCK0.get(arch, "model.layers.0.")
            block0 = {n[len(prefix):] for n in r["names"] if n.startswith(prefix)}
            assert block0 == EXPECTED[arch], f"{where}: sparsified {sorted(block0)}"
            assert len(r["names"]) == 2 * len(EXPECTED[arch]), f"{where}: {r['names']}"
            # compact state on every other architecture, the others at the other stage
            assert r["compact"] == ((list(ARCHITECTURES).index(arch) + stage) % 2 == 0), where
            assert all(r["reference_equal"]) and len(r["reference_equal"]) == 3, f"{where}: masks differ from the " \
                                                                                  "single-process reference"
            assert r["updates"] == 2, where
            assert r["masked_nonzero"] == [0] * 5, f"{where}: pruned model weights not exactly 0"
            assert r["master_masked_nonzero"] == [0] * 5, f"{where}: pruned master weights not exactly 0"
            assert all(x == x and x < 10 for x in r["losses"]), where
            assert abs(r["achieved_sparsity"] - 0.8) < 0.01, where
            assert r["owned"] < r["total"] and r["mask_bytes"] <= r["owned"] // 8 + 16, f"{where}: masks not sharded"
            if arch == "mixtral":  # one density per expert: each expert keeps exactly its own layer's count
                counts = {**r["expert_counts_initial"], **r["expert_counts_final"]}
                assert len(r["expert_counts_final"]) == 2 * 2 * 4, where
                assert all(have == want for have, want in counts.values()), f"{where}: {counts}"
            if rank == 0:
                assert r["final_masks_equal"] and r["final_pruned_nonzero"] == 0, f"{where}: final/ masks"
                assert r["final_weights_equal"], f"{where}: final/ weights differ from the engine's"
                assert r["final_tied"] == r["tied"] == ARCHITECTURES[arch]["tie_word_embeddings"], \
                    f"{where}: tied embeddings"
                assert r["final_max_positions"], where
    assert sum(per_rank[k]["llama"]["owned"] for k in range(2)) == per_rank[0]["llama"]["total"]


def test_model_config_builds_the_architecture(tmp_path):
    path = write_config(tmp_path / "m", "mixtral")
    cfg = C.load(None, [f"model.config={path.parent}", "model.block_size=32"])  # a directory holding config.json
    assert cfg.model.config == str(path.parent) and cfg.model.source == "config"
    again = C.from_dict(cfg.to_dict())  # the saved run config loads again (no size keys next to model.config)
    assert again.model.config == cfg.model.config
    from dist_sparse.integration.hf import build_causal_lm

    model = build_causal_lm(cfg.model, 40)
    assert type(model).__name__ == "MixtralForCausalLM"
    with pytest.raises(ConfigError) as err:
        build_causal_lm(cfg.model, 65)  # the data's vocabulary does not fit the config's embedding
    assert err.value.key == "model.config"


@pytest.mark.parametrize("overrides,key", [
    (["model.n_layer=2"], "model.n_layer"),
    (["model.type=llama"], "model.type"),
    (["model.extra={rope_theta: 10.0}"], "model.extra"),
    (["model.pretrained={dir}"], "model.config"),
    (["model.block_size=65"], "model.block_size"),  # beyond max_position_embeddings (64)
])
def test_model_config_precedence(tmp_path, overrides, key):
    path = write_config(tmp_path / "m", "llama")
    overrides = [o.replace("{dir}", str(tmp_path)) for o in overrides]
    with pytest.raises(ConfigError) as err:
        C.load(None, [f"model.config={path}", *overrides])
    assert err.value.key == key, err.value


def test_size_keys_with_pretrained_and_null_unsets(tmp_path):
    from transformers import GPT2Config

    # a checkpoint directory's config.json (the config check reads its max_position_embeddings)
    GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=256).save_pretrained(tmp_path)
    with pytest.raises(ConfigError) as err:
        C.load(None, [f"model.pretrained={tmp_path}", "model.n_embd=64"])
    assert err.value.key == "model.n_embd"
    cfg = C.load(None, [f"model.pretrained={tmp_path}", "model.n_embd=null"])  # null unsets a base file's key
    assert cfg.model.pretrained == str(tmp_path)


@pytest.mark.parametrize("content,expect", [
    (None, "does not exist"),
    ("{not json", "cannot read"),
    ('{"model_type": "no_such_model"}', "cannot read"),
    ('{"model_type": "resnet"}', "no causal LM class"),
])
def test_model_config_bad_files(tmp_path, content, expect):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as err:
        C.load(None, [f"model.config={path}"])
    assert err.value.key == "model.config" and expect in str(err.value), err.value
    assert str(path) in str(err.value)


def test_experts_are_one_layer_each_in_flops():
    from dist_sparse.integration.hf import sparsifiable_parameters, training_flops_per_token

    model = build("mixtral")
    names = sparsifiable_parameters(model)
    experts = [n for n in names if n.endswith("experts.gate_up_proj")]
    dense = training_flops_per_token(model, {}, 16, 2, 32)
    half = training_flops_per_token(model, {n: 0.5 for n in experts}, 16, 2, 32)
    # top-2 of 4 experts: a token runs through half of each stacked tensor, so halving its density saves 1/4
    numel = sum(dict(model.named_parameters())[n].numel() for n in experts)
    assert dense - half == pytest.approx(3 * 2 * numel * 0.5 * 0.5)


# configs/demo.yaml describes its built-in model with size keys; with model.config they are unset (null)
UNSET_SIZES = ["model.type=null", "model.n_layer=null", "model.n_head=null", "model.n_embd=null"]


@pytest.mark.slow
def test_train_cli_with_model_config_mixtral_zero3(tmp_path):
    """`dist-sparse train` with ``model.config``: a Mixtral config at ZeRO-3 on 2 ranks (fused experts registered
    as ZeRO-3 leaves, FLOPs from the real shapes), ending in a final/ that loads as a MixtralForCausalLM."""
    import torch
    from transformers import AutoModelForCausalLM

    from dist_sparse.masks import load_masks
    from tests.distributed_utils import dist_sparse_train

    path = write_config(tmp_path / "mixtral", "mixtral")
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, "vocab_size": 256}))  # byte-level data
    run = tmp_path / "run"
    dist_sparse_train(run, [*UNSET_SIZES, f"model.config={path}", "model.block_size=32", "data.tokenizer=byte",
                            "data.max_chars=100000", "train.steps=6", "train.eval_interval=100",
                            "train.eval_batches=2", "train.progress=false", "sparsity.update_interval=2",
                            "deepspeed.train_micro_batch_size_per_gpu=2", "deepspeed.zero_optimization.stage=3"],
                      nproc=2)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["zero_stage"] == 3 and summary["world_size"] == 2 and summary["mask_updates"] == 1  # step 2
    assert abs(summary["achieved_sparsity"] - 0.9) < 1e-3
    assert 0 < summary["flops_relative_to_dense"] < 1
    assert summary["total_parameters"] == sum(p.numel() for p in build("mixtral").parameters()) + 192 * 32 * 2
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    assert type(model).__name__ == "MixtralForCausalLM"
    params, masks = dict(model.named_parameters()), load_masks(run / "final")
    assert "model.layers.0.mlp.experts.gate_up_proj" in masks and "model.layers.0.mlp.gate.weight" not in masks
    for name, mask in masks.items():
        assert torch.all(params[name][~mask] == 0), name
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["config"] == str(path) and "n_layer" not in saved["model"]


def test_qwen2_moe_default_choice():
    """Qwen2-MoE (the other fused-expert family): experts and the shared expert sparsified; the router and the
    one-output shared_expert_gate dense; the expert block is what ZeRO-3 registers as a leaf."""
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    from dist_sparse.integration.hf import expert_module_classes, sparsifiable_parameters

    model = AutoModelForCausalLM.from_config(Qwen2MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, max_position_embeddings=64))
    block0 = {n[len("model.layers.0."):] for n in sparsifiable_parameters(model) if n.startswith("model.layers.0.")}
    assert block0 == ({f"self_attn.{p}_proj.weight" for p in "qkvo"} | {"mlp.experts.gate_up_proj",
                      "mlp.experts.down_proj"} | {f"mlp.shared_expert.{p}_proj.weight" for p in ("gate", "up", "down")})
    assert [c.__name__ for c in expert_module_classes(model)] == ["Qwen2MoeExperts"]


def test_plan_counts_experts_per_matrix(tmp_path, capsys):
    """`dist-sparse plan` with a Mixtral model.config runs, and the per-parameter kept counts it derives
    (``layer_shapes`` + ``parameter_counts``: ERK over the 2-D expert matrices) equal the masks training draws."""
    import torch

    from dist_sparse.cli import plan
    from dist_sparse.config import SparsityConfig
    from dist_sparse.distributions import keep_counts, layer_densities
    from dist_sparse.integration.experts import build_layer_method, layer_shapes, parameter_counts
    from dist_sparse.integration.hf import sparsifiable_parameters
    from dist_sparse.masks.select import LocalSelector
    from dist_sparse.methods import LayerSlice

    path = write_config(tmp_path / "m", "mixtral")
    path.write_text(json.dumps({**json.loads(path.read_text()), "vocab_size": 256}))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{config: {path}, block_size: 32}}\ndata: {{tokenizer: byte, max_chars: 20000}}\n"
                   "deepspeed: {zero_optimization: {stage: 2}}\nsparsity: {method: rigl, sparsity: 0.9}\n")
    assert plan.main([str(cfg), "--world-size", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "config"

    model = build("mixtral")
    params = dict(model.named_parameters())
    shapes = {n: tuple(params[n].shape) for n in sparsifiable_parameters(model)}
    assert out["sparsified_parameters"] == sum(math.prod(s) for s in shapes.values())
    layers = layer_shapes(shapes)
    planned = parameter_counts(shapes, keep_counts({n: math.prod(s) for n, s in layers.items()},
                                                   layer_densities(layers, 0.9, "erk")))
    method = build_layer_method(SparsityConfig(method="rigl", sparsity=0.9), shapes, 100, 0)
    names = sorted(shapes)
    slices = [LayerSlice(n, i, shapes[n], math.prod(shapes[n]), 0, torch.ones(math.prod(shapes[n]), dtype=torch.bool),
                         None, None) for i, n in enumerate(names)]
    drawn = {n: int(m.sum()) for n, m in zip(names, method.initial_masks(slices, LocalSelector()))}
    assert drawn == planned
