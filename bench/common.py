"""Shared helpers for benchmark scripts: machine description and result sections.

Each benchmark script writes one Markdown section to ``bench/results/<NN>_<name>.md``; ``bench/report.py``
concatenates the sections (sorted by file name) into ``docs/benchmarks.md``. A section must say the exact command
that produced its figures and the machine it ran on (use :func:`machine_line`).
"""

import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def machine_line() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    try:
        import psutil

        mem = f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        mem = "RAM unknown"
    cpu = platform.processor() or platform.machine()
    model = cpu_model()
    return (f"{os.cpu_count()} CPU cores ({cpu}{', ' + model if model else ''}), {mem}, {gpu}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, {platform.system()} {platform.release()}")


def cpu_model() -> str:
    """The CPU's model name and its widest vector units (AVX-512, AMX), from /proc/cpuinfo: the same benchmark's
    ratios differ between machines with and without them (dense matmuls gain more from wider units)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    units = [u for u, flag in (("AVX-512", "avx512f"), ("AMX", "amx_tile")) if flag in flags]
    if not units and "avx2" in flags:
        units = ["AVX2"]
    return ", ".join(x for x in (name, " + ".join(units)) if x)


def allocator_line() -> str:
    """Applies the CPU allocator setting the CPU kernels apply at their first call, before the benchmark's first run
    (so dense and sparse runs in one process share it), and says what it is."""
    from dist_sparse.cpu_memory import ENV_VAR, keep_freed_memory

    if keep_freed_memory():
        return (f"CPU allocator: freed memory kept in the heap (`dist_sparse.cpu_memory`, what the CPU kernels apply "
                f"at their first call; `{ENV_VAR}=default` turns it off), for dense and sparse runs alike")
    return "CPU allocator: the C library's defaults (freed large blocks go back to the kernel)"


def command_line() -> str:
    """The command that is running now, as a user would type it from the repository root."""
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def reused_line(reused: list, same: str = "config") -> str:
    """The section line that says which rows a resumable benchmark reused instead of running them again."""
    if not reused:
        return "Every row was run by this command."
    return f"Reused finished runs (same {same}): " + ", ".join(f"`{k}`" for k in reused) + "."


def write_section(name: str, markdown: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(markdown.rstrip() + "\n")
    os.replace(tmp, path)
    return path


def skipped_without_shakespeare(name: str, title: str) -> bool:
    """When tinyshakespeare is absent, write a section saying so and return True (the bench then stops)."""
    if SHAKESPEARE.is_file():
        return False
    write_section(name, f"## {title}\n\nSkipped: `{SHAKESPEARE}` is absent on this machine.")
    print("tinyshakespeare absent: skipped")
    return True


def gpu_unavailable(head: str, kernels) -> str | None:
    """The GPU section's text when it cannot run (no CUDA, or no Triton for ``kernels``), else None: a section
    without a GPU says so instead of giving numbers (none are ever estimated)."""
    import torch

    if not torch.cuda.is_available():
        return f"{head}\n\nNo GPU was available in this session: no GPU figures were measured (none are estimated)."
    if not kernels.HAS_TRITON:
        return f"{head}\n\nTriton is not installed: the GPU kernels could not run."
    return None


def interleaved(fns: dict, rounds: int, reps: int, sync=None, warmup: int = 1, clock=time.perf_counter) -> dict:
    """Median seconds of each callable; they alternate run by run (after ``warmup`` runs each), so a change in the
    machine's load hits all of them alike. ``sync`` (e.g. ``torch.cuda.synchronize``) brackets every run;
    ``clock=time.process_time`` measures this process's CPU time instead of wall-clock time."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds * reps):
        for name, fn in fns.items():
            if sync:
                sync()
            start = clock()
            fn()
            if sync:
                sync()
            times[name].append(clock() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}
