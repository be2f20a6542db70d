"""End to end: prepare a real corpus with a BPE tokenizer, then pretrain a Llama from its config, dense and RigL 90%.

1. `dist-sparse prepare-data` on the Python standard library's sources (one jsonl document per file, the corpus
   bench_data.py builds, ~100 MB) with `--tokenizer bpe:8192`, into bench/work/pretrain/data.
2. A Llama `config.json` (4 layers, hidden 256, 4 heads, 2 KV heads, SwiGLU 688, vocabulary 8192, 256
   positions), trained with `model.config` from random initialisation by `dist-sparse train --nproc 2`, ZeRO-2,
   context 128, 8 sequences per rank, AdamW (0.9, 0.95, weight decay 0.1), `data.sampling: epoch`: once dense and
   once RigL at 90% sparsity (ERK, every other key at its default).
3. Validation loss (mean token cross-entropy over the prepared validation split's fixed windows) and perplexity.

Resumable: a finished run whose config equals this one's is reused, and the section says so.

    python bench/bench_pretrain.py [--steps 1000] [--mb 100]
"""

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_data import WORK as CORPUS_WORK  # noqa: E402
from bench.bench_data import build_corpus  # noqa: E402
from bench.common import command_line, machine_line, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "pretrain"
CLI = [sys.executable, "-m", "dist_sparse.cli.main"]
ENV = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")

LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 688,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
         "vocab_size": 8192, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
         "bos_token_id": 0, "eos_token_id": 0}
RUNS = {"dense": {"method": "none"}, "rigl 90%": {"method": "rigl", "sparsity": 0.9, "distribution": "erk"}}


def run_config(steps: int, prepared: Path, model_dir: Path, sparsity: dict, out: Path) -> dict:
    return {
        "model": {"config": str(model_dir), "block_size": 128},
        "data": {"prepared": str(prepared), "sampling": "epoch"},
        "train": {"steps": steps, "seed": 0, "output_dir": str(out), "log_interval": max(1, steps // 20),
                  "eval_interval": steps, "eval_batches": 50, "progress": False, "save_final_model": False,
                  "tensorboard": False},
        "deepspeed": {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
                      "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95],
                                                                "weight_decay": 0.1}},
                      "zero_optimization": {"stage": 2}},
        "sparsity": sparsity,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--mb", type=float, default=100.0, help="corpus size in MB")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    CORPUS_WORK.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus("base", args.mb)
    prepared = WORK / "data"
    # prepare-data itself says "up to date" and does nothing when the same inputs were already prepared
    subprocess.run([*CLI, "prepare-data", corpus["path"], "--tokenizer", "bpe:8192", "--out", str(prepared),
                    "--num-proc", "2", "--no-progress"], check=True, env=ENV, cwd=ROOT)
    index = json.loads((prepared / "index.json").read_text())
    model_dir = WORK / "llama"
    model_dir.mkdir(exist_ok=True)
    llama = dict(LLAMA, vocab_size=index["vocab_size"], eos_token_id=index["eos_id"], bos_token_id=index["eos_id"])
    (model_dir / "config.json").write_text(json.dumps(llama, indent=1))
    rows, reused = [], []
    for name, sparsity in RUNS.items():
        out = WORK / name.split()[0]
        cfg = run_config(args.steps, prepared, model_dir, sparsity, out)
        cfg_path = WORK / f"{out.name}.json"
        done = out / "summary.json"
        if done.is_file() and cfg_path.is_file() and json.loads(cfg_path.read_text()) == cfg:
            reused.append(name)
        else:
            cfg_path.write_text(json.dumps(cfg, indent=1))
            subprocess.run([*CLI, "train", str(cfg_path), "--nproc", "2"], check=True, env=ENV, cwd=ROOT)
        s = json.loads(done.read_text())
        rows.append((name, s))
        print(f"{name}: val {s['final_val_loss']:.4f} ppl {math.exp(s['final_val_loss']):.1f}", flush=True)
    dense = rows[0][1]["final_val_loss"]
    table = [f"| {n} | {s['final_val_loss']:.4f} | {math.exp(s['final_val_loss']):.1f} | "
             f"{s['final_val_loss'] / dense:.3f}x | {s['achieved_sparsity']:.3f} | "
             f"{s['total_parameters'] / 1e6:.2f}M | "
             f"{s.get('tokens_seen', 0) / 1e6:.1f}M | {s['median_step_seconds'] * 1e3:.0f} |" for n, s in rows]
    text = [
        "## Pretraining from prepared data: a Llama from its config, dense and RigL 90%",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Machine: {machine_line()}",
        "",
        f"`dist-sparse prepare-data` with `bpe:8192` on the Python standard library's sources "
        f"({corpus['documents']} files, cycled, {corpus['text_bytes'] / 1e6:.0f} MB; "
        f"{index['splits']['train']['tokens'] / 1e6:.1f}M training and "
        f"{index['splits']['val']['tokens'] / 1e6:.2f}M validation tokens), then `dist-sparse train` "
        f"with `model.config` (a Llama config.json: 4 layers, hidden 256, 4 heads / 2 KV heads, SwiGLU 688, tied "
        f"embeddings) and `data.prepared`, 2 ranks, ZeRO-2, {args.steps} steps of 2 x 8 x 128 tokens, epoch sampling. "
        f"Validation loss: mean token cross-entropy over 50 fixed validation windows; perplexity = exp(loss).",
        "",
        "| run | val loss | perplexity | vs dense | sparsity | parameters | tokens seen | step ms |",
        "|---|---|---|---|---|---|---|---|",
        *table,
        "",
        (f"Reused from an earlier invocation with the same config: {', '.join(reused)}." if reused else
         "All runs ran in this invocation."),
    ]
    write_section("72_pretrain", "\n".join(text))


if __name__ == "__main__":
    main()
