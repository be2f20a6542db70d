"""The science table (issue 16): every family of sparse training on one setting, mean ± std over seeds.

Setting: the training benchmark's (tinyshakespeare, char GPT-2 4 x 128, context 128, batch 8 per rank, 2 ranks,
ZeRO-2, 90% sparsity with ERK unless stated) with the demo's optimizer recipe (AdamW lr 1e-3, betas 0.9/0.95,
weight decay 0.1: what users run). Rows: dense; small dense at about equal nonzeros (width 48); static; SNIP;
GraSP; SynFlow; GMP; SET; RigL (its defaults) -- three seeds each -- and, one seed each, IMP (3 rounds to 90%,
rewinding to 5% of training) against its reinit control, 2:4 with static, magnitude and SR-STE, FreezeNet (SNIP
masks at 90%, half of the kept weights frozen) against SNIP at 95% (the same trainable count, sparse).

Resumable: each run has its own directory under bench/work/science/; a run whose ``summary.json`` exists and whose
saved ``config.json`` equals the config it would run now is reused (the section says which rows were reused), so
the script can be stopped and restarted and will run only what is missing. bench/work/ is not committed, so every
finished run also leaves a small record in bench/results/science_runs/ (its config, summary and metrics without the
per-layer lists: a few KB), which is committed: a fresh checkout reuses those runs by the same rule, and the table
grows across sessions. ``--only`` and ``--seeds`` pick a
screening subset (the issue's screening: 1 seed at 1000 steps); rows not run are listed as such.

    python bench/bench_science.py [--steps 2000] [--seeds 3] [--only 'dense;static;rigl']
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import common  # noqa: E402
from bench.common import RESULTS, SHAKESPEARE  # noqa: E402

WORK = ROOT / "bench" / "work" / "science"
RECORDS = ROOT / "bench" / "results" / "science_runs"
SECTION = "80_science"
CONFIG = ROOT / "configs" / "demo.yaml"

COMMON = ["model.n_layer=4", "model.n_head=4", "model.block_size=128", "data.tokenizer=char",
          "deepspeed.train_micro_batch_size_per_gpu=8", "deepspeed.zero_optimization.stage=2",
          "train.eval_batches=50", "train.progress=false", "train.save_final_model=true", "train.save_interval=0",
          "sparsity.sparsity=0.9", "sparsity.distribution=erk", "sparsity.update_interval=100"]
W128 = ["model.n_embd=128"]
IMP_PRUNE = 1 - 0.1 ** (1 / 3)  # 3 rounds to 90%

# name, seeds ("all": --seeds of them, 1: one), overrides[, steps x --steps]
STANDARD = "sparsity.parameterization=standard"
COSINE = "sparsity.drop_fraction_schedule=cosine"
ROWS = [
    ("dense", "all", [*W128, "sparsity.method=none"]),
    ("small dense (width 48)", "all", ["model.n_embd=48", "sparsity.method=none"]),
    ("static", "all", [*W128, "sparsity.method=static"]),
    ("snip", "all", [*W128, "sparsity.method=snip", "sparsity.distribution=global"]),
    ("grasp", "all", [*W128, "sparsity.method=grasp", "sparsity.distribution=global"]),
    ("synflow", "all", [*W128, "sparsity.method=synflow", "sparsity.distribution=global"]),
    ("gmp", "all", [*W128, "sparsity.method=magnitude", "sparsity.start_step=200"]),
    ("set", "all", [*W128, "sparsity.method=set"]),
    ("rigl", "all", [*W128, "sparsity.method=rigl"]),
    ("imp (3 rounds, rewind 5%)", 1, "lottery"),
    ("2:4 static", 1, [*W128, "sparsity.method=static", "sparsity.pattern=2:4", "sparsity.sparsity=0.5"]),
    ("2:4 magnitude", 1, [*W128, "sparsity.method=magnitude", "sparsity.pattern=2:4", "sparsity.sparsity=0.5",
                          "sparsity.start_step=200"]),
    ("2:4 sr_ste", 1, [*W128, "sparsity.method=sr_ste", "sparsity.pattern=2:4", "sparsity.sparsity=0.5"]),
    ("freezenet (snip 90%, half frozen)", 1, [*W128, "sparsity.method=snip", "sparsity.distribution=global",
                                              "freeze.fraction=0.5", "freeze.select=saliency"]),
    ("snip 95% (same trainable count)", 1, [*W128, "sparsity.method=snip", "sparsity.distribution=global",
                                            "sparsity.sparsity=0.95"]),
    # block-sparse structure (what the block-sparse kernels need) against unstructured RigL
    ("rigl block:32x32", 1, [*W128, "sparsity.method=rigl", "sparsity.pattern=block:32x32"]),
    # the gap against the block size: at width 128 a 32x32 grid has 4 blocks across, so 10% density leaves most
    # output rows of every layer without a single input block
    ("rigl block:16x16", 1, [*W128, "sparsity.method=rigl", "sparsity.pattern=block:16x16"]),
    ("rigl block:8x8", 1, [*W128, "sparsity.method=rigl", "sparsity.pattern=block:8x8"]),
    # SμPar scales a layer by its density, as if every output row had that share of its inputs; a block mask gives
    # its live rows whole blocks of inputs and its dead rows none
    ("rigl block:32x32, standard parameterization", 1, [*W128, "sparsity.method=rigl",
                                                         "sparsity.pattern=block:32x32", STANDARD]),
    # the defaults' parameterization (SμPar) against the dense hyperparameters, and RigL's "5x" schedule
    ("rigl, old defaults (standard parameterization, grow window 1)", 1,
     [*W128, "sparsity.method=rigl", STANDARD, "sparsity.grow_grad_steps=1", COSINE]),
    ("static, standard parameterization", 1, [*W128, "sparsity.method=static", STANDARD]),
    # PaI, GMP and SR-STE train under the standard parameterization (their layer densities are not fixed when the
    # optimizer is built), so their published orderings are also checked against static rows trained the same way
    # SNIP's scores inside ERK's layer densities (static's), against static: the score alone, not the allocation
    ("snip, ERK distribution", 1, [*W128, "sparsity.method=snip"]),
    ("2:4 static, standard parameterization", 1, [*W128, "sparsity.method=static", "sparsity.pattern=2:4",
                                                  "sparsity.sparsity=0.5", STANDARD]),
    ("rigl 5x steps", 1, [*W128, "sparsity.method=rigl"], 5),
    # the RigL paper's cosine decay of the drop fraction, RigL's default until these rows measured the constant
    # fraction (SET's, today's default) better
    ("rigl, cosine drop fraction (the paper's)", "all", [*W128, "sparsity.method=rigl", COSINE]),
    ("rigl 5x steps, cosine drop fraction", 1, [*W128, "sparsity.method=rigl", COSINE], 5),
    ("rigl block:32x32, cosine drop fraction", 1, [*W128, "sparsity.method=rigl", "sparsity.pattern=block:32x32",
                                                   COSINE]),
    # the block kernels keep RigL's growth to one batch (a dense dW on the update step only, for speed); growing
    # on the gradient averaged over the whole update interval instead (block:8x8 ran dense kernels, so its row
    # above already has that window)
    ("rigl block:32x32, growth window 100", 1, [*W128, "sparsity.method=rigl", "sparsity.pattern=block:32x32",
                                                "sparsity.grow_grad_steps=100"]),
]
CONTROL = "imp reinit control (seed + 1000)"


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def overrides_for(row: list, steps: int, seed: int, out: Path) -> list:
    return [*COMMON, *row, f"train.steps={steps}", f"train.eval_interval={max(1, steps // 4)}",
            f"train.log_interval={max(1, steps // 40)}", f"data.path={SHAKESPEARE}", f"train.seed={seed}",
            f"train.output_dir={out}"]


def same_config(out: Path, overrides: list, finished: bool = True) -> bool:
    """A finished run (or its committed record; ``finished=False``: any run, e.g. an interrupted one) with exactly
    the config this script would run now."""
    from dist_sparse import config as config_mod

    if (finished and not (out / "summary.json").exists()) or not (out / "config.json").exists():
        return False
    wanted = config_mod.load(CONFIG, overrides).to_dict()
    saved = json.loads((out / "config.json").read_text())
    # the output directory is the only key that differs between a run and its record
    saved["train"]["output_dir"] = wanted["train"]["output_dir"]
    return json.loads(json.dumps(wanted)) == saved


def _slim(line: str) -> str:
    """A metrics.jsonl line without its per-layer lists (layer_density, layer_churn): what the report draws."""
    rec = json.loads(line)
    rec.pop("layer_density", None)
    if isinstance(rec.get("mask_update"), dict):
        rec["mask_update"].pop("layer_churn", None)
    return json.dumps(rec)


def attention_split(out: Path) -> dict | None:
    """Density of the query, key and value thirds of GPT-2's fused ``c_attn`` (Conv1D, (in, 3 x width)), mean over
    layers, from a finished run's exported masks (None without them): where a method put the attention's weights."""
    path = out / "final" / "sparsity_masks.safetensors"
    if not path.exists():
        return None
    from safetensors import safe_open

    from dist_sparse.masks import load_masks

    masks = load_masks(str(path))
    with safe_open(str(out / "final" / "model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in masks if k.endswith("attn.c_attn.weight")}
    parts = {"query": [], "key": [], "value": []}
    for name, shape in shapes.items():
        m = masks[name].reshape(shape).bool()
        for i, part in enumerate(parts):
            third = shape[1] // 3
            parts[part].append(float(m[:, i * third: (i + 1) * third].float().mean()))
    return {k: statistics.mean(v) for k, v in parts.items()} if shapes else None


def record(out: Path) -> Path:
    """Copy a finished run's config, summary and slim metrics into the committed records (atomic per file);
    a lottery root records its lottery.json and every round's run the same way."""
    dest = RECORDS / out.name
    dest.mkdir(parents=True, exist_ok=True)
    runs = [("", out)]
    if (out / "lottery.json").exists():
        rep = json.loads((out / "lottery.json").read_text())
        runs += [(r["dir"], out / r["dir"]) for r in rep.get("round", [])]
        if rep.get("control"):
            runs.append((rep["control"]["dir"], out / rep["control"]["dir"]))
    split = attention_split(out)
    if split is not None:  # the masks are not recorded (too large); their attention split is
        (dest / "attention.json.tmp").write_text(json.dumps(split))
        os.replace(dest / "attention.json.tmp", dest / "attention.json")
    for sub, src in runs:
        (dest / sub).mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "summary.json", "lottery.json", "metrics.jsonl"):
            if not (src / name).exists():
                continue
            text = (src / name).read_text()
            if name == "metrics.jsonl":
                text = "\n".join(_slim(ln) for ln in text.splitlines() if ln.strip()) + "\n"
            tmp = dest / sub / f"{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, dest / sub / name)
    return dest


