"""Fault injection for the reliability tests (docs/reliability.md): ``DIST_SPARSE_FAULT=kind@step[:rank],...``.

Kinds: ``kill`` (SIGKILL this rank before the step), ``hang`` (stop responding before the step), ``nan`` (make
this rank's loss NaN at the step), ``save_before_commit`` (SIGKILL rank 0 after every shard of the checkpoint at
that step is written, before the manifest and commit marker), ``enospc`` (this rank's shard of the checkpoint at
that step fails part-way with "no space left on device"), ``sigterm`` / ``sigusr1`` (this rank sends itself that
signal before the step: a preemption notice reaching one rank). Under torchrun a fault fires only in the first
attempt (TORCHELASTIC_RESTART_COUNT=0), so a restarted run can finish. Unset, this module does nothing.
"""

import os
import signal
import time


class Faults:
    def __init__(self, spec: str | None, rank: int):
        self.rank = rank
        self.plan = []
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        for item in (spec or "").split(","):
            item = item.strip()
            if not item or not first_attempt:
                continue
            kind, _, rest = item.partition("@")
            step, _, who = rest.partition(":")
            self.plan.append((kind, int(step), int(who) if who else 0))

    @classmethod
    def from_env(cls, rank: int) -> "Faults":
        return cls(os.environ.get("DIST_SPARSE_FAULT"), rank)

    def active(self, kind: str, step: int) -> bool:
        return any(k == kind and s == step and r == self.rank for k, s, r in self.plan)

    def maybe(self, kind: str, step: int) -> None:
        """Act out ``kill``, ``hang``, ``save_before_commit``, ``sigterm`` or ``sigusr1`` if planned for this step
        and rank."""
        if not self.active(kind, step):
            return
        if kind in ("kill", "save_before_commit"):
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "hang":
            while True:
                time.sleep(3600)
        if kind in ("sigterm", "sigusr1"):
            os.kill(os.getpid(), signal.SIGTERM if kind == "sigterm" else signal.SIGUSR1)
