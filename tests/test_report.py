"""`dist-sparse report`: a PNG from runs' metrics.jsonl / summary.json and a lottery's lottery.json (Agg)."""

import json

from dist_sparse.cli.main import main
from dist_sparse.cli.report import read_run


def fake_run(path, val, churn=True):
    path.mkdir(parents=True)
    lines = []
    for step in (10, 20, 30, 40):
        rec = {"step": step, "loss": 3.0 - step / 40}
        if churn and step in (20, 40):
            rec["mask_update"] = {"step": step - 5, "churn": 0.1 * step / 40}
        if step == 20:
            rec["val_loss"] = val + 0.5
        lines.append(json.dumps(rec))
    lines.append(json.dumps({"step": 40, "final_val_loss": val}))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (path / "summary.json").write_text(json.dumps({"final_val_loss": val, "layer_density": {"h.0.attn.weight": 0.2,
                                                                                          "h.0.mlp.weight": 0.1}}))


def test_report_reads_runs_and_writes_a_png(tmp_path):
    fake_run(tmp_path / "a" / "rigl", 2.0)
    fake_run(tmp_path / "b" / "rigl", 2.1, churn=False)
    lot = tmp_path / "imp"
    for r in range(3):
        fake_run(lot / f"round-{r:02d}", 2.0 + r / 10)
    (lot / "lottery.json").write_text(json.dumps({
        "rounds": 2, "prune_fraction": 0.5, "rewind_step": 4,
        "round": [{"round": r, "sparsity": 1 - 0.5 ** r, "val_loss": 2.0 + r / 10, "dir": f"round-{r:02d}"}
                  for r in range(3)],
        "control": {"kind": "reinit", "seed": 1000, "dir": "control-reinit", "sparsity": 0.75, "val_loss": 2.4}}))
    run = read_run(tmp_path / "a" / "rigl")
    assert run["curves"]["loss"][0] == (10, 2.75) and run["curves"]["val_loss"] == [(20, 2.5), (40, 2.0)]
    assert run["curves"]["churn"] == [(15, 0.05), (35, 0.1)]
    assert read_run(lot)["lottery"]["control"]["val_loss"] == 2.4
    out = tmp_path / "fig" / "report.png"
    assert main(["report", str(tmp_path / "a" / "rigl"), str(tmp_path / "b" / "rigl"), str(lot), "--out",
                 str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    assert main(["report", str(tmp_path / "nothing"), "--out", str(out)]) == 2


def test_report_of_many_runs_shares_one_legend(tmp_path):
    """Past a handful of runs the panels share one legend below them (the curves stay visible), colours from a
    20-colour map; the figure grows to hold it."""
    from PIL import Image

    runs = []
    for i in range(24):
        fake_run(tmp_path / f"run{i:02d}", 2.0 + i / 100)
        runs.append(str(tmp_path / f"run{i:02d}"))
    few, many = tmp_path / "few.png", tmp_path / "many.png"
    assert main(["report", *runs[:3], "--out", str(few)]) == 0
    assert main(["report", *runs, "--out", str(many)]) == 0
    assert Image.open(many).size[1] > Image.open(few).size[1]  # room for the shared legend
