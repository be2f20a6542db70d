"""Metrics: JSONL every N steps, TensorBoard scalars, a progress bar, memory. Only rank 0 writes."""

import json
import os
import resource
import statistics
from pathlib import Path

import torch

from dist_sparse import distributed as D


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_anon_mb() -> float:
    """This process's anonymous resident memory (``RssAnon``: heap and the like, not file-backed pages such as
    memory-mapped token shards, which the kernel can drop); NaN where /proc is not available."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def max_over_ranks(value: float) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64)
    return float(D.all_reduce_max(t)[0])


class MetricsLogger:
    def __init__(self, output_dir, tensorboard: bool, enabled: bool):
        self.enabled = enabled
        self.dir = Path(output_dir)
        self.jsonl = None
        self.tb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.dir / "metrics.jsonl"
        self.jsonl = open(self.jsonl_path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"))
            except ImportError:  # tensorboard is optional at run time
                self.tb = None

    def log(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **record}) + "\n")
        if self.tb is not None:
            for key, value in _flatten(record):
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def _flatten(record: dict, prefix: str = ""):
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, name + "/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield name, float(value)


class StepTimer:
    """Wall time of each optimizer step; the median ignores warm-up outliers better than the mean."""

    def __init__(self, skip_first: int = 3):
        self.times = []
        self.skip_first = skip_first

    def add(self, seconds: float) -> None:
        self.times.append(seconds)

    def median(self) -> float:
        t = self.times[self.skip_first:] or self.times
        return statistics.median(t) if t else float("nan")


def write_json_atomic(path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
