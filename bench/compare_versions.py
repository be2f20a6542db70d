"""Behaviour and speed of this checkout against another commit, on the training benchmark's settings.

A refactoring must not change what training computes. This runs the same explicit configs (dense, RigL, RigL with
compact state, top-k + error feedback; 2 ranks, ZeRO-2, tinyshakespeare) with the code of ``--before`` (checked out
as a git worktree under ``bench/work/``) and with this checkout, and compares

- ``summary.json`` losses and every logged training loss in ``metrics.jsonl`` (must be equal, not close),
- the final masks in ``final/sparsity_masks.safetensors`` (``torch.equal``),
- the median step time, from ``--repeats`` interleaved run pairs (before, after, before, after, ...), so that a
  change of machine load hits both sides alike; the ratio is after / before.

Finished runs are reused (same code commit, same config, same repeat index): the report says so.

    python bench/compare_versions.py --before 28747e7 [--steps 200] [--repeats 3]
"""

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_training import COMMON  # noqa: E402
from bench.common import SHAKESPEARE, command_line, machine_line, skipped_without_shakespeare, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "compare"

RUNS = [
    ("dense", ["sparsity.method=none"]),
    ("rigl", ["sparsity.method=rigl"]),
    ("rigl + compact state", ["sparsity.method=rigl", "sparsity.compact_state=true"]),
    ("top-k 1% + error feedback", ["sparsity.method=none", "compression.method=topk", "compression.density=0.01",
                                   "compression.error_feedback=true", "compression.momentum_correction=false"]),
]


def git(*args, cwd=ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def checkout(ref: str) -> Path:
    """A detached worktree of ``ref`` under bench/work (reused when it is already there)."""
    commit = git("rev-parse", ref)
    path = ROOT / "bench" / "work" / f"before-{commit[:12]}"
    if not (path / ".git").exists():
        git("worktree", "add", "--detach", str(path), commit)
    return path


def code_id(tree: Path) -> str:
    """The committed trees of the code that runs (``dist_sparse/``, ``kernels/``, ``configs/``) plus a hash of
    their uncommitted changes: a commit that changes only tests or docs reuses finished runs, an edit never does."""
    dirs = ("dist_sparse", "kernels", "configs")
    trees = "".join(git("rev-parse", f"HEAD:{d}", cwd=tree)[:8] for d in dirs)
    diff = subprocess.run(["git", "diff", "HEAD", "--", *dirs], cwd=tree, capture_output=True, text=True).stdout
    return trees + "-" + hashlib.sha256(diff.encode()).hexdigest()[:8]


def run(tree: Path, name: str, overrides: list, steps: int, repeat: int) -> tuple:
    """One training run with the code in ``tree``; returns (summary, metrics records, output dir, reused)."""
    sets = COMMON + ["model.n_embd=128"] + overrides + [
        f"train.steps={steps}", f"train.eval_interval={steps}", "train.log_interval=1", f"data.path={SHAKESPEARE}",
        "train.save_final_model=true", "train.save_interval=0"]
    key = hashlib.sha256(json.dumps([code_id(tree), sets]).encode()).hexdigest()[:12]
    out = WORK / f"{''.join(c if c.isalnum() else '_' for c in name)}-{key}-r{repeat}"
    reused = (out / "summary.json").is_file()
    if not reused:
        cmd = [sys.executable, "-m", "dist_sparse.cli.main", "train", str(tree / "configs" / "demo.yaml"),
               "--nproc", "2"]
        for o in sets + [f"train.output_dir={out}"]:
            cmd += ["--set", o]
        env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(tree))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
        if proc.returncode != 0:
            raise SystemExit(f"{name} ({tree}) failed:\n{proc.stderr[-5000:]}")
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return summary, records, out, reused


