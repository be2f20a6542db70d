"""Keep freed memory in the process heap on CPU, so that a training step's large tensors do not page-fault in anew.

glibc returns a freed block to the kernel when it was ``mmap``-ed (every allocation above its dynamic threshold,
at most 32 MiB) or when the free space at the top of the heap passes the trim threshold. PyTorch on CPU has no
caching allocator, so every step's activations and gradients then come back as fresh pages: one page fault per
4 KiB plus the kernel zeroing it, measured at ~8k faults per 32 MiB tensor and a sixth of the block-sparse MLP's
fwd+bwd time (2048 tokens x 4096 features is exactly 32 MiB in fp32, just above glibc's largest threshold), ~10k
faults per attention fwd+bwd. The step's dense matmuls pay the same fixed cost, which is why a sparse step, whose
matmuls shrink, loses more of its speed-up to it.

:func:`keep_freed_memory` raises both thresholds (``mallopt``), the job a CUDA caching allocator or an
``LD_PRELOAD`` of jemalloc/tcmalloc does elsewhere: a step's tensors are then served from memory the previous step
freed. The price is resident memory: it stays at its peak instead of shrinking between steps, and the peak grows a
little (PyTorch's 64-byte-aligned allocations leave freed blocks that a same-sized request does not fit until a few
steps have coalesced them: measured +11%, 641 -> 710 MB, on the benchmark MLP, stable after that), which is why it
is tied to the runs that choose speed. ``DIST_SPARSE_CPU_MALLOC`` decides:

* ``auto`` (unset): applied on the first call of a CPU kernel (block-sparse linear or attention);
* ``keep``: also at the start of every CPU training run, dense ones included (the training-step benchmark sets it
  for both of its runs, so the dense baseline gets the same allocator);
* ``default``: never; glibc's defaults stay.

Other C libraries (musl, macOS) are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading

__all__ = ["ENV_VAR", "keep_freed_memory"]

ENV_VAR = "DIST_SPARSE_CPU_MALLOC"
_VALUES = ("auto", "keep", "default")
# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap, not from mmap
_TRIM_THRESHOLD = (1 << 31) - 1  # the heap's top is (nearly) never handed back

_state: dict = {"done": False, "applied": False}
_lock = threading.Lock()
log = logging.getLogger(__name__)


def keep_freed_memory(training: bool = False) -> bool:
    """Raise glibc's mmap and trim thresholds, once per process, where ``DIST_SPARSE_CPU_MALLOC`` asks for it:
    ``training=False`` (a CPU kernel's call) under ``auto`` or ``keep``, ``training=True`` (a CPU training run's
    start) under ``keep`` only. Returns True when the thresholds are raised (now or before).

    Raises ``ValueError`` naming ``DIST_SPARSE_CPU_MALLOC`` for a value other than ``auto``, ``keep`` or
    ``default``."""
    if _state["done"]:  # the kernels call this on every call: no lock once settled
        return _state["applied"]
    with _lock:
        if _state["done"]:  # a forked child inherits the settings with the heap
            return _state["applied"]
        choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if choice not in _VALUES:
            raise ValueError(f"{ENV_VAR} must be one of {', '.join(_VALUES)}, got {choice!r}")
        if choice == "default":
            _state.update(done=True, applied=False)
            return False
        if training and choice == "auto":
            return False  # a kernel's first call may still apply it
        applied = _mallopt()
        if applied:
            log.info("CPU allocator: freed memory is kept in the heap (glibc mmap threshold 1 GiB, no trim; "
                     "%s=default keeps glibc's defaults)", ENV_VAR)
        _state.update(done=True, applied=applied)
        return applied


def _mallopt() -> bool:
    if os.name != "posix":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt; macOS's libc has none either)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
