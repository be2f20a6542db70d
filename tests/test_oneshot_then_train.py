"""One-shot output -> `dist-sparse train`: fine-tuning from a `dist-sparse sparsify` directory keeps its masks and
keeps the pruned weights at exactly 0 (one-shot's hand-off to the sparse trainer), on 2 ranks under ZeRO-2."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from dist_sparse.data import char_tokenizer, embedded_corpus
from dist_sparse.masks import load_masks
from dist_sparse.oneshot.tiny import tiny_gpt2
from tests.distributed_utils import ROOT, dist_sparse_train


@pytest.mark.slow
def test_train_from_sparsify_output_keeps_masked_weights_zero(tmp_path):
    text = embedded_corpus(120_000)
    data = tmp_path / "corpus.txt"
    data.write_text(text)
    model_dir = tiny_gpt2(tmp_path / "dense", char_tokenizer(text), n_embd=32, n_layer=2, n_head=2, n_positions=64)
    out = tmp_path / "pruned"
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "dist_sparse.cli.main", "sparsify", str(model_dir), "--method",
                           "wanda", "--sparsity", "0.5", "--calib", str(data), "--samples", "8", "--seqlen", "32",
                           "--out", str(out), "--no-progress"], env=env, capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    masks = load_masks(out)
    assert masks and all(abs(float(m.float().mean()) - 0.5) < 0.01 for m in masks.values())

    run = tmp_path / "finetune"
    dist_sparse_train(run, [f"model.pretrained={out}", "sparsity.method=static", f"sparsity.init_masks={out}",
                            f"data.path={data}", "model.block_size=32", "train.steps=6", "train.eval_interval=100",
                            "train.eval_batches=2", "train.progress=false",
                            "deepspeed.train_micro_batch_size_per_gpu=4", "deepspeed.zero_optimization.stage=2"],
                      nproc=2)
    tuned = AutoModelForCausalLM.from_pretrained(run / "final")
    before = AutoModelForCausalLM.from_pretrained(out)
    params, old = dict(tuned.named_parameters()), dict(before.named_parameters())
    after_masks = load_masks(run / "final")
    assert set(after_masks) == set(masks)
    for name, mask in masks.items():
        assert torch.equal(after_masks[name], mask), name
        assert torch.all(params[name][~mask] == 0), name
        assert not torch.equal(params[name], old[name]), f"{name} did not train"