def masks_equal(a: Path, b: Path) -> bool | None:
    import torch
    from safetensors.torch import load_file

    fa, fb = a / "final" / "sparsity_masks.safetensors", b / "final" / "sparsity_masks.safetensors"
    if not fa.is_file() and not fb.is_file():
        return None  # dense: no masks on either side
    if not (fa.is_file() and fb.is_file()):
        return False
    ma, mb = load_file(str(fa)), load_file(str(fb))
    return ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def losses(summary: dict, records: list) -> list:
    return [summary["final_val_loss"], summary["final_train_loss"]] + [r["loss"] for r in records if "loss" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="the commit to compare against")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved before/after pairs per config (timing)")
    args = ap.parse_args()
    if skipped_without_shakespeare("70_compare_versions", "Behaviour and step time against an earlier commit"):
        return
    before = checkout(args.before)
    load_start = os.getloadavg()[0]
    rows, same_by_name, reused_any = [], {}, False
    by_name = {}  # name -> {side: losses of the first repeat}
    for name, overrides in RUNS:
        times = {"before": [], "after": []}
        first = {}
        for r in range(args.repeats):
            for side, tree in (("before", before), ("after", ROOT)):
                summary, records, out, reused = run(tree, name, overrides, args.steps, r)
                reused_any |= reused
                times[side].append(summary["median_step_seconds"])
                first.setdefault(side, (summary, records, out))
        (sb, rb, ob), (sa, ra, oa) = first["before"], first["after"]
        by_name[name] = {"before": losses(sb, rb), "after": losses(sa, ra)}
        same_loss = losses(sb, rb) == losses(sa, ra)
        same_masks = masks_equal(ob, oa)
        same_by_name[name] = same_loss and same_masks is not False
        tb, ta = statistics.median(times["before"]), statistics.median(times["after"])
        masks = "n/a (dense)" if same_masks is None else "yes" if same_masks else "NO"
        rows.append(f"| {name} | {sa['final_val_loss']:.6f} | {'yes' if same_loss else 'NO'} "
                    f"({len(losses(sa, ra))} values) | {masks} | {tb * 1e3:.1f} | {ta * 1e3:.1f} | {ta / tb:.3f} |")
        print(rows[-1], flush=True)
    # compact state must train exactly like masked-dense DeepSpeed (same losses, same masks)
    compact = by_name.get("rigl + compact state"), by_name.get("rigl")
    equal_dense = {side: compact[0][side] == compact[1][side] for side in ("before", "after")} if all(compact) else {}
    # a run may change only where the change is the point: compact state now computing what masked-dense computes
    unexplained = [n for n, same in same_by_name.items()
                   if not same and not (n == "rigl + compact state" and equal_dense.get("after"))]
    text = [
        "## Behaviour and step time against an earlier commit",
        "",
        f"Command: `{command_line()}` (before = `{git('rev-parse', args.before)[:12]}`, after = `{code_id(ROOT)}`)",
        "",
        f"Machine: {machine_line()}",
        "",
        f"The training benchmark's setting (tinyshakespeare, char GPT-2 4x128, 2 ranks, ZeRO-2, RigL 90% ERK), "
        f"{args.steps} steps, explicit configs. Losses: `summary.json`'s final validation and training loss and "
        f"every step's training loss in `metrics.jsonl`, compared for equality; masks: "
        f"`final/sparsity_masks.safetensors`, `torch.equal`. Step time: median over {args.repeats} interleaved "
        f"run pairs of each run's median step time; load average (1 min) {load_start:.1f} at the start and "
        f"{os.getloadavg()[0]:.1f} at the end (a shared machine: ratios within that load's noise are no speed "
        f"claim).",
        "",
        "| run | val loss (after) | losses identical | masks identical | step ms before | step ms after | ratio |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        *([f"RigL + compact state equals masked-dense RigL (every loss, bit for bit): before "
           f"**{'yes' if equal_dense['before'] else 'no'}**, after **{'yes' if equal_dense['after'] else 'no'}**."
           , ""] if equal_dense else []),
        f"Unchanged apart from that: **{'yes' if not unexplained else 'NO: ' + ', '.join(unexplained)}**."
        + (" Some runs were reused from an earlier invocation with the same code and config." if reused_any else ""),
    ]
    write_section("70_compare_versions", "\n".join(text))
    if unexplained:
        raise SystemExit(f"behaviour changed: {unexplained}")


if __name__ == "__main__":
    main()
