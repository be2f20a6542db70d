"""One-shot pruning benchmark: dense GPT-2-style char model on tinyshakespeare, then magnitude / Wanda / SparseGPT
at 50% unstructured and 2:4, evaluated on the held-out split; calibration time with 1 vs 2 ranks.

    flock /tmp/dist_sparse_bench.lock .venv/bin/python bench/bench_oneshot.py

Steps: (1) train a 4-layer x 128-wide GPT-2 (character tokens) dense on the first 90% of tinyshakespeare with a
plain PyTorch loop and save it as a Hugging Face checkpoint with its tokenizer; (2) run the real CLI,
``dist-sparse sparsify`` with 128 calibration windows drawn from the training split, and ``dist-sparse eval`` on the
last 10%; (3) repeat the SparseGPT 50% run with ``--nproc 2`` and compare time and weights. Writes
``bench/results/50_oneshot.md``; if the data file is absent the section says the benchmark was skipped.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import SHAKESPEARE, command_line, machine_line, write_section  # noqa: E402

SECTION = "50_oneshot"


def cli(*args, threads: int | None = None) -> tuple[dict, float]:
    """Run ``python -m dist_sparse.cli.main ARGS``; returns the JSON it prints last and the wall time.
    ``threads`` sets ``OMP_NUM_THREADS`` (torch's intra-op threads) for the command."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dist_sparse.cli.main", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"dist-sparse {' '.join(map(str, args))} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


def train_dense(text_train: str, tokenizer, out: Path, args) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    from dist_sparse.oneshot.calibration import tokenize_text

    torch.manual_seed(args.seed)
    ids = tokenize_text(tokenizer, text_train)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_embd=args.width, n_layer=args.layers, n_head=args.heads,
                     n_positions=args.ctx, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                     eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        starts = torch.randint(0, ids.numel() - args.ctx, (args.batch,), generator=gen)
        x = torch.stack([ids[s:s + args.ctx] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 250 == 0 or step == args.steps - 1:
            print(f"train step {step} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    model.eval()
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return {"seconds": time.perf_counter() - t0, "final_loss": loss.item(),
            "params": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=None, help="scratch directory (default: a fresh temporary directory)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--ctx", type=int, default=128, help="training context = calibration/eval --seqlen")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dp-repeats", type=int, default=3, help="1-rank / 2-rank timing runs (interleaved)")
    args = p.parse_args(argv)

    header = ["## One-shot pruning (`dist-sparse sparsify` / `dist-sparse eval`)", "",
              f"Command: `flock /tmp/dist_sparse_bench.lock {command_line()}`", "", f"Machine: {machine_line()}", ""]
    if not SHAKESPEARE.is_file():
        write_section(SECTION, "\n".join(header + [f"Skipped: {SHAKESPEARE} not found."]))
        print(f"skipped: {SHAKESPEARE} not found")
        return 0

    from dist_sparse.oneshot.tiny import char_tokenizer

    work = Path(args.workdir or tempfile.mkdtemp(prefix="dist_sparse_oneshot_"))
    work.mkdir(parents=True, exist_ok=True)
    text = SHAKESPEARE.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    train_file, val_file = work / "train.txt", work / "val.txt"
    train_file.write_text(text[:cut], encoding="utf-8")
    val_file.write_text(text[cut:], encoding="utf-8")
    tok = char_tokenizer(text)
    dense = work / "dense"
    train = train_dense(text[:cut], tok, dense, args)
    seqlen = args.ctx

    def evaluate(model_dir):
        res, _ = cli("eval", model_dir, "--data", val_file, "--seqlen", seqlen, "--batch-size", 16)
        return res

    base = evaluate(dense)
    rows, runs = [], {}
    for target in (("--sparsity", "0.5"), ("--pattern", "2:4")):
        for method in ("magnitude", "wanda", "sparsegpt"):
            out = work / f"{method}_{target[1].replace(':', 'of')}"
            summary, wall = cli("sparsify", dense, "--method", method, *target, "--calib", train_file,
                                "--samples", args.samples, "--seqlen", seqlen, "--out", out, "--overwrite",
                                "--no-progress")
            res = evaluate(out)
            runs[(method, target[1])] = out
            rows.append((method, "50% unstructured" if target[0] == "--sparsity" else "2:4", res["sparsity"],
                         res["perplexity"], res["perplexity"] / base["perplexity"], summary["calibration_seconds"]))
            print(rows[-1], flush=True)

    # data-parallel calibration: the SparseGPT 50% run again with 1 and 2 ranks, interleaved and repeated (the
    # machine may be shared, so single timings are noisy; the median is reported)
    # variants: (ranks, threads per rank); "1x1" is the control with the same threads per rank as the 2-rank run
    variants = {"1": (1, None), "1x1": (1, 1), "2": (2, None)}
    timing = {v: [] for v in variants}
    for _ in range(args.dp_repeats):
        for v, (nproc, threads) in variants.items():
            out = work / f"sparsegpt_dp{v}"
            summary, wall = cli("sparsify", dense, "--method", "sparsegpt", "--sparsity", "0.5", "--calib",
                                train_file, "--samples", args.samples, "--seqlen", seqlen, "--out", out, "--overwrite",
                                "--nproc", nproc, "--no-progress", threads=threads)
            seconds = json.loads((out / "sparsify_report.json").read_text())["seconds"]
            timing[v].append((summary["calibration_seconds"], seconds["statistics"], seconds["solve"],
                              seconds["communication"], wall))
            runs[("dp", v)] = out
            print("dp", v, timing[v][-1], flush=True)
    from safetensors.torch import load_file

    w1 = load_file(str(runs[("dp", "1")] / "model.safetensors"))
    w2 = load_file(str(runs[("dp", "2")] / "model.safetensors"))
    max_diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    from dist_sparse.masks.io import load_masks

    m1, m2 = load_masks(runs[("dp", "1")]), load_masks(runs[("dp", "2")])
    same_masks = m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1)
    med = {v: [statistics.median(col) for col in zip(*timing[v])] for v in variants}

    ppl = {(r[0], r[1]): r[3] for r in rows}
    lines = header + [
        f"Model: GPT-2 style, {args.layers} layers x {args.width} wide, {args.heads} heads, character tokens "
        f"(vocab {len(tok)}), {train['params']:,} parameters, trained dense for {args.steps} steps of "
        f"{args.batch} x {args.ctx} tokens on the first 90% of tinyshakespeare ({train['seconds']:.0f} s, "
        f"final train loss {train['final_loss']:.3f}).",
        f"Pruned: every Linear/Conv1D in the blocks (attention qkv + output, MLP in + out); embeddings and LM head "
        f"dense. Calibration: {args.samples} windows of {seqlen} tokens from the training split (seed {args.seed}). "
        f"Evaluation: `dist-sparse eval --seqlen {seqlen}` on the last 10% (non-overlapping windows, "
        f"{base['tokens']:,} scored tokens).",
        "",
        "| method | pattern | sparsity (block linears) | held-out perplexity | x dense | calibration s |",
        "|---|---|---|---|---|---|",
        f"| dense | - | {base['sparsity']:.3f} | {base['perplexity']:.3f} | 1.000 | - |",
    ]
    lines += [f"| {m} | {pat} | {sp:.3f} | {pp:.3f} | {ratio:.3f} | {cal:.1f} |" for m, pat, sp, pp, ratio, cal in rows]
    checks = [
        ("SparseGPT 50% <= 1.25x dense", ppl[("sparsegpt", "50% unstructured")] <= 1.25 * base["perplexity"]),
        ("Wanda 50% <= 1.35x dense", ppl[("wanda", "50% unstructured")] <= 1.35 * base["perplexity"]),
        ("SparseGPT 2:4 better than magnitude 2:4", ppl[("sparsegpt", "2:4")] < ppl[("magnitude", "2:4")]),
    ]
    lines += ["", "Targets: " + "; ".join(f"{name}: {'met' if ok else 'NOT met'}" for name, ok in checks), ""]
    label = {"1": f"1 rank x {os.cpu_count()} threads (default)", "1x1": "1 rank x 1 thread",
             "2": "2 ranks x 1 thread each"}
    lines += [
        f"Data-parallel calibration (SparseGPT, 50%, {args.samples} windows; `--nproc 2` = 2 gloo ranks, half the "
        f"windows each). Same run, the variants interleaved {args.dp_repeats} times; medians (all runs: "
        + "; ".join(f"{label[v]}: " + ", ".join(f"{t[0]:.1f}" for t in timing[v]) + " s" for v in variants) + "):",
        "",
        "| ranks x threads | calibration s (total) | of which statistics (block forwards + float64 X^T X) | solve | "
        "all-reduce + broadcast (incl. waiting) | whole command s (start-up, load, save included) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {label[v]} | {med[v][0]:.2f} | {med[v][1]:.2f} | {med[v][2]:.2f} | {med[v][3]:.2f} | "
              f"{med[v][4]:.1f} |" for v in variants]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines += ["", f"Calibration speed-up of 2 ranks (median): {med['1'][0] / med['2'][0]:.2f}x vs the default 1-rank "
                  f"run, {med['1x1'][0] / med['2'][0]:.2f}x vs 1 rank with the same 1 thread per rank (the fair "
                  f"comparison when other jobs share the cores: 1-minute load average at the end {load:.1f} on "
                  f"{os.cpu_count()} cores). 2-rank vs 1-rank pruned weights: max |diff| = {max_diff:.2e}, identical "
                  f"masks: {same_masks}."]
    path = write_section(SECTION, "\n".join(lines))
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
