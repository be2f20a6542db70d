"""`dist-sparse report RUN_DIR... --out FILE.png`: the pictures researchers compare runs by.

From each run directory's ``metrics.jsonl`` and ``summary.json`` (a ``dist-sparse train`` output directory, or a
``dist-sparse lottery`` root holding ``lottery.json``), one figure with four panels:

1. validation loss (markers) and training loss (lines) against steps, one colour per run, legend by run name (past
   6 runs one legend below the panels);
2. per-layer density of the last run given, as bars (``summary.json``'s ``layer_density``);
3. mask churn per update (regrown / active weights, ``metrics.jsonl``'s ``mask_update``) against steps;
4. for lottery runs, the final validation loss per round (and the reinit control's, dashed).

matplotlib with the Agg backend: no display is needed.
"""

import argparse
import json
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-sparse report", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, metavar="FILE.png")
    return p


def read_run(run: Path) -> dict:
    """What the report draws from one run directory (a lottery root reads its rounds' runs)."""
    run = Path(run)
    lottery = run / "lottery.json"
    if lottery.exists():
        report = json.loads(lottery.read_text())
        rounds = report.get("round", [])
        last = run / rounds[-1]["dir"] if rounds else None
        out = read_run(last) if last is not None and (last / "metrics.jsonl").exists() else {"curves": {}}
        out.update(lottery=report)
        return out
    metrics, summary = run / "metrics.jsonl", run / "summary.json"
    if not metrics.exists():
        raise FileNotFoundError(f"{run} has no metrics.jsonl (not a dist-sparse train or lottery output directory)")
    curves = {"loss": [], "val_loss": [], "churn": []}
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        for key in ("loss", "val_loss"):
            if key in rec:
                curves[key].append((rec["step"], rec[key]))
        if "final_val_loss" in rec:
            curves["val_loss"].append((rec["step"], rec["final_val_loss"]))
        update = rec.get("mask_update")
        if update and (not curves["churn"] or curves["churn"][-1][0] != update["step"]):
            curves["churn"].append((update["step"], update["churn"]))
    return {"curves": curves, "summary": json.loads(summary.read_text()) if summary.exists() else {}}


def _names(runs: list) -> list:
    """Run names for the legend: the directory name, with its parent's when two would be equal."""
    names = [Path(r).name for r in runs]
    return [f"{Path(r).parent.name}/{Path(r).name}" if names.count(n) > 1 else n for r, n in zip(runs, names)]


SHARED_LEGEND_ABOVE = 6  # runs; more share one legend below the panels


def draw(runs: list, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [read_run(Path(r)) for r in runs]
    names = _names(runs)
    # many runs: one legend for the figure, below the panels (a run is one colour everywhere), so that the curves
    # stay visible; few runs: a legend in each panel
    shared = len(runs) > SHARED_LEGEND_ABOVE
    rows = -(-len(runs) // 3) if shared else 0
    fig, axes = plt.subplots(2, 2, figsize=(13, 9 + 0.22 * rows))
    loss_ax, density_ax, churn_ax, lottery_ax = axes.reshape(-1)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(runs) > len(colours):
        colours = [plt.get_cmap("tab20")(i % 20) for i in range(20)]
    styles = ["-", "-.", ":"]  # past 20 runs colours repeat: the train line's style tells them apart
    for i, (name, d) in enumerate(zip(names, data)):
        c, style = colours[i % len(colours)], styles[(i // len(colours)) % len(styles)]
        curves = d["curves"]
        if curves.get("loss"):
            loss_ax.plot(*zip(*curves["loss"]), style, color=c, alpha=0.6,
                         label=name if shared else f"{name} (train)")
        if curves.get("val_loss"):
            loss_ax.plot(*zip(*curves["val_loss"]), "o--", color=c, label="_" if shared else f"{name} (val)")
        if curves.get("churn"):
            churn_ax.plot(*zip(*curves["churn"]), "o-", color=c, label=name)
        if "lottery" in d:
            rounds = d["lottery"].get("round", [])
            lottery_ax.plot([r["round"] for r in rounds], [r["val_loss"] for r in rounds], "o-", color=c,
                            label=f"{name} (rewound)")
            control = d["lottery"].get("control")
            if control and rounds:
                lottery_ax.axhline(control["val_loss"], color=c, ls="--",
                                   label=f"{name} reinit control (sparsity {control['sparsity']:.2f})")
    loss_ax.set(title="loss (lines: training; dashed, o: validation)" if shared else "loss", xlabel="step",
                ylabel="loss")
    churn_ax.set(title="mask churn per update (regrown / active)", xlabel="step", ylabel="churn")
    lottery_ax.set(title="lottery: final validation loss per round", xlabel="round", ylabel="val loss")
    last = data[-1].get("summary", {}).get("layer_density", {})
    if last:
        density_ax.bar(range(len(last)), list(last.values()))
        density_ax.set_xticks(range(len(last)), [n.replace(".weight", "") for n in last], rotation=75, fontsize=6)
    density_ax.set(title=f"per-layer density: {names[-1]}", ylabel="density", ylim=(0, 1))
    for ax, empty in ((loss_ax, "no loss records"), (churn_ax, "no mask updates"), (lottery_ax, "no lottery runs"),
                      (density_ax, "dense run: no sparsified layers")):
        if ax.has_data():
            if ax is not density_ax and not shared:
                ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
    if shared:
        handles, labels = loss_ax.get_legend_handles_labels()
        fig.tight_layout(rect=(0, 0.22 * rows / (9 + 0.22 * rows), 1, 1))
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    else:
        fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        print(draw(args.runs, args.out))
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        print(f"dist-sparse report: {exc}", file=sys.stderr)
        return 2
    return 0
