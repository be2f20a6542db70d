"""Inter-node gradient compression: 2 simulated nodes x 2 ranks (4 processes on this machine).

Each run is two `dist-sparse train --nnodes 2 --node-rank R --nproc-per-node 2` invocations rendezvousing on
127.0.0.1 (what a user runs with one command per node), the training benchmark's tinyshakespeare setting
(bench_training.py's COMMON: char GPT-2 4 x 128, context 128, batch 8 per rank, AdamW lr 1e-3, betas 0.9/0.999,
ZeRO-2), 1000 steps: uncompressed vs `compression.scope: all` vs `scope: inter_node` (top-k 1%, error feedback,
momentum correction), dense and RigL 90%. The bytes are summary.json's: what a rank hands to collectives per
optimizer step, split by whether the collective's group spans nodes; `dense_inter_node_comm_bytes_per_step` is
DeepSpeed's dense reduction (one all-reduce over the world: every gradient element crosses). `plan --nodes`
predicts the same keys from the config; the section compares them.

    python bench/bench_internode.py [--steps 1000]

Resumable: a run directory whose `bench_args.json` equals this run's arguments and that holds a summary.json is
reused (the section says which).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_training import COMMON  # noqa: E402
from bench.common import (  # noqa: E402
    SHAKESPEARE,
    command_line,
    machine_line,
    skipped_without_shakespeare,
    write_section,
)
from dist_sparse import config as config_mod  # noqa: E402
from tests.distributed_utils import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "internode"
COMPRESS = ["compression.method=topk", "compression.density=0.01", "compression.error_feedback=true",
            "compression.momentum_correction=true", "compression.min_tensor_size=0"]
RUNS = [  # key, label, overrides
    ("dense", "dense, uncompressed", ["sparsity.method=none"]),
    ("dense_all", "dense, top-k 1%, scope all", ["sparsity.method=none", *COMPRESS, "compression.scope=all"]),
    ("dense_inter", "dense, top-k 1%, scope inter_node",
     ["sparsity.method=none", *COMPRESS, "compression.scope=inter_node"]),
    ("rigl", "RigL 90%, uncompressed", ["sparsity.method=rigl"]),
    ("rigl_all", "RigL 90%, top-k 1%, scope all", ["sparsity.method=rigl", *COMPRESS, "compression.scope=all"]),
    ("rigl_inter", "RigL 90%, top-k 1%, scope inter_node",
     ["sparsity.method=rigl", *COMPRESS, "compression.scope=inter_node"]),
    # tried for RigL's missed loss target: DGC's warm-up (density from 1 down to 1% over the first 50 steps)
    ("rigl_inter_warmup50", "RigL 90%, top-k 1% + 50-step DGC warm-up, scope inter_node",
     ["sparsity.method=rigl", *COMPRESS, "compression.scope=inter_node", "compression.warmup_steps=50"]),
]
NODES, PER_NODE = 2, 2
# RigL's figure moves by a percent or more between seeds (docs/compression.md: 1.030x and 1.014x for two seeds of
# the same compressed run), more than the 2% target's margin: its uncompressed and inter-node rows get more seeds
SEEDED = ("rigl", "rigl_inter")


def overrides(extra: list, steps: int, out: Path) -> list:
    return [*COMMON, "model.n_embd=128", *extra, f"train.steps={steps}", f"train.eval_interval={steps}",
            f"train.log_interval={max(1, steps // 20)}", f"data.path={SHAKESPEARE}", f"train.output_dir={out}"]


def run(key: str, extra: list, steps: int) -> tuple:
    """(summary, reused) of one two-node run."""
    out = WORK / key
    args = overrides(extra, steps, out)
    marker = out / "bench_args.json"
    same = [a for a in args if not a.startswith("train.output_dir=")]  # the run, wherever its folder lies
    # and the config those overrides resolve to today: a run of older defaults is not reused
    resolved = config_mod.load(ROOT / "configs" / "demo.yaml", same).to_dict()
    same = json.loads(json.dumps([*same, {"resolved": resolved}]))
    if (out / "summary.json").is_file() and marker.is_file() and json.loads(marker.read_text()) == same:
        print(f"{key}: reused {out}", flush=True)
        return json.loads((out / "summary.json").read_text()), True
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    procs, t0 = [], time.time()
    for r in range(NODES):
        cmd = [sys.executable, "-m", "dist_sparse.cli.main", "train", str(ROOT / "configs" / "demo.yaml"),
               "--nnodes", str(NODES), "--node-rank", str(r), "--nproc-per-node", str(PER_NODE),
               "--master-addr", "127.0.0.1", "--master-port", str(port)]
        for o in args:
            cmd += ["--set", o]
        log = open(out / f"node{r}.log", "w")
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log))
    codes = [p.wait() for p, _ in procs]
    for _, log in procs:
        log.close()
    if any(codes):
        raise SystemExit(f"{key} failed ({codes}); see {out}/node*.log")
    summary = json.loads((out / "summary.json").read_text())
    summary["wall_seconds"] = time.time() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    marker.write_text(json.dumps(same))
    print(f"{key}: val {summary['final_val_loss']:.4f} inter-node {summary['inter_node_comm_bytes_per_step']:.0f} "
          f"B/step ({summary['wall_seconds']:.0f} s)", flush=True)
    return summary, False


def predicted(extra: list, steps: int) -> dict:
    """`dist-sparse plan CONFIG --nodes 2 --world-size 4 --json` for the run's config."""
    cmd = [sys.executable, "-m", "dist_sparse.cli.main", "plan", str(ROOT / "configs" / "demo.yaml"),
           "--world-size", str(NODES * PER_NODE), "--nodes", str(NODES), "--json"]
    for o in overrides(extra, steps, WORK / "plan"):
        cmd += ["--set", o]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, DS_ACCELERATOR="cpu"))
    if proc.returncode != 0:
        raise SystemExit(f"plan failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout)["comm_bytes_per_step"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=2, help=f"seeds of the rows {', '.join(SEEDED)} (train.seed "
                                                             "0, 1, ...; the other rows: seed 0)")
    parser.add_argument("--rigl-only", action="store_true",
                        help="only RigL uncompressed vs scope inter_node over --seeds seeds, at today's defaults: "
                             "section 80_internode_rigl (the full table stays as it is)")
    args = parser.parse_args()
    title = "Inter-node gradient compression (2 nodes x 2 ranks)"
    if skipped_without_shakespeare("80_internode", title):
        return
    if args.rigl_only:
        rigl_only(args)
        return
    results, reused = {}, []
    for key, _, extra in RUNS:
        results[key], was_reused = run(key, extra, args.steps)
        if was_reused:
            reused.append(key)
    seeded = {key: [results[key]] for key in SEEDED}
    for seed in range(1, args.seeds):
        for key, _, extra in RUNS:
            if key in SEEDED:
                summary, was_reused = run(f"{key}_seed{seed}", [*extra, f"train.seed={seed}"], args.steps)
                seeded[key].append(summary)
                if was_reused:
                    reused.append(f"{key}_seed{seed}")
    rows, checks = [], []
    for key, label, extra in RUNS:
        s = results[key]
        base = results["rigl" if key.startswith("rigl") else "dense"]
        dense_inter = s["dense_inter_node_comm_bytes_per_step"]
        ratio = s["inter_node_comm_bytes_per_step"] / dense_inter if dense_inter else float("nan")
        pred = predicted(extra, args.steps)
        kb = {k: s.get(k, 0.0) / 1e3 for k in ("intra_node_comm_bytes_per_step", "inter_node_comm_bytes_per_step",
                                                 "mask_sync_bytes_per_step")}
        rows.append(f"| {label} | {s['final_val_loss']:.4f} | {s['final_val_loss'] / base['final_val_loss']:.4f} | "
                    f"{kb['intra_node_comm_bytes_per_step']:.1f} | {kb['inter_node_comm_bytes_per_step']:.2f} | "
                    f"{pred['inter_node_comm_bytes_per_step'] / 1e3:.2f} | {kb['mask_sync_bytes_per_step']:.2f} | "
                    f"{dense_inter / 1e3:.1f} | 1/{1 / ratio:.0f} | {s['median_step_seconds'] * 1e3:.0f} |")
        if key.endswith("_inter"):
            limit = 50 if key.startswith("dense") else 100
            checks.append((f"{label}: inter-node bytes <= 1/{limit} of dense DeepSpeed's", ratio <= 1 / limit,
                           f"1/{1 / ratio:.0f}"))
            gap = s["final_val_loss"] / base["final_val_loss"]
            checks.append((f"{label}: validation loss within 2% of uncompressed", gap <= 1.02,
                           f"{gap:.4f}x ({s['final_val_loss']:.4f} vs {base['final_val_loss']:.4f})"))
    seed_rows = []
    if args.seeds > 1:
        base_losses = [r["final_val_loss"] for r in seeded["rigl"]]
        inter_losses = [r["final_val_loss"] for r in seeded["rigl_inter"]]
        ratios = [b / a for a, b in zip(base_losses, inter_losses)]
        mean_ratio = sum(inter_losses) / sum(base_losses)
        for seed, (a, b, q) in enumerate(zip(base_losses, inter_losses, ratios)):
            seed_rows.append(f"| {seed} | {a:.4f} | {b:.4f} | {q:.4f} |")
        seed_rows.append(f"| mean | {sum(base_losses) / len(base_losses):.4f} | "
                         f"{sum(inter_losses) / len(inter_losses):.4f} | {mean_ratio:.4f} |")
        checks.append((f"RigL 90%, scope inter_node: mean validation loss over {args.seeds} seeds within 2% of "
                       "uncompressed", mean_ratio <= 1.02, f"{mean_ratio:.4f}x (per seed: "
                       + ", ".join(f"{q:.4f}x" for q in ratios) + ")"))
    lines = [
        f"## {title}",
        "",
        f"Command: `{command_line()}`",
        machine_line(),
        "",
        f"Setting: `tinyshakespeare.txt`, char GPT-2 (4 layers, width 128, context 128), batch 8 per rank, AdamW lr "
        f"1e-3 (betas 0.9/0.999, weight decay 0.01), ZeRO-2, {args.steps} steps, 2 nodes x 2 ranks simulated on this "
        "machine (two `dist-sparse train --nnodes 2 --node-rank R --nproc-per-node 2` on 127.0.0.1). Compression: "
        "top-k 1%, error feedback, Adam momentum correction. RigL: 90% ERK, update every 100 steps (the update steps "
        "exchange the sparsified tensors' gradient dense, as growth needs it). Bytes per optimizer step and rank, "
        "as summary.json reports them (kB = 1000 B); `inter-node (plan)` is `dist-sparse plan --nodes 2` for the "
        "same config.",
        "",
        "| run | final val loss | x uncompressed | intra-node kB/step | inter-node kB/step | inter-node (plan) | "
        "mask sync kB/step | dense DeepSpeed inter-node kB/step | inter / dense | median step (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        *([f"RigL 90% over {args.seeds} seeds (`train.seed` 0..{args.seeds - 1}; the table above is seed 0; the data "
           "order and the initial masks change with the seed):", "",
           "| seed | uncompressed val loss | scope inter_node val loss | x uncompressed |", "|---|---|---|---|",
           *seed_rows, ""] if seed_rows else []),
        "| target | reached | measured |",
        "|---|---|---|",
        *[f"| {name} | {'yes' if ok else 'NO'} | {value} |" for name, ok, value in checks],
        "",
        "Reused finished runs: " + (", ".join(reused) if reused else "none") + f" (from `{WORK.relative_to(ROOT)}`).",
        "",
        "RigL's loss target is missed at both seeds. Tried: DGC's warm-up (the row above: 1.037x, no better, at "
        "1.2x the bytes); sending tensors below 1024 elements (biases, norms) dense, stopped halfway at equal "
        "training loss; RigL's update steps already exchange the sparsified gradients dense, and a growth window's "
        "dense steps deliver the accumulated residuals (they are not lost). The gap follows the compression "
        "itself: the dense model's training loss runs 3-4% above uncompressed during the run too, and the sparse "
        "model, with a tenth of the weights, has less slack to absorb delayed coordinates.",
        "",
        "Intra-node bytes are the dense fp32 all-reduce inside each node (the whole gradient, every step) plus, for "
        "the flat scope on one node, nothing: with `scope: all` every collective spans both nodes. Step times come "
        "from 4 processes sharing 2 cores and are not a network measurement (loopback only).",
    ]
    write_section("80_internode", "\n".join(lines))


