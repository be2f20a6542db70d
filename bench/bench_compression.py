"""Gradient compression: sparse gradient compression with error feedback inside DeepSpeed (ZeRO-2, 2 ranks).

The setting of bench_training.py (tinyshakespeare, char-level GPT-2 4 x 128, context 128, batch 8 per rank, AdamW
lr 1e-3 with torch's default betas 0.9/0.999, 2000 steps), five runs one after another through `dist-sparse train
--nproc 2`: uncompressed dense; top-k 1% with error feedback and Adam momentum correction, and without error
feedback; RigL 90% uncompressed; RigL 90% + top-k 1% with error feedback and momentum correction.
`comm_bytes_per_step` is measured by the exchange (mean over all steps, RigL's dense update
steps included); `dense_comm_bytes_per_step` is what DeepSpeed's own reduction hands to torch.distributed for the
same gradients.

    python bench/bench_compression.py [--steps 2000] [--baselines DIR]

The two uncompressed rows are the same runs as bench_training.py's `dense` and `rigl (paper)`: when DIR (default
bench/work/training, where `make bench` has just written them) holds a finished run whose saved config equals,
key for key, the config this script would run, its summary is reused instead of training it again; the section
says which rows were reused and from where.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_training import COMMON, run  # noqa: E402  (the training benchmark's runner: its settings, same command)
from bench.common import (  # noqa: E402
    SHAKESPEARE,
    command_line,
    machine_line,
    skipped_without_shakespeare,
    write_section,
)

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "compression"
TOPK1 = ["compression.method=topk", "compression.density=0.01", "compression.min_tensor_size=0"]
# torch's AdamW betas, as the training benchmark's reference figures use them (bench_training.py on main); RigL as
# in the paper (growth scored by the update step's dense gradient)
BASE = ["model.n_embd=128", "deepspeed.optimizer.params.betas=[0.9,0.999]"]

EF, NOEF = "compression.error_feedback=true", "compression.error_feedback=false"
# momentum correction for Adam (docs/compression.md): both Adam moments on each rank's local gradient, error feedback
# on the momentum, top-k ranked by the step a coordinate would make
MC = ["compression.momentum_correction=true"]

RUNS = [  # key, label, overrides
    ("dense", "dense, uncompressed", [*BASE, "sparsity.method=none"]),
    ("topk_ef_mc", "dense, top-k 1% + error feedback + momentum correction",
     [*BASE, "sparsity.method=none", *TOPK1, EF, *MC]),
    ("topk_noef", "dense, top-k 1% without error feedback", [*BASE, "sparsity.method=none", *TOPK1, NOEF]),
    ("rigl", "RigL 90%, uncompressed", [*BASE, "sparsity.method=rigl"]),
    ("rigl_topk_ef_mc", "RigL 90% + top-k 1% + error feedback + momentum correction",
     [*BASE, "sparsity.method=rigl", *TOPK1, EF, *MC]),
]


BASELINE_RUNS = {"dense": "dense", "rigl": "rigl__paper_"}  # bench_training.py's output folders for these runs
# keys that one of the two configs may lack (added later), with the default that makes it the same run (a tuple:
# values that all mean the default, e.g. data.val_fraction written as 0.1 before it defaulted to null)
BASELINE_EXTRA_OK = {("sparsity", "grow_grad_steps"): 1, ("sparsity", "compact_state"): False,
                     ("data", "prepared"): None, ("data", "sampling"): "random", ("data", "val_fraction"): (None, 0.1)}


def expected_config(overrides: list, steps: int) -> dict:
    """The config `run()` trains for these overrides (its own --set list, output_dir aside)."""
    from dist_sparse import config as C

    sets = COMMON + overrides + [f"train.steps={steps}", f"train.eval_interval={steps}",
                                 f"train.log_interval={max(1, steps // 20)}", f"data.path={SHAKESPEARE}"]
    raw = C.apply_overrides(C.read_file(ROOT / "configs" / "demo.yaml"), sets)
    return C.from_dict(raw).to_dict()


def reusable(folder: Path, overrides: list, steps: int) -> dict | None:
    """A finished run in ``folder`` whose config equals ours key for key (output_dir and our compression block,
    which must be 'none', aside); None otherwise."""
    if not ((folder / "summary.json").is_file() and (folder / "config.json").is_file()):
        return None
    saved, ours = json.loads((folder / "config.json").read_text()), expected_config(overrides, steps)
    if ours.pop("compression")["method"] != "none" or saved.pop("compression", {"method": "none"})["method"] != "none":
        return None
    for cfg in (saved, ours):
        cfg["train"].pop("output_dir")
    for (section, key), value in BASELINE_EXTRA_OK.items():  # missing on either side means the default value
        same = value if isinstance(value, tuple) else (value,)
        if saved.get(section, {}).get(key, same[0]) not in same or ours.get(section, {}).get(key, same[0]) not in same:
            return None
        saved.get(section, {}).pop(key, None)
        ours.get(section, {}).pop(key, None)
    return json.loads((folder / "summary.json").read_text()) if saved == ours else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--baselines", type=Path, default=ROOT / "bench" / "work" / "training",
                        help="bench_training.py's run folders; identical uncompressed runs there are reused")
    args = parser.parse_args()
    if skipped_without_shakespeare("30_compression", "Gradient compression with error feedback"):
        return
    WORK.mkdir(parents=True, exist_ok=True)
    results, reused = {}, {}
    for key, label, overrides in RUNS:
        folder = args.baselines / BASELINE_RUNS[key] if key in BASELINE_RUNS else None
        found = reusable(folder, overrides, args.steps) if folder is not None else None
        if found is not None:
            results[key], reused[key] = found, folder
            print(f"{label}: reused {folder} (identical config), val {found['final_val_loss']:.4f}", flush=True)
        else:
            results[key] = run(label, overrides, args.steps, SHAKESPEARE, WORK / key)
        (WORK / "results.json").write_text(json.dumps(results, indent=2))  # partial results survive a crash
    rows = []
    for key, label, _ in RUNS:
        s = results[key]
        base = results["rigl" if key.startswith("rigl") else "dense"]
        # an uncompressed run moves DeepSpeed's dense bytes (a reused run from before compression lacks the keys)
        dense = results["topk_ef_mc"]["dense_comm_bytes_per_step"]
        comm = s.get("comm_bytes_per_step", dense)
        rows.append(f"| {label} | {s['achieved_sparsity']:.3f} | {s['final_val_loss']:.4f} | "
                    f"{s['final_val_loss'] / base['final_val_loss']:.4f} | {comm:,.0f} | {dense:,.0f} | "
                    f"{comm / dense:.4f} (1/{dense / comm:.0f}) | {s.get('mask_sync_bytes_per_step', 0):,.0f} | "
                    f"{s['median_step_seconds'] * 1e3:.0f} |")
    d, ef, noef, rigl, comb = (results[k] for k in ("dense", "topk_ef_mc", "topk_noef", "rigl", "rigl_topk_ef_mc"))

    def ratio(s):
        return s["comm_bytes_per_step"] / s["dense_comm_bytes_per_step"]

    checks = [
        ("top-k 1% + EF (+ momentum correction): val loss within 3% of uncompressed",
         ef["final_val_loss"] <= 1.03 * d["final_val_loss"], f"{ef['final_val_loss'] / d['final_val_loss']:.4f}x"),
        ("top-k 1% + EF (+ momentum correction): comm bytes <= 1/40 of dense", ratio(ef) <= 1 / 40,
         f"1/{1 / ratio(ef):.1f}"),
        ("error feedback closes a gap (no-EF val loss higher)", noef["final_val_loss"] > ef["final_val_loss"],
         f"{noef['final_val_loss']:.4f} without vs {ef['final_val_loss']:.4f} with EF (+ momentum correction)"),
        ("RigL 90% + top-k 1% + EF (+ momentum correction): comm bytes <= 1/100 of dense", ratio(comb) <= 1 / 100,
         f"1/{1 / ratio(comb):.1f}"),
        ("RigL 90% + top-k 1% + EF (+ momentum correction): val loss within 3% of RigL uncompressed",
         comb["final_val_loss"] <= 1.03 * rigl["final_val_loss"],
         f"{comb['final_val_loss'] / rigl['final_val_loss']:.4f}x"),
    ]
    reuse_note = ("Reused (not re-run): " + "; ".join(
        f"`{k}` = `{f}` (an earlier run whose saved config equals this script's, key for key)"
        for k, f in reused.items()) + ".") if reused else "Every row was run by this command."
    md = [
        "## Gradient compression with error feedback",
        "",
        f"Command: `{command_line()}` (each row is one `dist-sparse train configs/demo.yaml --nproc 2 --set ...` "
        "run; the overrides are in `bench/bench_compression.py` and `bench/bench_training.py`).",
        f"Machine: {machine_line()}.",
        reuse_note,
        "",
        f"Setting: `{SHAKESPEARE.name}`, char-level GPT-2 (4 layers, width 128, context 128), batch 8 per rank, "
        f"AdamW lr 1e-3 (betas 0.9/0.999, weight decay 0.01), 2 ranks, ZeRO-2, {args.steps} steps, the same seed "
        "and data order in every run. Compression: per-tensor top-k at density 1% of the unpruned coordinates, "
        "every tensor compressed (`min_tensor_size: 0`), no warm-up. \"Momentum correction\" "
        "(`compression.momentum_correction: true`, docs/compression.md) keeps both Adam moments on each rank's "
        "local gradient: the first moment is accumulated before selection and error feedback runs on it, the "
        "second moment of the averaged gradient is estimated from local statistics (a per-tensor blend fitted to "
        "the averaged gradient's energy, measured by count sketches of 16 fp32 values per tensor and step, "
        "counted in the bytes), and top-k ranks coordinates by the step they would make (without it, AdamW on "
        "the exchanged error-fed gradient reached only 2.4592, see docs/compression.md). At ZeRO-2 a rank's own "
        "partition range never crosses the wire: its contribution there is applied whole, and its k = 1% of a "
        "tensor's unpruned coordinates are chosen outside that range. "
        "RigL: 90% sparsity "
        "(ERK), update every 100 steps until 75% of training, growth by the update step's dense gradient (the "
        "paper's RigL); on its update steps the sparsified tensors' dense "
        "gradient is exchanged uncompressed (growth needs it) and nothing else is sent (the update replaces the "
        "optimizer step). Validation loss on the last 10% of the text (50 batches of 8 x 128 characters).",
        "",
        "| run | sparsity | final val loss | x uncompressed | comm bytes/step | dense comm bytes/step | "
        "comm / dense | mask sync bytes/step | median step (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "| target | reached | measured |",
        "|---|---|---|",
        *[f"| {t} | {'yes' if ok else 'NO'} | {v} |" for t, ok, v in checks],
        "",
        "Bytes are per rank and optimizer step, averaged over all steps: what each rank hands to "
        "`torch.distributed` for gradients (compressed: int32 indices + fp32 values of the selected coordinates, "
        "or fp32 values only where that is smaller, plus the count sketches with momentum correction; dense: "
        "DeepSpeed's all-reduce of every gradient element in "
        "fp32). \"x uncompressed\" compares with the dense run, or with RigL uncompressed for the RigL rows. The "
        "mask sync column is the bit-packed all-gather of the masks after each mask update (not gradient "
        "traffic, listed for completeness). Step times are from a shared 2-core CPU machine and move with its "
        "load; compression is not a speed-up on gloo/CPU at this model size.",
    ]
    write_section("30_compression", "\n".join(md))


if __name__ == "__main__":
    main()
