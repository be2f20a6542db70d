"""Stopping a run safely before it is killed: on SIGTERM or SIGUSR1 (what Slurm sends before a time limit or a
preemption, e.g. ``sbatch --signal=USR1@120``), or when ``train.time_limit`` is about to run out, every rank agrees
at the next step boundary, writes a committed checkpoint, and the job exits with :data:`EXIT_STOPPED`.

Agreement is one all-reduce (max) of a small code per step: a signal reaches one process (or some), and a
checkpoint is a collective, so all ranks must decide at the same step. The time limit counts from the start of the
launching ``dist-sparse train`` (``DIST_SPARSE_START_TIME``, set by our launchers and inherited by restarted
workers) or else from this process's start, and the stop begins when the time left is less than the last
checkpoint save's duration plus two steps (the longest step seen so far).

Exit codes: a rank that no torchrun started exits with :data:`EXIT_STOPPED`. Under torchrun the workers exit 0,
because torchrun's ``--max-restarts`` restarts any failed worker group and a stop must not be restarted; the stop
is recorded in ``<output_dir>/stop.json`` (with the launch ids of every rank), and ``dist-sparse train``'s own
launchers turn a recorded stop of their launch into :data:`EXIT_STOPPED`.
"""

import json
import logging
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

from dist_sparse.errors import ConfigError

log = logging.getLogger("dist_sparse")