def train(name: str, row: list, steps: int, seed: int) -> tuple:
    out = WORK / f"{slug(name)}_s{seed}_{steps}"
    overrides = overrides_for(row, steps, seed, out)
    for done in (out, RECORDS / out.name):  # this checkout's run, else the committed record of an earlier one
        if same_config(done, overrides):
            if done == out:
                record(out)
            return json.loads((done / "summary.json").read_text()), done, True
    cmd = [sys.executable, "-m", "dist_sparse.cli.main", "train", str(CONFIG), "--nproc", "2"]
    for o in overrides:
        cmd += ["--set", o]
    if same_config(out, overrides, finished=False) and (out / "checkpoints").exists():
        cmd += ["--resume", "auto"]  # an interrupted run of the same config continues
    elif out.exists():
        shutil.rmtree(out)  # a run of another config (the script's rows changed): its checkpoints are not this run's
    proc = subprocess.run(cmd, env=dict(os.environ, DS_ACCELERATOR="cpu"), capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{name} (seed {seed}) failed:\n{proc.stderr[-5000:]}")
    record(out)
    return json.loads((out / "summary.json").read_text()), out, False


def lottery(name: str, steps: int, seed: int) -> tuple:
    out = WORK / f"{slug(name)}_s{seed}_{steps}"
    for done in (out, RECORDS / out.name):
        report = done / "lottery.json"
        if report.exists() and "control" in json.loads(report.read_text()):
            if done == out:
                record(out)
            return json.loads(report.read_text()), done, True
    # dist-sparse lottery resumes its own rounds
    cmd = [sys.executable, "-m", "dist_sparse.cli.main", "lottery", str(CONFIG), "--rounds", "3",
           "--prune-fraction", f"{IMP_PRUNE:.6f}", "--rewind-step", str(max(1, steps // 20)), "--control",
           "reinit", "--nproc", "2"]
    for o in overrides_for([*W128, "sparsity.sparsity=0.9"], steps, seed, out):
        cmd += ["--set", o]
    proc = subprocess.run(cmd, env=dict(os.environ, DS_ACCELERATOR="cpu"), capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-5000:]}")
    record(out)
    return json.loads((out / "lottery.json").read_text()), out, False


def finished(name: str, row, steps: int, seed: int) -> bool:
    """Whether a run (or its record) of this row is done, so that train()/lottery() would reuse it."""
    out = WORK / f"{slug(name)}_s{seed}_{steps}"
    if row == "lottery":
        return any((d / "lottery.json").exists() and "control" in json.loads((d / "lottery.json").read_text())
                   for d in (out, RECORDS / out.name))
    overrides = overrides_for(row, steps, seed, out)
    return any(same_config(d, overrides) for d in (out, RECORDS / out.name))


def fmt(values: list) -> str:
    if not values:
        return "not run"
    if len(values) == 1:
        return f"{values[0]:.4f} (1 seed)"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} ({len(values)} seeds)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", default=None, help="row names separated by ';' (a screening subset)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: the section from the finished runs and records only")
    args = parser.parse_args()
    if common.skipped_without_shakespeare(SECTION, "Science table"):
        return
    only = {n.strip() for n in args.only.split(";")} if args.only else None  # row names contain commas
    rows = [(r[0], args.seeds if r[1] == "all" else 1, r[2], r[3] if len(r) > 3 else 1) for r in ROWS
            if only is None or r[0] in only]
    results = {"vals": {}, "kind": {}, "reused": [], "dirs": [], "attention": {}, "figure_dirs": []}
    # seed by seed over the rows: an interrupted table has every row at the same number of seeds
    for seed in range(max((n for _, n, _, _ in rows), default=0)):
        for name, n, row, factor in rows:
            if seed >= n:
                continue
            if args.report_only and not finished(name, row, args.steps * factor, seed):
                continue
            if row == "lottery":
                rep, out, was = lottery(name, args.steps, seed)
                results["vals"].setdefault(name, []).append(rep["round"][-1]["val_loss"])
                results["vals"].setdefault(CONTROL, []).append(rep["control"]["val_loss"])
                results["kind"][name] = results["kind"][CONTROL] = "standard"
            else:
                summary, out, was = train(name, row, args.steps * factor, seed)
                results["vals"].setdefault(name, []).append(summary["final_val_loss"])
                window = summary.get("grow_grad_steps")
                results["kind"][name] = summary.get("parameterization", "standard") + (
                    f", grow window {window}" if window is not None else "")
            results["dirs"].append(out)
            main = "cosine" not in name  # the figure: the main rows (not the older defaults' variants), one seed
            if seed == 0 and main and (n > 1 or row == "lottery" or factor > 1):
                results["figure_dirs"].append(out)
            split = (json.loads((out / "attention.json").read_text()) if (out / "attention.json").exists()
                     else attention_split(out))
            if split is not None:
                results["attention"].setdefault(name, []).append(split)
            if was:
                results["reused"].append(f"{name} seed {seed}")
            print(f"{name} seed {seed}: {results['vals'][name][-1]:.4f}{' (reused)' if was else ''}", flush=True)
            write(args, results, figure=False)  # the section stays current if the table is stopped
    write(args, results, figure=True)


def attention_table(splits: dict) -> list:
    """Where each method put the attention's weights: the query/key/value thirds of the fused c_attn (from the runs'
    exported masks; runs recorded before this was measured have none)."""
    if not splits:
        return []
    rows = [f"| {name} | {len(v)} | " + " | ".join(f"{statistics.mean(x[k] for x in v):.3f}"
                                                  for k in ("query", "key", "value")) + " |"
            for name, v in splits.items()]
    return ["Density of the query, key and value thirds of each block's fused `c_attn` (mean over the 4 layers and "
            "the seeds whose exported masks were measured):", "", "| run | seeds | query | key | value |",
            "|---|---|---|---|---|", *rows, ""]


def write(args, results: dict, figure: bool) -> None:
    vals, kind = results["vals"], results["kind"]

    def mean(name):
        return statistics.mean(vals[name]) if vals.get(name) else None

    def std(name):
        return statistics.stdev(vals[name]) if len(vals.get(name, [])) > 1 else None

    def order(label, better, worse):
        a, b = mean(better), mean(worse)
        if a is None or b is None:
            return f"| {label} | not measured | {better} or {worse} not run |"
        spread = [x for x in (std(better), std(worse)) if x is not None]
        noise = f"; seed std {' / '.join(f'{x:.4f}' for x in spread)}" if spread else ""
        holds = "yes" if a < b else "NO"
        if spread and abs(a - b) <= max(spread):
            holds += " (gap within the seed std)"
        return f"| {label} | {holds} | {a:.4f} vs {b:.4f} ({(a - b) / b * 100:+.2f}%{noise}) |"

    def target(label, ok, figures):
        return f"| {label} | {'not measured' if ok is None else 'yes' if ok else 'NO'} | {figures} |"

    dense = mean("dense")
    table = [f"| {name} | {fmt(vals.get(name, []))} | "
             f"{f'{mean(name) / dense:.3f}' if dense and mean(name) else '-'} | {kind.get(name, '-')} |"
             for name in [r[0] for r in ROWS] + [CONTROL]]
    checks = [order(f"{pai} above static random (Frankle et al. 2021)", pai, "static") for pai in
              ("snip", "grasp", "synflow")]
    checks += [order(f"{pai} above static random, both standard parameterization", pai,
                     "static, standard parameterization") for pai in ("snip", "grasp", "synflow")]
    checks += [order("snip above static random, both ERK and standard parameterization", "snip, ERK distribution",
                     "static, standard parameterization")]
    checks += [order(f"GMP above {pai} (Frankle et al. 2021)", "gmp", pai) for pai in ("snip", "grasp", "synflow")]
    checks += [order("rewound ticket above its reinit control", "imp (3 rounds, rewind 5%)", CONTROL),
               order("SR-STE 2:4 above static 2:4", "2:4 sr_ste", "2:4 static"),
               order("SR-STE 2:4 above static 2:4, both standard parameterization", "2:4 sr_ste",
                     "2:4 static, standard parameterization"),
               order("FreezeNet above SNIP at the same trainable count (Wimmer et al. 2020)",
                     "freezenet (snip 90%, half frozen)", "snip 95% (same trainable count)"),
               order("RigL above SET", "rigl", "set"), order("SET above static", "set", "static"),
               order("RigL's constant drop fraction (the default) above the paper's cosine decay", "rigl",
                     "rigl, cosine drop fraction (the paper's)"),
               order("RigL with the cosine decay above SET", "rigl, cosine drop fraction (the paper's)", "set")]
    rigl, static, small, five = mean("rigl"), mean("static"), mean("small dense (width 48)"), mean("rigl 5x steps")
    block = mean("rigl block:32x32")
    targets = [
        target("RigL 90% at the defaults: at most 1.08x dense", None if rigl is None or dense is None else
               rigl <= 1.08 * dense, f"{rigl / dense:.3f}x" if rigl and dense else "rigl or dense not run"),
        target("RigL at the defaults better than static", None if rigl is None or static is None else rigl < static,
               f"{rigl:.4f} vs {static:.4f}" if rigl and static else "rigl or static not run"),
        target("RigL at the defaults better than the small dense model", None if rigl is None or small is None else
               rigl < small, f"{rigl:.4f} vs {small:.4f}" if rigl and small else "rigl or small dense not run"),
        target("block-32 RigL within 3% of unstructured RigL", None if rigl is None or block is None else
               block <= 1.03 * rigl, f"{block / rigl:.4f}x ({block:.4f} vs {rigl:.4f})" if rigl and block
               else "rigl or rigl block:32x32 not run"),
        f"| RigL with 5x the steps against dense at 1x (stated, no target) | - | "
        f"{f'{five:.4f} vs {dense:.4f} ({five / dense:.3f}x)' if five and dense else 'not run'} |",
    ]
    figure_path = RESULTS / f"{SECTION}.png"
    if figure and results["figure_dirs"]:
        subprocess.run([sys.executable, "-m", "dist_sparse.cli.main", "report", *map(str, results["figure_dirs"]),
                        "--out", str(figure_path)], check=True, cwd=ROOT)
    md = [
        "## Science table: every family of sparse training, one setting",
        "",
        f"Command: `{common.command_line()}` (each row is `dist-sparse train configs/demo.yaml --nproc 2 --set "
        "...`, IMP is `dist-sparse lottery`; the overrides are in `bench/bench_science.py`).",
        f"Machine: {common.machine_line()}.",
        *(["`--report-only`: this section reads the runs finished so far (here and in the committed records of "
           "earlier sessions, which ran the same command without it, or with `--only`); it ran nothing."]
          if args.report_only else []),
        "",
        f"Setting: `{SHAKESPEARE.name}`, char GPT-2 4 x 128, context 128, batch 8 per rank, 2 ranks, ZeRO-2, "
        f"{args.steps} steps, the demo's AdamW recipe (lr 1e-3, betas 0.9/0.95, weight decay 0.1), 90% sparsity "
        "(ERK; the pruning-at-initialization rows global, as in their papers) unless the row says otherwise; "
        "every other key at its default, so static, SET and RigL train under SμPar and RigL grows on the dense "
        "gradient averaged over its update interval (docs/methods.md; the column says what each row resolved "
        "to); final validation loss, mean ± std over the seeds that "
        f"ran. IMP: 3 rounds pruning {IMP_PRUNE:.4f} of the remaining weights each (to 90%), rewinding to step "
        f"{max(1, args.steps // 20)} (5%); its control trains the final masks from a fresh initialisation "
        "(seed + 1000). `rigl 5x steps` runs 5x the steps (the RigL paper's 5x schedule; RigL's schedule scales "
        "with them).",
        "",
        "| run | final val loss | x dense | parameterization (RigL: growth window) |",
        "|---|---|---|---|",
        *table,
        "",
        "| published ordering | holds | figures (lower loss is better) |",
        "|---|---|---|",
        *checks,
        "",
        "| target (the defaults) | reached | measured |",
        "|---|---|---|",
        *targets,
        "",
        *attention_table(results["attention"]),
        f"Reused finished runs (same config): {', '.join(results['reused']) or 'none'}. Rows marked `not run` "
        "were not part of this invocation (`--only`) or not reached yet; the mean ± std covers the seeds that ran.",
    ]
    if results["figure_dirs"] and (figure or figure_path.exists()):
        md += ["", "`dist-sparse report` of seed 0 of the three-seed rows, IMP's rounds and the 5x run:", "",
               f"![report of these runs]({os.path.relpath(figure_path, ROOT / 'docs')})"]
    common.write_section(SECTION, "\n".join(md))


if __name__ == "__main__":
    main()
