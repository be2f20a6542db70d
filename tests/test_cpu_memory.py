"""The CPU allocator setting: freed memory is kept in the heap, so a step's large tensors do not fault in anew."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import dist_sparse.cpu_memory as cpu_memory

ROOT = Path(__file__).resolve().parents[1]

_FAULTS = """
import resource, sys, torch
import dist_sparse.cpu_memory as m
if sys.argv[1] == "keep":
    assert m.keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
n = 32 * 2**18  # 32 MiB of fp32: above glibc's largest dynamic mmap threshold
# with the setting, the first few allocations still grow the heap: PyTorch's 64-byte-aligned requests do not fit
# the block just freed until neighbouring free blocks have coalesced (measured: settled after 8-10)
for _ in range(16):
    torch.ones(n)
before = faults()
for _ in range(5):
    torch.ones(n)
print((faults() - before) / 5)
"""


def _faults_per_alloc(mode: str) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], env=env, capture_output=True, text=True, timeout=120,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_keep_freed_memory_stops_page_faults_of_repeated_large_tensors():
    default = _faults_per_alloc("default")
    kept = _faults_per_alloc("keep")
    assert default > 4000  # each 32 MiB tensor faults its ~8k pages in anew under glibc's defaults
    assert kept < default / 20, (kept, default)


def test_keep_freed_memory_values(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_memory, "_mallopt", lambda: calls.append(1) or True)
    monkeypatch.setattr(cpu_memory, "_state", {"done": False, "applied": False})
    monkeypatch.setenv(cpu_memory.ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match="DIST_SPARSE_CPU_MALLOC"):
        cpu_memory.keep_freed_memory()
    # auto (unset): a training run's start leaves it to the kernels, whose first call applies it, once
    monkeypatch.delenv(cpu_memory.ENV_VAR)
    assert cpu_memory.keep_freed_memory(training=True) is False and not calls
    assert cpu_memory.keep_freed_memory() is True and cpu_memory.keep_freed_memory() is True and calls == [1]
    # keep: the training run's start applies it
    monkeypatch.setattr(cpu_memory, "_state", {"done": False, "applied": False})
    monkeypatch.setenv(cpu_memory.ENV_VAR, "keep")
    assert cpu_memory.keep_freed_memory(training=True) is True and calls == [1, 1]
    # default: never, not even from a kernel
    monkeypatch.setattr(cpu_memory, "_state", {"done": False, "applied": False})
    monkeypatch.setenv(cpu_memory.ENV_VAR, "default")
    assert cpu_memory.keep_freed_memory() is False and calls == [1, 1]
