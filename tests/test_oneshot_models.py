"""One-shot pruning of tiny GPT-2 / Llama / BERT checkpoints: per-layer targets, sequential calibration,
data-parallel equality, checkpoint + masks + compressed export round trips, eval and CLI errors."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from dist_sparse.cli import evaluate as eval_cli
from dist_sparse.cli import sparsify as sparsify_cli
from dist_sparse.errors import ConfigError, UnsupportedModelError
from dist_sparse.masks.io import load_masks
from dist_sparse.oneshot.calibration import PruneSettings, calibration_samples, load_text, prune_model, tokenize_text
from dist_sparse.oneshot.export import load_compressed, save_pruned_checkpoint
from dist_sparse.oneshot.layers import find_blocks, is_conv1d, linear_weight
from dist_sparse.oneshot.pipeline import load_model, load_tokenizer
from dist_sparse.oneshot.tiny import char_tokenizer, tiny_bert, tiny_gpt2, tiny_llama


def synthetic_text(n_chars=20000, seed=0):
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 7))) for _ in range(300)]
    out, size = [], 0
    while size < n_chars:
        w = rng.choice(words) + rng.choice([" ", " ", " ", ", ", ".\n"])
        out.append(w)
        size += len(w)
    return "".join(out)[:n_chars]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("oneshot")
    text = synthetic_text()
    tok = char_tokenizer(text + "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    (root / "calib.txt").write_text(text[:15000])
    (root / "heldout.txt").write_text(text[15000:])
    return {
        "root": root,
        "tok": tok,
        "calib": root / "calib.txt",
        "heldout": root / "heldout.txt",
        "gpt2": tiny_gpt2(root / "gpt2", tok),
        "llama": tiny_llama(root / "llama", tok),
        "bert": tiny_bert(root / "bert", tok),
    }


def samples_for(tiny, n=8, seqlen=32):
    ids = tokenize_text(tiny["tok"], load_text(tiny["calib"]))
    return calibration_samples(ids, n, seqlen, seed=0)


EXPECTED_LAYERS = {"gpt2": 8, "llama": 14, "bert": 12}  # prunable Linear/Conv1D per tiny model (2 blocks)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_unstructured_exact_sparsity_per_layer(tiny, arch, method):
    model = load_model(tiny[arch])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = prune_model(model, samples_for(tiny), PruneSettings(method=method, sparsity=0.5, progress=False))
    assert len(res.masks) == EXPECTED_LAYERS[arch]
    params = dict(model.named_parameters())
    for name, mask in res.masks.items():
        w = params[name]
        assert mask.shape == w.shape
        if method == "magnitude":  # layer-wise: exactly half of the layer
            assert int((~mask).sum()) == w.numel() // 2
        else:  # per output row: exactly half of every row ([out, in] layout)
            module = dict(model.named_modules())[name[:-len(".weight")]]
            m = mask.t() if is_conv1d(module) else mask  # -> [out, in]
            assert ((~m).sum(1) == m.shape[1] // 2).all()
        assert (w[~mask] == 0).all()
        assert int((w == 0).sum()) == int((~mask).sum())
    # nothing outside the blocks' linears changed; magnitude and wanda do not update kept weights
    for name, w in params.items():
        if name not in res.masks:
            assert torch.equal(w, before[name]), name
        elif method != "sparsegpt":
            assert torch.equal(w[res.masks[name]], before[name][res.masks[name]])


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_two_four_pattern_in_every_group(tiny, arch, method):
    model = load_model(tiny[arch])
    res = prune_model(model, samples_for(tiny), PruneSettings(method=method, nm=(2, 4), progress=False))
    modules = dict(model.named_modules())
    for name, mask in res.masks.items():
        module = modules[name[:-len(".weight")]]
        w = linear_weight(module)  # [out, in]: groups of 4 consecutive input features
        m = mask.t() if is_conv1d(module) else mask
        assert (m.reshape(w.shape[0], -1, 4).sum(-1) == 2).all(), name
        assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all(), name


def test_calibration_is_sequential_through_pruned_layers(tiny):
    """Block 1's statistics must come from activations of the *pruned* block 0: pruning only block 1 of an
    already block-0-pruned model gives the same block-1 weights as pruning both in one run."""
    samples = samples_for(tiny)
    both = load_model(tiny["gpt2"])
    prune_model(both, samples, PruneSettings(method="sparsegpt", sparsity=0.5, progress=False))
    staged = load_model(tiny["gpt2"])
    prune_model(staged, samples, PruneSettings(method="sparsegpt", sparsity=0.5, include=r"\.h\.0\.", progress=False))
    prune_model(staged, samples, PruneSettings(method="sparsegpt", sparsity=0.5, include=r"\.h\.1\.", progress=False))
    dense_then = load_model(tiny["gpt2"])
    prune_model(dense_then, samples, PruneSettings(method="sparsegpt", sparsity=0.5, include=r"\.h\.1\.",
                                                   progress=False))
    w_both = both.transformer.h[1].mlp.c_fc.weight
    torch.testing.assert_close(staged.transformer.h[1].mlp.c_fc.weight, w_both)
    assert not torch.allclose(dense_then.transformer.h[1].mlp.c_fc.weight, w_both)


def test_layer_selection(tiny):
    model = load_model(tiny["llama"])
    res = prune_model(model, samples_for(tiny), PruneSettings(method="wanda", sparsity=0.5, include="mlp",
                                                              exclude="down_proj", progress=False))
    expected = [f"model.layers.{i}.mlp.{p}_proj.weight" for i in range(2) for p in ("gate", "up")]
    assert sorted(res.masks) == sorted(expected)
    assert (model.model.layers[0].self_attn.q_proj.weight != 0).all()
    with pytest.raises(ConfigError, match="--include"):
        prune_model(model, None, PruneSettings(method="magnitude", sparsity=0.5, include="nothing_matches"))


def test_block_discovery():
    from transformers import ResNetConfig, ResNetModel

    assert find_blocks(_gpt2_meta())[0] == "transformer.h"
    with pytest.raises(UnsupportedModelError, match="no list of transformer blocks"):
        find_blocks(ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1])))


def _gpt2_meta():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=16, n_positions=8))


def test_checkpoint_round_trip_and_compressed_export(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    for pattern, arch in (((2, 4), "gpt2"), (None, "llama")):
        model = load_model(tiny[arch])
        settings = PruneSettings(method="sparsegpt", sparsity=None if pattern else 0.5, nm=pattern, progress=False)
        res = prune_model(model, samples_for(tiny), settings)
        out = save_pruned_checkpoint(model, tiny["tok"], res.masks, tmp_path / f"out_{arch}", source_dir=tiny[arch],
                                     report={"test": True}, nm=pattern)
        x = samples_for(tiny, n=2, seqlen=24)
        loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)
        # masks: every pruned weight, True = kept, agrees with the saved zeros
        masks = load_masks(out)
        assert set(masks) == set(res.masks)
        saved = dict(loaded.named_parameters())
        for name, mask in masks.items():
            assert torch.equal(mask, res.masks[name])
            assert (saved[name][~mask] == 0).all()
        # compressed-tensors export decompresses to the very same weights
        config = json.loads((out / "compressed" / "config.json").read_text())
        sc = config["quantization_config"]["sparsity_config"]
        assert sc["format"] == ("sparse-24-bitmask" if pattern else "sparse-bitmask")
        assert sc["sparsity_structure"] == ("2:4" if pattern else "unstructured")
        assert abs(sc["global_sparsity"] - 0.5) < 1e-9
        raw = load_file(str(out / "compressed" / "model.safetensors"))
        dense_bytes = sum(t.numel() * t.element_size() for t in loaded.state_dict().values())
        assert sum(t.numel() * t.element_size() for t in raw.values()) < dense_bytes
        decompressed = load_compressed(out)
        state = loaded.state_dict()
        assert set(decompressed) == set(state)
        for k in state:
            assert torch.equal(decompressed[k], state[k]), k
        # tokenizer copied
        assert len(load_tokenizer(out)) == len(tiny["tok"])


def test_compressed_layout_matches_compressed_tensors(tiny, tmp_path):
    """Decode one 2:4 weight by hand with compressed_tensors.utils.unpack_bitmasks: values row-major, 2 per 4."""
    from compressed_tensors.config import Sparse24BitMaskConfig
    from compressed_tensors.utils import unpack_bitmasks

    model = load_model(tiny["llama"])
    res = prune_model(model, None, PruneSettings(method="magnitude", nm=(2, 4), progress=False))
    out = save_pruned_checkpoint(model, tiny["tok"], res.masks, tmp_path / "o", source_dir=tiny["llama"],
                                 report={}, nm=(2, 4))
    raw = load_file(str(out / "compressed" / "model.safetensors"))
    prefix = "model.layers.0.mlp.down_proj"
    shape = raw[f"{prefix}.shape"].flatten().tolist()
    w = model.model.layers[0].mlp.down_proj.weight.detach()
    assert shape == list(w.shape)
    assert raw[f"{prefix}.compressed"].shape == (shape[0], shape[1] // 2)
    mask = unpack_bitmasks(raw[f"{prefix}.bitmask"], shape)
    assert torch.equal(mask, res.masks[f"{prefix}.weight"])
    dense = torch.zeros(shape)
    dense[mask] = raw[f"{prefix}.compressed"].flatten()
    assert torch.equal(dense, w)
    cfg = json.loads((out / "compressed" / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert Sparse24BitMaskConfig(**cfg).sparsity_structure == "2:4"


def run_cli(module, argv, capsys):
    rc = module.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.slow
@pytest.mark.parametrize("method,target", [("sparsegpt", ["--sparsity", "0.5"]), ("wanda", ["--pattern", "2:4"])])
def test_two_ranks_equal_one_rank(tiny, tmp_path, capsys, method, target):
    """--nproc 2 splits 11 windows 5/6 across gloo ranks (micro-batches of 4 differ too) and all-reduces float64
    statistic sums: pruned weights equal the 1-rank run (assert_close at float32 defaults: rtol 1.3e-6, atol 1e-5)
    and the masks are identical."""
    outs = {}
    for nproc in (1, 2):
        outs[nproc] = tmp_path / f"n{nproc}"
        rc, out, err = run_cli(sparsify_cli, [tiny["gpt2"], "--method", method, *target, "--calib", tiny["calib"],
                                              "--samples", 11, "--seqlen", 32, "--batch-size", 4, "--out",
                                              outs[nproc], "--nproc", nproc, "--no-progress"], capsys)
        assert rc == 0, err
        assert json.loads(out.strip().splitlines()[-1])["world_size"] == nproc
    report = json.loads((outs[2] / "sparsify_report.json").read_text())
    assert report["samples_per_rank"] == [5, 6]
    w1, w2 = load_file(str(outs[1] / "model.safetensors")), load_file(str(outs[2] / "model.safetensors"))
    assert set(w1) == set(w2)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k])
    m1, m2 = load_masks(outs[1]), load_masks(outs[2])
    assert all(torch.equal(m1[k], m2[k]) for k in m1)


def test_cli_sparsify_and_eval(tiny, tmp_path, capsys):
    out = tmp_path / "pruned"
    rc, stdout, err = run_cli(sparsify_cli, [tiny["gpt2"], "--method", "wanda", "--sparsity", "0.5", "--calib",
                                             tiny["calib"], "--samples", 8, "--seqlen", 32, "--out", out], capsys)
    assert rc == 0, err
    assert "wanda sparsify" in err  # per-layer progress bar
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["layers"] == 8 and abs(summary["sparsity"] - 0.5) < 1e-9
    for f in ("config.json", "model.safetensors", "tokenizer.json", "sparsity_masks.safetensors",
              "sparsify_report.json", "compressed/config.json", "compressed/model.safetensors"):
        assert (out / f).is_file(), f
    rc, stdout, err = run_cli(eval_cli, [out, "--data", tiny["heldout"], "--seqlen", 64], capsys)
    assert rc == 0, err
    pruned = json.loads(stdout)
    rc, stdout, _ = run_cli(eval_cli, [tiny["gpt2"], "--data", tiny["heldout"], "--seqlen", 64], capsys)
    dense = json.loads(stdout)
    assert abs(pruned["sparsity"] - 0.5) < 1e-9 and dense["sparsity"] == 0.0
    assert pruned["perplexity"] > 1 and dense["perplexity"] > 1
    assert pruned["perplexity"] != dense["perplexity"]
    assert pruned["windows"] == dense["windows"] == len(tokenize_text(tiny["tok"], tiny["heldout"].read_text())) // 64
    # BERT: no perplexity, still sparsity
    rc, stdout, _ = run_cli(eval_cli, [tiny["bert"], "--data", tiny["heldout"], "--seqlen", 64], capsys)
    assert rc == 0 and json.loads(stdout)["perplexity"] is None


def test_perplexity_matches_direct_loss(tiny):
    """Non-overlapping windows: exp of the mean next-token NLL over all windows; strided windows score each token
    once."""
    from dist_sparse.oneshot.eval import perplexity

    model = load_model(tiny["gpt2"])
    ids = tokenize_text(tiny["tok"], tiny["heldout"].read_text())[:200]
    res = perplexity(model, ids, seqlen=50, batch_size=3)
    windows = ids[:200].reshape(4, 50)
    with torch.no_grad():
        loss = model(input_ids=windows, labels=windows).loss
    assert res["windows"] == 4 and res["tokens"] == 4 * 49
    assert abs(res["perplexity"] - torch.exp(loss).item()) < 1e-3 * res["perplexity"]
    strided = perplexity(model, ids, seqlen=50, stride=25)
    assert strided["windows"] == 7 and strided["tokens"] == 49 + 6 * 25


@pytest.mark.parametrize("argv_extra,match", [
    (["--sparsity", "1.0"], "--sparsity: must be in \\[0, 1\\)"),
    (["--sparsity", "-0.1"], "--sparsity: must be in \\[0, 1\\)"),
    (["--pattern", "4:2"], "--pattern"),
    (["--pattern", "3:5"], "not a multiple of M=5"),
])
def test_cli_rejects_bad_targets(tiny, tmp_path, capsys, argv_extra, match):
    rc, _, err = run_cli(sparsify_cli, [tiny["gpt2"], "--method", "sparsegpt", *argv_extra, "--calib", tiny["calib"],
                                        "--out", tmp_path / "o"], capsys)
    assert rc == 2
    assert pytest.importorskip("re").search(match, err), err
    assert not (tmp_path / "o").exists()


def test_cli_errors(tiny, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel, ResNetConfig, ResNetModel

    base = [tiny["gpt2"], "--method", "wanda", "--sparsity", "0.5", "--calib", tiny["calib"], "--seqlen", 32]
    rc, _, err = run_cli(sparsify_cli, [tmp_path / "missing", *base[1:], "--out", tmp_path / "a"], capsys)
    assert rc == 2 and "missing: no such directory" in err
    rc, _, err = run_cli(sparsify_cli, [*base[:5], "--calib", tmp_path / "nope.txt", "--seqlen", 32, "--out",
                                        tmp_path / "a"], capsys)
    assert rc == 2 and "--calib" in err and "nope.txt" in err
    rc, _, err = run_cli(sparsify_cli, [*base, "--out", tiny["gpt2"]], capsys)
    assert rc == 2 and "--out" in err
    # tokenizer larger than the embedding
    small = tmp_path / "small_vocab"
    GPT2LMHeadModel(GPT2Config(vocab_size=10, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(small)
    tiny["tok"].save_pretrained(small)
    rc, _, err = run_cli(sparsify_cli, [small, *base[1:], "--out", tmp_path / "b"], capsys)
    assert rc == 2 and "tokenizer mismatch" in err and "10 rows" in err
    # no tokenizer at all
    notok = tmp_path / "no_tok"
    GPT2LMHeadModel(GPT2Config(vocab_size=70, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(notok)
    rc, _, err = run_cli(sparsify_cli, [notok, *base[1:], "--out", tmp_path / "c"], capsys)
    assert rc == 2 and "no tokenizer in the checkpoint" in err
    # unsupported architecture
    resnet = tmp_path / "resnet"
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1])).save_pretrained(resnet)
    rc, _, err = run_cli(sparsify_cli, [resnet, *base[1:], "--out", tmp_path / "d"], capsys)
    assert rc == 2 and "ResNet" in err and "no list of transformer blocks" in err
    # seqlen beyond the model's positions (tiny gpt2 has 128)
    rc, _, err = run_cli(sparsify_cli, [*base[:-2], "--seqlen", 512, "--out", tmp_path / "e"], capsys)
    assert rc == 2 and "--seqlen" in err
    # non-empty OUT_DIR without --overwrite
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "keep.txt").write_text("x")
    rc, _, err = run_cli(sparsify_cli, [*base, "--out", tmp_path / "f"], capsys)
    assert rc == 2 and "--overwrite" in err and (tmp_path / "f" / "keep.txt").exists()
    rc, _, err = run_cli(eval_cli, [tmp_path / "missing", "--data", tiny["heldout"]], capsys)
    assert rc == 2 and "no such directory" in err


def test_dataset_directory_as_calibration(tiny, tmp_path):
    datasets = pytest.importorskip("datasets")
    text = tiny["calib"].read_text()
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"id": [0, 1], "text": [text[:7000], text[7000:]]})})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert load_text(tmp_path / "ds") == text[:7000] + "\n\n" + text[7000:]
    with pytest.raises(ConfigError, match="no column 'body'"):
        load_text(tmp_path / "ds", text_column="body")


@pytest.mark.slow
def test_under_torchrun_launcher_equals_one_rank(tiny, tmp_path, capsys):
    """With RANK/WORLD_SIZE set by a launcher the processes themselves are the ranks (no spawning)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    args = [tiny["llama"], "--method", "sparsegpt", "--pattern", "2:4", "--calib", tiny["calib"], "--samples", 6,
            "--seqlen", 32, "--no-progress"]
    rc, _, err = run_cli(sparsify_cli, [*args, "--out", tmp_path / "one"], capsys)
    assert rc == 0, err
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_free_port()), "-m", "dist_sparse.cli.main", "sparsify", *map(str, args), "--out",
                           str(tmp_path / "two")], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "two" / "sparsify_report.json").read_text())
    assert report["world_size"] == 2 and report["samples_per_rank"] == [3, 3]
    w1, w2 = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" /
                                                                                  "model.safetensors"))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k])


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
