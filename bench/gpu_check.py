"""``make gpu-check``: on a machine with CUDA, every ``gpu``-marked test and the GPU benchmark sections, in one go.

GPU time is rare and brief, so this is the one command to run when a GPU is there. It uses the torch and Triton
already installed (it installs nothing and reaches no package registry), runs, within ``--budget`` seconds
(8 minutes by default):

1. ``pytest -m gpu`` (attention and block-sparse linear Triton kernels, 2:4 semi-structured), JUnit XML and log;
2. ``bench/bench_attention.py --gpu-only`` (Triton block-sparse attention vs SDPA flash and FlexAttention);
3. ``bench/bench_block_linear.py --gpu-only`` (block-sparse MLP in Triton vs cuBLAS, 2:4 vs dense);

and writes every figure and log to ``GPU_CHECK_OUT`` (default ``runs/gpu-check``), with ``summary.md`` saying what
ran, how long it took and what failed. Without CUDA (or without Triton) it says what is missing and exits 0.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def missing() -> str | None:
    """Why the check cannot run here (None when it can)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (the GPU kernels need it)"
    return None


def run_part(name: str, cmd: list, out: Path, timeout: float) -> dict:
    start = time.time()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(1.0, timeout))
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = "timeout"
        text = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
    (out / f"{name}.log").write_text(text)
    result = {"name": name, "rc": rc, "seconds": time.time() - start, "command": " ".join(cmd)}
    print(f"{name}: rc={rc} in {result['seconds']:.0f}s", flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("GPU_CHECK_OUT", "runs/gpu-check")))
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for everything (default 8 minutes)")
    args = parser.parse_args(argv)
    why = missing()
    if why is not None:
        print(f"gpu-check: skipped, {why}; nothing to do on this machine")
        return 0
    import torch

    out = args.out if args.out.is_absolute() else ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.budget
    py = sys.executable
    # shares of the budget: the tests first (they say whether the figures mean anything), then the benchmarks
    parts = [
        ("tests", [py, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                   f"--junitxml={out / 'tests.xml'}", "tests"], 0.40),
        ("bench_attention", [py, "bench/bench_attention.py", "--gpu-only", "--out", str(out)], 0.30),
        ("bench_block_linear", [py, "bench/bench_block_linear.py", "--gpu-only", "--out", str(out)], 0.30),
    ]
    results = []
    for i, (name, cmd, share) in enumerate(parts):
        left = deadline - time.time()
        rest = sum(s for _, _, s in parts[i:])
        results.append(run_part(name, cmd, out, left * share / rest))
    lines = [f"# gpu-check ({torch.cuda.get_device_name(0)}, torch {torch.__version__})", "",
             "| part | exit | seconds | command |", "|---|---|---|---|",
             *[f"| {r['name']} | {r['rc']} | {r['seconds']:.0f} | `{r['command']}` |" for r in results], "",
             f"Logs and figures: {out} (`*.log`, `40_attention.md`, `41_block_linear.md`, `tests.xml`)."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
