"""Gradient compression at ZeRO-3: compressed vs uncompressed validation loss on the training benchmark's setting.

The setting of bench_compression.py (tinyshakespeare, char-level GPT-2 4 x 128, context 128, batch 8 per rank, AdamW
lr 1e-3, betas 0.9/0.999, 2 ranks, 2000 steps) at ZeRO stage 3. Compression is `compression.method: topk` with every
other compression key at its default (density 1%, error feedback on, momentum correction following the optimizer:
on for AdamW), so the figure is what a user gets. Rows: dense and RigL 90%, each uncompressed and compressed; RigL
90% with compact state and compression (each rank keeps the residuals packed by the masks).

    python bench/bench_compression_zero3.py [--steps 2000] [--only KEY,...]

Resumable: a run folder under bench/work/compression_zero3 whose summary.json exists and whose saved config equals,
key for key, the config this script would train is reused (the section says which rows were).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_compression import BASE, expected_config  # noqa: E402  (same setting, same config resolution)
from bench.bench_training import run  # noqa: E402
from bench.common import (  # noqa: E402
    SHAKESPEARE,
    command_line,
    machine_line,
    reused_line,
    skipped_without_shakespeare,
    write_section,
)

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "compression_zero3"
Z3 = ["deepspeed.zero_optimization.stage=3"]
TOPK = ["compression.method=topk"]  # every other compression key at its default

RUNS = [  # key, label, overrides, the uncompressed row it is compared with
    ("dense", "dense, uncompressed", [*BASE, *Z3, "sparsity.method=none"], "dense"),
    ("dense_topk", "dense, top-k (defaults: 1%, error feedback, momentum correction)",
     [*BASE, *Z3, "sparsity.method=none", *TOPK], "dense"),
    ("rigl", "RigL 90%, uncompressed", [*BASE, *Z3, "sparsity.method=rigl"], "rigl"),
    ("rigl_topk", "RigL 90% + top-k (defaults)", [*BASE, *Z3, "sparsity.method=rigl", *TOPK], "rigl"),
    ("rigl_compact_topk", "RigL 90%, compact state + top-k (defaults)",
     [*BASE, *Z3, "sparsity.method=rigl", "sparsity.compact_state=true", *TOPK], "rigl"),
]


def finished(folder: Path, overrides: list, steps: int) -> dict | None:
    """The summary of a finished run in ``folder`` trained with exactly this config, else None."""
    if not ((folder / "summary.json").is_file() and (folder / "config.json").is_file()):
        return None
    saved, ours = json.loads((folder / "config.json").read_text()), expected_config(overrides, steps)
    for cfg in (saved, ours):
        cfg["train"].pop("output_dir", None)
    return json.loads((folder / "summary.json").read_text()) if saved == ours else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--only", default="", help="comma-separated run keys (default: all)")
    args = parser.parse_args()
    if skipped_without_shakespeare("31_compression_zero3", "Gradient compression at ZeRO-3"):
        return
    only = set(filter(None, args.only.split(",")))
    unknown = only - {k for k, *_ in RUNS}
    if unknown:
        raise SystemExit(f"--only: unknown run keys {sorted(unknown)}; choose from {[k for k, *_ in RUNS]}")
    WORK.mkdir(parents=True, exist_ok=True)
    results, reused = {}, []
    for key, label, overrides, _ in RUNS:
        found = finished(WORK / key, overrides, args.steps)
        if found is not None:
            results[key] = found
            reused.append(key)
            print(f"{label}: reused {WORK / key} (identical config), val {found['final_val_loss']:.4f}", flush=True)
        elif not only or key in only:
            results[key] = run(label, overrides, args.steps, SHAKESPEARE, WORK / key)
    rows, checks = [], []
    for key, label, _, base_key in RUNS:
        s = results.get(key)
        if s is None:
            rows.append(f"| {label} | not run | - | - | - | - | - | - |")
            continue
        base = results.get(base_key)
        vs = f"{s['final_val_loss'] / base['final_val_loss']:.4f}" if base else "-"
        dense = s.get("dense_comm_bytes_per_step") or s.get("grad_reduce_bytes_per_step") or 0
        comm = s.get("comm_bytes_per_step", dense)
        share = f"{comm / dense:.4f} (1/{dense / comm:.0f})" if dense and comm else "-"
        residual = s.get("state_bytes_per_rank", {}).get("compression_residuals", 0)
        rows.append(f"| {label} | {s['achieved_sparsity']:.3f} | {s['final_val_loss']:.4f} | {vs} | {comm:,.0f} | "
                    f"{dense:,.0f} | {share} | {residual / 2**20:.2f} |")
        if key != base_key and base:
            ok = s["final_val_loss"] <= 1.03 * base["final_val_loss"]
            checks.append(f"| {label}: val loss within 3% of uncompressed | {'yes' if ok else 'NO'} | {vs}x |")
    md = [
        "## Gradient compression at ZeRO-3",
        "",
        f"Command: `{command_line()}` (each row is one `dist-sparse train configs/demo.yaml --nproc 2 --set ...` "
        "run; the overrides are in `bench/bench_compression_zero3.py`, `bench/bench_compression.py` and "
        "`bench/bench_training.py`).",
        f"Machine: {machine_line()}.",
        reused_line(reused),
        "",
        f"Setting: the gradient-compression section's (`{SHAKESPEARE.name}`, char GPT-2 4 x 128, context 128, batch "
        f"8 per rank, AdamW lr 1e-3, betas 0.9/0.999, weight decay 0.01, 2 ranks, {args.steps} steps, RigL 90% ERK "
        "updating every 100 steps until 75% of training) at **ZeRO-3**. Compression is `compression.method: topk` "
        "with the other compression keys at their defaults: density 1% of the unpruned coordinates, error "
        "feedback, and momentum correction, which the default follows from the optimizer (on for AdamW). At "
        "ZeRO-3 each rank reduces into its own parameter shards: a rank's contribution to its own shard is applied "
        "whole, and its top-k is chosen among the coordinates other ranks own.",
        "",
        "| run | sparsity | final val loss | x uncompressed | comm bytes/step | dense comm bytes/step | "
        "comm / dense | residuals per rank (MiB) |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "| target | reached | measured |",
        "|---|---|---|",
        *checks,
        "",
        "Bytes per rank and optimizer step, averaged over all steps (RigL's dense update steps included): what each "
        "rank hands to `torch.distributed` for gradients; dense: DeepSpeed's reduce-scatter of every gradient "
        "element in fp32, by its formula. Per rank, ZeRO-3 sends about twice the compressed bytes of ZeRO-2 with 2 "
        "ranks (the compression section): k is a share of each tensor's unpruned coordinates, chosen outside the "
        "sender's own range. At ZeRO-2 most tensors lie in one rank's partition, so only the other rank sends; at "
        "ZeRO-3 every tensor is split over both ranks and both send their k.",
    ]
    write_section("31_compression_zero3", "\n".join(md))


if __name__ == "__main__":
    main()
