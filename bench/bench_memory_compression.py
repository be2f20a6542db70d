"""Compact state with gradient compression: per-rank state bytes, with the residual line, vs dense DeepSpeed.

The model and setting of bench/bench_memory.py (char-level GPT-2, 8 layers x 768, 56.9M parameters, 2 CPU ranks,
batch 1 per rank, RigL 90% ERK, mask update every 3 steps), ZeRO-2 bf16, a few steps (a memory figure):
dense DeepSpeed, compact state alone, compact state + top-k 1% with error feedback, and the same with Adam
momentum correction. Bytes are `summary.json`'s `state_bytes_per_rank` (and `transient_bytes_per_rank`).

    python bench/bench_memory_compression.py [--steps 6]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_memory import CATS, mib, overrides, train  # noqa: E402
from bench.common import SHAKESPEARE, command_line, machine_line, skipped_without_shakespeare, write_section  # noqa: E402

NAME, TITLE = "61_memory_compression", "Compact state with gradient compression: memory per rank"
TOPK = ["compression.method=topk", "compression.density=0.01", "compression.error_feedback=true"]
RUNS = {  # name -> (kind in bench_memory.KINDS, extra overrides)
    "dense DeepSpeed": ("dense", []),
    "compact": ("compact", []),
    "compact + top-k 1% + EF": ("compact", TOPK + ["compression.momentum_correction=false"]),
    "compact + top-k 1% + EF + momentum correction": ("compact", TOPK + ["compression.momentum_correction=true"]),
}


def sent(s: dict) -> float:
    """Gradient bytes a rank hands to the collectives per step: the compressed exchange's (measured), or the
    gradient reduction's (compact state alone: the packed all-reduce, measured; dense DeepSpeed: its formula)."""
    return s["comm_bytes_per_step"] if s["compression"] != "none" else s["grad_reduce_bytes_per_step"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    if skipped_without_shakespeare(NAME, TITLE):
        return
    runs = {}
    for i, (name, (kind, extra)) in enumerate(RUNS.items()):
        runs[name] = train(f"compression_{i}", overrides(2, "bf16", kind, args.steps, SHAKESPEARE) + extra)
    dense = runs["dense DeepSpeed"]
    base = dense["state_bytes_per_rank"]["total"]
    md = [f"## {TITLE}", "",
          f"Command: `{command_line()}` (every run is `dist-sparse train configs/demo.yaml --nproc 2 --set ...` "
          "with the overrides of `bench/bench_memory.py` plus the compression keys in "
          "`bench/bench_memory_compression.py`).", f"Machine: {machine_line()}.", "",
          f"Setting: `{SHAKESPEARE.name}`, char-level GPT-2, 8 layers x 768, {dense['total_parameters'] / 1e6:.1f}M "
          f"parameters, batch 1 per rank, 2 CPU ranks, ZeRO-2, bf16, {args.steps} steps, RigL at 90% sparsity "
          "(ERK), mask update every 3 steps; compression: top-k at density 0.01 with error feedback "
          "(`compression.method: topk`). Bytes per rank (MiB, max over the 2 ranks, `state_bytes_per_rank`); "
          "`compression_residuals` are error feedback's residuals (with momentum correction also the local "
          "momentum, the local second moment and the squared momentum), fp32 per coordinate of every trainable "
          "tensor (each rank sends from its whole local gradient), kept packed by the masks with compact state: "
          "unpruned coordinates only, plus the mask bits of the layout. The local-gradient stash (fp32, every "
          "trainable parameter, from the first backward of a step to the exchange) is a transient, "
          "`transient_bytes_per_rank.compression_local_gradient`. Gradient bytes per step: the compressed "
          "exchange's `comm_bytes_per_step`, or without compression `grad_reduce_bytes_per_step` (compact: the "
          "packed all-reduce, RigL's dense update steps included).", "",
          "| run | " + " | ".join(CATS) + " | x dense (total) | x dense without residuals | local-gradient stash "
          "(transient) | gradient bytes per step | peak RSS (MB) |",
          "|---|" + "---|" * (len(CATS) + 5)]
    for name, s in runs.items():
        sb, tr = s["state_bytes_per_rank"], s["transient_bytes_per_rank"]
        md.append(f"| {name} | " + " | ".join(mib(sb[c]) for c in CATS) +
                  f" | {sb['total'] / base:.3f} | {(sb['total'] - sb['compression_residuals']) / base:.3f} | "
                  f"{mib(tr.get('compression_local_gradient', 0))} | {mib(sent(s))} | "
                  f"{s['peak_rss_mb']:.0f} |")
    ef, mc = runs["compact + top-k 1% + EF"], runs["compact + top-k 1% + EF + momentum correction"]
    params = dense["total_parameters"]
    md += ["", f"The residuals are {ef['state_bytes_per_rank']['compression_residuals'] / params:.2f} bytes per "
           f"parameter (error feedback) and {mc['state_bytes_per_rank']['compression_residuals'] / params:.2f} "
           "(with momentum correction) on every rank, packed by the masks (dense they would be 4 and 16), while "
           f"compact state alone keeps {runs['compact']['state_bytes_per_rank']['total'] / params:.2f} bytes per "
           "parameter in all at 90% sparsity."]
    write_section(NAME, "\n".join(md))


if __name__ == "__main__":
    main()