def rigl_only(args) -> None:
    """RigL 90% uncompressed against top-k 1% at scope inter_node, seed by seed, at the defaults of today (the full
    table's runs may predate them)."""
    extra = dict((key, x) for key, _, x in RUNS)
    pairs, reused = [], []
    for seed in range(args.seeds):
        pair = []
        for key in ("rigl", "rigl_inter"):
            name = f"{key}_defaults_seed{seed}"
            summary, was = run(name, [*extra[key], f"train.seed={seed}"], args.steps)
            pair.append(summary)
            if was:
                reused.append(name)
        pairs.append(pair)
    rows = []
    plan = predicted(extra["rigl_inter"], args.steps)  # the seed changes neither the layout nor the schedule
    for seed, (a, b) in enumerate(pairs):
        rows.append(f"| {seed} | {a['final_val_loss']:.4f} | {b['final_val_loss']:.4f} | "
                    f"{b['final_val_loss'] / a['final_val_loss']:.4f} | {a.get('grow_grad_steps')} / "
                    f"{b.get('grow_grad_steps')} | {b['inter_node_comm_bytes_per_step'] / 1e3:.2f} | "
                    f"{plan['inter_node_comm_bytes_per_step'] / 1e3:.2f} | "
                    f"1/{b['dense_inter_node_comm_bytes_per_step'] / b['inter_node_comm_bytes_per_step']:.0f} |")
    base = sum(a["final_val_loss"] for a, _ in pairs) / len(pairs)
    inter = sum(b["final_val_loss"] for _, b in pairs) / len(pairs)
    ratio = inter / base
    lines = [
        "## Inter-node compression: RigL at today's defaults",
        "",
        f"Command: `{command_line()}`",
        machine_line(),
        "",
        f"The setting of the section above (2 nodes x 2 ranks, {args.steps} steps, betas 0.9/0.999, RigL 90% ERK, "
        "top-k 1% with error feedback and Adam momentum correction at `scope: inter_node`), with every other key at "
        "today's default: SμPar, the constant drop fraction, and the growth window of the whole update interval, "
        "which the compressed exchange now keeps in each rank's local sum (docs/compression.md), so both runs of a "
        "pair grow on the same window mean.",
        "",
        "| seed | uncompressed val loss | scope inter_node val loss | x uncompressed | growth window (uncompressed / "
        "inter_node) | inter-node kB/step | inter-node (plan) | inter / dense DeepSpeed |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        f"| mean | {base:.4f} | {inter:.4f} | {ratio:.4f} | | | | |",
        "",
        "| target | reached | measured |",
        "|---|---|---|",
        f"| RigL 90%, scope inter_node: mean validation loss over {len(pairs)} seeds within 2% of uncompressed | "
        f"{'yes' if ratio <= 1.02 else 'NO'} | {ratio:.4f}x |",
        "",
        "Reused finished runs: " + (", ".join(reused) if reused else "none") + f" (from `{WORK.relative_to(ROOT)}`).",
    ]
    write_section("80_internode_rigl", "\n".join(lines))


if __name__ == "__main__":
    main()
