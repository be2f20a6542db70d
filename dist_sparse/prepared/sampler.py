"""Which training windows a (step, rank, micro-batch) reads: ``data.sampling: random | epoch``.

``random`` is the text loader's rule: ``batch_size`` window starts drawn from a generator seeded by (seed, step,
rank, micro-batch), anywhere in the split.

``epoch``: the training tokens are cut into ``W = tokens // block_size`` non-overlapping windows. The run consumes
windows in one global sequence: the g-th window is ``perm_e(g mod W)`` with ``e = g // W`` (the epoch) and
``perm_e`` a seeded bijection of ``[0, W)`` computed from the index alone (a Feistel network over the next even
power of two with cycle walking), so nothing that grows with the corpus is stored and every epoch has its own
order. An optimizer step consumes the next ``G = world x micro-batch x accumulation`` positions; element ``b`` of
micro-batch ``m`` on rank ``r`` takes position ``P + (m * world + r) * micro + b``. The sequence does not depend on
the world size: on another world size with the same G each step reads the same windows (rank r's batch on 2 ranks is
micro-batch r on 1 rank with 2 accumulation steps); with another G it continues from the same position. ``P`` is
in every checkpoint (``trainer.json``'s ``data``).
"""

import json
import os
from pathlib import Path

import numpy as np
import torch

_M32 = np.uint64(0xFFFFFFFF)


def _mix32(x: np.ndarray) -> np.ndarray:
    """The lowbias32 integer hash on uint64 arrays holding 32-bit values."""
    x = x & _M32
    x = ((x >> np.uint64(16)) ^ x) * np.uint64(0x7FEB352D) & _M32
    x = ((x >> np.uint64(15)) ^ x) * np.uint64(0x846CA68B) & _M32
    return (x >> np.uint64(16)) ^ x


def _key(seed: int, epoch: int, round_: int) -> np.uint64:
    k = _mix32(np.array([(seed * 0x9E3779B1 + 0x632BE5AB) & 0xFFFFFFFF], dtype=np.uint64))
    k = _mix32(k ^ np.uint64(epoch & 0xFFFFFFFF))
    k = _mix32(k ^ np.uint64((epoch >> 32) & 0xFFFFFFFF) ^ np.uint64(round_ * 0x27D4EB2F & 0xFFFFFFFF))
    return k[0]


