"""Gradient compression with momentum SGD: is DGC's momentum correction the better default?

`compression.momentum_correction` left unset follows the optimizer. For Adam/AdamW the compression section measured
the answer (on); this benchmark measures it for momentum SGD, which `dist-sparse train` cannot checkpoint (it is
used through `dist_sparse.initialize` in a user's own loop, as here). The training benchmark's model and data
(tinyshakespeare, char GPT-2 4 x 128, context 128, batch 8 per rank, 2 ranks, ZeRO-2), SGD with momentum 0.9,
gradient clipping 1.0, three runs from the same seed and batches: uncompressed; top-k 1% + error feedback with the
momentum left in the optimizer; top-k 1% + error feedback + DGC momentum correction (Lin et al. 2018: momentum
accumulated before selection, momentum factor masking, local clipping).

    python bench/bench_compression_sgd.py [--steps 1000] [--lr 0.1]

Resumable: each run's result is kept in bench/work/compression_sgd/<key>.json with the settings it was measured
with, and reused when they are equal.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    SHAKESPEARE,
    command_line,
    machine_line,
    reused_line,
    skipped_without_shakespeare,
    write_section,
)

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "compression_sgd"
RUNS = [  # key, label, compression block (None: uncompressed)
    ("sgd", "SGD, uncompressed", None),
    ("sgd_topk_ef", "SGD, top-k 1% + error feedback (momentum in the optimizer)",
     {"method": "topk", "density": 0.01, "error_feedback": True, "momentum_correction": False}),
    ("sgd_topk_ef_dgc", "SGD, top-k 1% + error feedback + DGC momentum correction",
     {"method": "topk", "density": 0.01, "error_feedback": True, "momentum_correction": True}),
]
EVAL_BATCHES = 50


def worker(compression: dict | None, steps: int, lr: float, out: Path) -> None:
    """One run on this torchrun rank (the driver below starts two)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import dist_sparse
    from dist_sparse import config as C
    from dist_sparse.data import TextData

    cfg = C.load(ROOT / "configs" / "demo.yaml", [f"data.path={SHAKESPEARE}", "data.tokenizer=char",
                                                 "model.block_size=128"])
    data = TextData(cfg.data, 128, seed=0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=data.tokenizer.vocab_size, n_positions=128, n_embd=128,
                                       n_layer=4, n_head=4))
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "optimizer": {"type": "SGD", "params": {"lr": lr, "momentum": 0.9}},
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,  # torch SGD under ZeRO
              "sparsity": {"method": "none"}}
    if compression is not None:
        config["compression"] = {**compression, "min_tensor_size": 0}
    torch.set_num_threads(1)
    engine, _, _, _ = dist_sparse.initialize(model=model, config=config, total_steps=steps, seed=0)
    rank = torch.distributed.get_rank()
    losses = []
    for step in range(steps):
        x = data.batch("train", step, rank, 0, 8)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        if step % max(1, steps // 20) == 0 or step == steps - 1:
            losses.append([step + 1, float(loss)])
    model.eval()
    total = torch.zeros(1, dtype=torch.float64)
    with torch.no_grad():
        for i in range(EVAL_BATCHES):  # every rank evaluates its share of the same val batches
            if i % torch.distributed.get_world_size() == rank:
                x = data.batch("val", i, 0, 0, 8)
                total += float(engine(input_ids=x, labels=x).loss)
    torch.distributed.all_reduce(total)
    stats = engine.compression.stats(steps) if engine.compression is not None else {}
    if rank == 0:
        result = {"final_val_loss": float(total) / EVAL_BATCHES, "train_losses": losses, **stats,
                  "settings": {"steps": steps, "lr": lr, "compression": compression}}
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(out)
    torch.distributed.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        compression = {k: c for k, _, c in RUNS}[args.worker]
        worker(compression, args.steps, args.lr, WORK / f"{args.worker}.json")
        return
    if skipped_without_shakespeare("32_compression_sgd", "Gradient compression with momentum SGD"):
        return
    WORK.mkdir(parents=True, exist_ok=True)
    results, reused = {}, []
    for key, label, compression in RUNS:
        path = WORK / f"{key}.json"
        want = {"steps": args.steps, "lr": args.lr, "compression": compression}
        if path.is_file() and json.loads(path.read_text()).get("settings") == want:
            results[key] = json.loads(path.read_text())
            reused.append(key)
            print(f"{label}: reused {path}", flush=True)
            continue
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(Path(__file__).resolve()), "--worker", key, "--steps", str(args.steps), "--lr", str(args.lr)]
        proc = subprocess.run(cmd, env=dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT)),
                              capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"{key} failed:\n{proc.stderr[-5000:]}")
        results[key] = json.loads(path.read_text())
        print(f"{label}: val {results[key]['final_val_loss']:.4f}", flush=True)
    base = results["sgd"]["final_val_loss"]
    rows = []
    for key, label, _ in RUNS:
        r = results[key]
        comm, dense = r.get("comm_bytes_per_step"), r.get("dense_comm_bytes_per_step")
        share = f"1/{dense / comm:.0f}" if comm else "1/1"
        rows.append(f"| {label} | {r['final_val_loss']:.4f} | {r['final_val_loss'] / base:.4f} | {share} |")
    ef, dgc = results["sgd_topk_ef"]["final_val_loss"], results["sgd_topk_ef_dgc"]["final_val_loss"]
    better = "DGC momentum correction" if dgc < ef else "the momentum left in the optimizer"
    md = [
        "## Gradient compression with momentum SGD",
        "",
        f"Command: `{command_line()}` (each row is one two-rank torchrun of this script's worker, which trains "
        "through `dist_sparse.initialize`).",
        f"Machine: {machine_line()}.",
        reused_line(reused, "settings"),
        "",
        f"Setting: `{SHAKESPEARE.name}`, char GPT-2 4 x 128, context 128, batch 8 per rank, 2 ranks, ZeRO-2, "
        f"{args.steps} steps, SGD lr {args.lr} with momentum 0.9 (no schedule), gradient clipping 1.0, the same "
        f"seed and batches in every run; validation loss over {EVAL_BATCHES} batches of 8 x 128 characters from the "
        "last 10% of the text. Top-k at density 1%, every tensor compressed.",
        "",
        "| run | final val loss | x uncompressed | comm / dense |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Better with SGD: {better} ({dgc:.4f} with DGC vs {ef:.4f} without).",
    ]
    write_section("32_compression_sgd", "\n".join(md))


if __name__ == "__main__":
    main()