# EX_TEMPFAIL of sysexits.h ("temporary failure; the user is invited to retry"): a requeue, not a crash
EXIT_STOPPED = 75
STOP_RECORD = "stop.json"
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")
_REASONS = {0: None, 1: "signal", 2: "time_limit"}

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([dhms])")
_UNIT = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(value, key: str = "train.time_limit") -> float:
    """``3h50m``, ``90m``, ``1d2h``, ``45s``, ``2.5h`` or a number of seconds -> seconds. Anything else is a
    ConfigError naming ``key``."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a duration like '3h50m', got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        else:
            pos, seconds = 0, 0.0
            for m in _DURATION.finditer(text):
                if m.start() != pos:
                    break
                seconds += float(m.group(1)) * _UNIT[m.group(2)]
                pos = m.end()
            if pos != len(text) or not text:
                raise ConfigError(key, f"expected a duration like '3h50m', '90m' or '45s', got {value!r}")
    else:
        raise ConfigError(key, f"expected a duration like '3h50m', got {type(value).__name__}")
    if not seconds > 0:
        raise ConfigError(key, f"must be > 0, got {value!r}")
    return seconds


def start_time() -> float:
    """Epoch seconds the time limit counts from (see the module docstring)."""
    if os.environ.get("DIST_SPARSE_START_TIME"):
        return float(os.environ["DIST_SPARSE_START_TIME"])
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # psutil missing or /proc unreadable: the import of this module is close enough
        return _IMPORTED


_IMPORTED = time.time()


def time_to_stop(time_left: float, last_save_seconds: float, longest_step_seconds: float) -> bool:
    """The time-limit rule: stop once what is left would not fit two more steps and one more save."""
    return time_left < last_save_seconds + 2.0 * longest_step_seconds


class Stopper:
    """Installs the signal handlers on construction; ``agree`` is the per-step collective.

    A rank that got a stop signal but does not reach a step boundary within ``grace_s`` (at least three of the
    longest step) exits with 128 + the signal: torchrun also sends SIGTERM to tear down a worker group when a peer
    failed, and a rank hung outside a collective must still go. The signal is seen by a watcher thread through
    Python's wakeup fd, so this works while the main thread is blocked inside a collective (where Python-level
    handlers do not run until it returns)."""

    def __init__(self, time_limit=None, device=None, signals=STOP_SIGNALS, grace_s: float = 600.0):
        self.limit = parse_duration(time_limit) if time_limit is not None else None
        self.start = start_time()
        self.device = device
        self.received = None  # name of the first stop signal this process got
        self.last_save_seconds = 0.0
        self.longest_step = 0.0
        self.grace_s = float(grace_s)
        self._at_boundary = threading.Event()
        self._lock = threading.Lock()  # the watcher thread and the Python-level handler may both see a signal
        self._previous = {}
        for name in signals:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._on_signal)
        self._wakeup = None
        if threading.current_thread() is threading.main_thread():
            r, w = os.pipe()
            os.set_blocking(w, False)
            self._wakeup = (r, w, signal.set_wakeup_fd(w, warn_on_full_buffer=False))
            threading.Thread(target=self._watch, args=(r, {getattr(signal, n) for n in signals}), daemon=True,
                             name="dist_sparse-stop-watch").start()

    def _on_signal(self, signum, frame) -> None:
        self._note(signum)

    def _note(self, signum: int) -> None:
        name = signal.Signals(signum).name
        with self._lock:
            first = self.received is None
            if first:
                self.received = name
        if first:
            # no logging here: it takes a lock the interrupted code may hold
            os.write(2, f"[dist_sparse] rank {os.environ.get('RANK', '0')} got {name}: stopping at the next step "
                        "boundary with a checkpoint\n".encode())
            threading.Thread(target=self._deadline, args=(signum,), daemon=True).start()

    def _watch(self, fd: int, wanted: set) -> None:
        while True:
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in wanted:
                    self._note(signum)

    def _deadline(self, signum: int) -> None:
        grace = max(self.grace_s, 3.0 * self.longest_step)
        if self._at_boundary.wait(grace):
            return
        os.write(2, f"[dist_sparse] rank {os.environ.get('RANK', '0')}: no step boundary within {grace:g}s of "
                    f"{signal.Signals(signum).name} (a peer hung or died?): exiting without a checkpoint\n".encode())
        os._exit(128 + signum)

    def finishing(self) -> None:
        """The last step is done: the run's final evaluation and save follow either way, so a signal from now on
        arms no deadline (they may take longer than the grace period)."""
        self._at_boundary.set()

    def restore_handlers(self) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        if self._wakeup is not None:
            r, w, old_fd = self._wakeup
            signal.set_wakeup_fd(old_fd)
            os.close(w)  # ends the watcher thread
            self._wakeup = None

    def saved(self, seconds: float) -> None:
        self.last_save_seconds = float(seconds)

    def local_code(self, now: float | None = None) -> int:
        if self.received is not None:
            return 1
        if self.limit is not None:
            left = self.limit - ((time.time() if now is None else now) - self.start)
            if time_to_stop(left, self.last_save_seconds, self.longest_step):
                return 2
        return 0

    def agree(self, step_seconds: float) -> str | None:
        """Called by every rank after every step: the reason all ranks stop now (``signal`` / ``time_limit``), or
        None. A collective (all-reduce max of each rank's code), so every rank returns the same."""
        import torch

        from dist_sparse import distributed as D

        self.longest_step = max(self.longest_step, float(step_seconds))
        code = torch.tensor([self.local_code()], dtype=torch.int64, device=self.device)
        D.all_reduce_max(code)
        reason = _REASONS[int(code.item())]
        if reason is not None:
            self._at_boundary.set()  # the stop is agreed: the checkpoint's collectives have their own timeout
        return reason

    def describe(self) -> dict:
        """This rank's part of the stop record (gathered from every rank)."""
        return {"rank": int(os.environ.get("RANK", "0")), "host": socket.gethostname(), "signal": self.received,
                "launch_id": os.environ.get("DIST_SPARSE_LAUNCH_ID")}


def write_record(out_dir, reason: str, step: int, checkpoint_dir, ranks: list, time_limit=None) -> dict:
    """Rank 0 writes ``stop.json`` (atomically) after the checkpoint is committed."""
    from dist_sparse.metrics import write_json_atomic

    signals = [f"{r['signal']} on rank {r['rank']} ({r['host']})" for r in ranks if r["signal"]]
    record = {"reason": reason, "step": step, "checkpoint": str(checkpoint_dir), "exit_code": EXIT_STOPPED,
              "signals": signals, "time_limit": time_limit,
              "launch_ids": sorted({r["launch_id"] for r in ranks if r["launch_id"]}),
              "resume": "dist-sparse train CONFIG --resume auto"}
    write_json_atomic(Path(out_dir) / STOP_RECORD, record)
    return record


def recorded_stop(out_dir, launch_id: str) -> dict | None:
    """The stop record of the launch ``launch_id``, if the ranks of that launch wrote one."""
    try:
        record = json.loads((Path(out_dir) / STOP_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if launch_id in record.get("launch_ids", []) else None


def rank_exit_code(stopped: bool) -> int:
    """What a rank returns after a stop: EXIT_STOPPED, or 0 under torchrun (see the module docstring)."""
    if not stopped:
        return 0
    return 0 if "TORCHELASTIC_RUN_ID" in os.environ else EXIT_STOPPED