def permute(j, n: int, seed: int, epoch: int, rounds: int = 6) -> np.ndarray:
    """``perm(j)`` for a seeded bijection ``perm`` of ``[0, n)`` (one per epoch); ``j`` an int array."""
    j = np.asarray(j, dtype=np.uint64)
    if n < 1:
        raise ValueError("permute: n must be >= 1")
    if n == 1:
        return np.zeros_like(j, dtype=np.int64)
    half = max(1, (int(n - 1).bit_length() + 1) // 2)  # domain 2^(2*half) >= n, at most 4n
    mask = np.uint64((1 << half) - 1)
    keys = [_key(seed, epoch, r) for r in range(rounds)]

    def feistel(x):
        left, right = x >> np.uint64(half), x & mask
        for k in keys:
            left, right = right, left ^ (_mix32(right ^ k) & mask)
        return (left << np.uint64(half)) | right

    out = feistel(j)
    bad = out >= np.uint64(n)
    while bad.any():  # cycle walking: a bijection of the domain restricted to [0, n) stays a bijection
        out[bad] = feistel(out[bad])
        bad = out >= np.uint64(n)
    return out.astype(np.int64)


def epoch_windows(positions, n_windows: int, seed: int) -> np.ndarray:
    """Window ids at global positions ``positions`` of the epoch sequence."""
    positions = np.asarray(positions, dtype=np.int64)
    out = np.empty_like(positions)
    epochs = positions // n_windows
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = permute(positions[sel] % n_windows, n_windows, seed, int(e))
    return out


def step_positions(base: int, rank: int, micro: int, world: int, micro_batch: int) -> np.ndarray:
    """Global positions read by (rank, micro-batch) of the step that starts at position ``base``."""
    first = base + (micro * world + rank) * micro_batch
    return np.arange(first, first + micro_batch, dtype=np.int64)


def random_starts(seed: int, split: str, step: int, rank: int, micro: int, batch_size: int, n_tokens: int,
                  block_size: int) -> torch.Tensor:
    """The text loader's random window starts (a pure function of its arguments)."""
    # an explicit mix, not hash(): Python salts str hashes per process
    key = ((((seed * 1_000_003 + (split == "val")) * 1_000_033 + step) * 10_007 + rank) * 1_009 + micro)
    g = torch.Generator().manual_seed(key % (2**63 - 1))
    return torch.randint(0, n_tokens - block_size, (batch_size,), generator=g)


class WindowSampler:
    """Training batches for the loop, and the data position that goes into checkpoints and summary.json.

    ``data`` is a :class:`dist_sparse.data.TextData` or :class:`dist_sparse.prepared.PreparedData`: anything with
    ``train_tokens()`` (a length) and ``read_train(start, length)`` (int64 numpy) and ``batch(...)``."""

    def __init__(self, data, sampling: str, block_size: int, seed: int, world: int, micro_batch: int, accum: int):
        self.data, self.sampling, self.block_size, self.seed = data, sampling, block_size, seed
        self.world, self.micro_batch, self.accum = world, micro_batch, accum
        self.global_batch = world * micro_batch * accum
        self.n_tokens = int(data.train_tokens())
        self.n_windows = self.n_tokens // block_size
        self.base_step, self.base_position, self.base_tokens = 0, 0, 0
        trace = os.environ.get("DIST_SPARSE_DATA_TRACE")  # a directory: tests record which windows each rank read
        self.trace = Path(trace) if trace else None

    # -- position ------------------------------------------------------------------------------------------------

    def position(self, step: int) -> int:
        """Windows consumed before ``step`` (the epoch sequence's next position)."""
        return self.base_position + (step - self.base_step) * self.global_batch

    def tokens_seen(self, step: int) -> int:
        return self.base_tokens + (step - self.base_step) * self.global_batch * self.block_size

    def epochs(self, step: int) -> float:
        """Passes over the training tokens so far (windows / W for epoch sampling, tokens / train tokens else)."""
        if self.sampling == "epoch":
            return self.position(step) / self.n_windows
        return self.tokens_seen(step) / self.n_tokens

    def state_dict(self, step: int) -> dict:
        return {"sampling": self.sampling, "step": step, "position": self.position(step),
                "tokens_seen": self.tokens_seen(step), "block_size": self.block_size,
                "global_batch": self.global_batch, "windows_per_epoch": self.n_windows}

    def load_state_dict(self, state: dict | None, step: int) -> None:
        """Continue from a checkpoint at ``step``. Without a saved position (older checkpoints) the position is
        the one a constant global batch reaches; another block size continues from the same token position."""
        self.base_step = step
        if not state:
            self.base_position = step * self.global_batch
            self.base_tokens = self.base_position * self.block_size
            return
        self.base_tokens = int(state["tokens_seen"])
        if int(state.get("block_size", self.block_size)) == self.block_size:
            self.base_position = int(state["position"])
        else:
            self.base_position = self.base_tokens // self.block_size

    # -- batches -------------------------------------------------------------------------------------------------

    def starts(self, step: int, rank: int, micro: int) -> np.ndarray:
        if self.sampling == "epoch":
            pos = step_positions(self.position(step), rank, micro, self.world, self.micro_batch)
            return epoch_windows(pos, self.n_windows, self.seed) * self.block_size
        return random_starts(self.seed, "train", step, rank, micro, self.micro_batch, self.n_tokens,
                             self.block_size).numpy()

    def batch(self, step: int, rank: int, micro: int) -> torch.Tensor:
        starts = self.starts(step, rank, micro)
        if self.trace is not None:
            self.trace.mkdir(parents=True, exist_ok=True)
            with open(self.trace / f"rank_{rank:05d}.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "rank": rank, "micro": micro, "starts": starts.tolist()}) + "\n")
        rows = [self.data.read_train(int(s), self.block_size) for s in starts]
        return torch.from_numpy(np.stack(rows))
