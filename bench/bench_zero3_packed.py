"""ZeRO-3 with packed parameter gathers and packed shards: state bytes and parameter-gather bytes per rank.

The memory bench's model and setting (bench_memory.py: char GPT-2 8 x 768, 56.9M parameters, 2 CPU ranks, bf16,
RigL 90% ERK, updates every 3 steps, 8 steps, ZeRO-3 with reduce_bucket_size 768^2): dense DeepSpeed, compact
state, and compact state + `sparsity.packed_gather: true` (which at ZeRO-3 with compact state also stores the
sparsified shards packed); then dense DeepSpeed and packed shards with gradient compression at its defaults
(`compression.method: topk`: 1%, error feedback, momentum correction for AdamW), whose gradient bytes per step
(`comm_bytes_per_step`) are set against DeepSpeed's dense reduce-scatter (`dense_comm_bytes_per_step`). Bytes are
summary.json's (`state_bytes_per_rank`, `param_gather_bytes_per_step`, `dense_param_gather_bytes_per_step`); the
predictions are `dist-sparse plan` with the same overrides. Below them, `dist-sparse plan` for a 7B model at 8, 64
and 512 ranks.

    python bench/bench_zero3_packed.py [--steps 8]

Resumable: a run directory whose `bench_args.json` equals this run's overrides and that holds a summary.json is
reused (the section says which).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_memory import CATS, mib, overrides, plan, plan_json  # noqa: E402
from bench.bench_memory import train as train_run  # noqa: E402
from bench.common import SHAKESPEARE, command_line, machine_line, skipped_without_shakespeare, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "memory"
TOPK = ["compression.method=topk"]  # the compression defaults: 1%, error feedback, momentum correction (AdamW)
RUNS = [("dense", "dense DeepSpeed", "dense", []),
        ("compact", "compact state", "compact", []),
        ("packed", "compact state + packed_gather (packed shards)", "compact", ["sparsity.packed_gather=true"]),
        ("dense_topk", "dense DeepSpeed + top-k", "dense", TOPK),
        ("packed_topk", "packed shards + top-k", "compact", ["sparsity.packed_gather=true", *TOPK]),
        # the steady state between mask updates (RigL's update steps exchange the sparsified tensors dense; in
        # 8 steps with an update every 3 they are a quarter of the steps, in a real run one in update_interval)
        ("packed_topk_static", "packed shards + top-k, no mask update in the 8 steps", "compact",
         ["sparsity.packed_gather=true", *TOPK, "sparsity.update_interval=100"])]
# what a reused run must have been measured with besides its overrides: bumped when the state accounting changes
# (2: masks sharded, state_bytes_per_rank.masks is the rank's shard bits)
ACCOUNTING = 2
PLAN_7B = ["--params", "7e9", "--zero-stage", "3", "--sparsity", "0.9", "--precision", "bf16"]


def run(key: str, ov: list) -> tuple:
    name = f"z3p_{key}"
    out = WORK / name
    marker = out / "bench_args.json"
    want = {"overrides": ov, "accounting": ACCOUNTING}
    if (out / "summary.json").is_file() and marker.is_file() and json.loads(marker.read_text()) == want:
        print(f"{key}: reused {out}", flush=True)
        return json.loads((out / "summary.json").read_text()), True
    summary = train_run(name, ov)
    marker.write_text(json.dumps(want))
    return summary, False


def plan_7b(world: int, extra: list) -> dict:
    return plan_json([*PLAN_7B, "--world-size", str(world), *extra])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    title = "ZeRO-3 packed parameter gathers and packed shards"
    if skipped_without_shakespeare("62_zero3_packed", title):
        return
    WORK.mkdir(parents=True, exist_ok=True)
    results, plans, reused = {}, {}, []
    for key, _, kind, extra in RUNS:
        ov = overrides(3, "bf16", kind, args.steps, SHAKESPEARE) + extra
        results[key], was_reused = run(key, ov)
        plans[key] = plan(ov)
        if was_reused:
            reused.append(key)
    base = results["dense"]["state_bytes_per_rank"]["total"]
    rows = []
    for key, label, _, _ in RUNS:
        s, p = results[key], plans[key]
        sb = s["state_bytes_per_rank"]
        g, dg = s.get("param_gather_bytes_per_step", 0.0), s.get("dense_param_gather_bytes_per_step", 0.0)
        pg = p.get("param_gather_bytes_per_step", 0.0)
        rows.append(f"| {label} | " + " | ".join(mib(sb[c]) for c in CATS) + f" | {sb['total'] / base:.3f} | "
                    f"{mib(p['state_bytes_per_rank']['total'])} | {mib(g)} | {mib(dg)} | "
                    f"{(g / dg if dg else float('nan')):.3f} | {mib(pg)} |")
    grad_rows = []
    for key, label, _, _ in RUNS:
        s = results[key]
        if s.get("compression", "none") != "none":  # compressed: the exchange's measured bytes
            g, dg = s["comm_bytes_per_step"], s["dense_comm_bytes_per_step"]
            how = "compressed exchange"
        else:  # compact state's packed reduction (measured) or DeepSpeed's dense one (its formula)
            g, dg = s["grad_reduce_bytes_per_step"], s["grad_reduce"]["dense_deepspeed_bytes_per_step"]
            how = "packed reduction" if s["grad_reduce"]["measured"] else "DeepSpeed (formula)"
        grad_rows.append(f"| {label} | {how} | {mib(g)} | {mib(dg)} | {g / dg:.4f} (1/{dg / g:.0f}) | "
                         f"{mib(s['state_bytes_per_rank']['compression_residuals'])} | "
                         f"{s['final_val_loss']:.6f} |")
    packed = results["packed"]
    gather_ratio = packed["param_gather_bytes_per_step"] / packed["dense_param_gather_bytes_per_step"]
    state_ratio = packed["state_bytes_per_rank"]["total"] / base
    topk = results["packed_topk"]
    topk_state = topk["state_bytes_per_rank"]
    topk_ratio = (topk_state["total"] - topk_state["compression_residuals"]) / base
    checks = [("parameter-gather bytes, packed / dense gather <= 0.2x", gather_ratio <= 0.2, f"{gather_ratio:.3f}x"),
              ("packed shards + top-k: state bytes without the residuals <= 0.15x of dense DeepSpeed",
               topk_ratio <= 0.15, f"{topk_ratio:.3f}x (with residuals {topk_state['total'] / base:.3f}x)"),
              ("state bytes per rank, packed shards / dense DeepSpeed <= 0.15x (ZeRO-3 bf16)", state_ratio <= 0.15,
               f"{state_ratio:.3f}x"),
              ("losses with packed_gather equal compact state's", packed["final_val_loss"] ==
               results["compact"]["final_val_loss"], f"{packed['final_val_loss']:.6f} vs "
               f"{results['compact']['final_val_loss']:.6f}")]
    plan_rows = []
    for world in (8, 64, 512):
        c = plan_7b(world, ["--compact-state"])
        k = plan_7b(world, ["--compact-state", "--packed-gather"])
        d = c["dense_deepspeed_state_bytes_per_rank"]["total"]
        plan_rows.append(f"| {world} | {d / 2**30:.2f} | {c['state_bytes_per_rank']['total'] / 2**30:.2f} "
                         f"({c['ratio_to_dense']:.3f}x) | {k['state_bytes_per_rank']['total'] / 2**30:.2f} "
                         f"({k['ratio_to_dense']:.3f}x) | {k['state_bytes_per_rank']['masks'] / 2**20:.0f} |")
    lines = [
        f"## {title}", "",
        f"Command: `{command_line()}`", machine_line(), "",
        f"Setting: the memory bench's (char GPT-2 8 x 768, {results['dense']['total_parameters'] / 1e6:.1f}M "
        f"parameters, batch 1 per rank, 2 CPU ranks, bf16, RigL 90% ERK, update every 3 steps, {args.steps} steps, "
        "ZeRO-3 with reduce_bucket_size 768^2). State bytes per rank (MiB, max over ranks; `summary.json`), "
        "parameter-gather bytes per rank and optimizer step (training-mode gathers; the first step records "
        "DeepSpeed's module trace and gathers twice), predictions by `dist-sparse plan` with the same overrides.", "",
        "| run | " + " | ".join(CATS) + " | x dense | plan total | gather/step | dense gather/step | gather x dense "
        "| plan gather/step |", "|---|" + "---|" * (len(CATS) + 6), *rows, "",
        "| target | reached | measured |", "|---|---|---|",
        *[f"| {t} | {'yes' if ok else 'NO'} | {v} |" for t, ok, v in checks], "",
        "Gradient bytes per rank and optimizer step (MiB, mean over all steps; RigL's update steps included, "
        "where the sparsified tensors are exchanged dense), residuals per rank (MiB; per rank by "
        "construction: each rank keeps what it did not send, packed by the masks with compact state), final "
        "validation loss:", "",
        "| run | reduction | gradient bytes/step | dense DeepSpeed bytes/step | x dense | residuals | val loss |",
        "|---|---|---|---|---|---|---|", *grad_rows, "",
        "`dist-sparse plan " + " ".join(PLAN_7B) + " --world-size N` (GiB per rank; masks sharded, the default: "
        "each tensor's full mask is built from the shards when its gradient arrives, a transient of one tensor's "
        "bits; with `sparsity.replicate_masks: true` every rank keeps all of them, about 800 MiB here):", "",
        "| ranks | dense DeepSpeed | compact state | + packed shards | masks (MiB) |", "|---|---|---|---|---|",
        *plan_rows, "",
        "Reused finished runs: " + (", ".join(reused) if reused else "none") + f" (from `{WORK.relative_to(ROOT)}`).",
    ]
    write_section("62_zero3_packed", "\n".join(lines))


if __name__ == "__main__":
    main()
