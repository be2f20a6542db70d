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
