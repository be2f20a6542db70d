"""Worker for tests/test_oneshot_models.py (torchrun, CPU, gloo): ``dist-sparse sparsify`` with RANK/WORLD_SIZE set by
the launcher, so the processes themselves are the ranks (no spawning).

argv: a JSON list of argument lists, one ``dist-sparse sparsify`` command each. One launch runs them in turn
through ``dist_sparse.cli.main.main`` (process start-up dominates a command): the first with no process group yet
(the command starts and ends its own over the launcher's environment), the rest inside a process group this worker
started (the command uses it as it is, as under a launcher that initialized one). Exits non-zero if any command
fails.
"""

import json
import sys

import torch.distributed as dist

from dist_sparse.cli import main as cli


def main():
    commands = json.loads(sys.argv[1])
    for i, argv in enumerate(commands):
        if i == 1:
            dist.init_process_group("gloo")
        assert dist.is_initialized() == (i > 0)
        rc = cli.main(["sparsify", *argv])
        if rc != 0:
            raise SystemExit(f"command {i} exited with {rc}: {argv}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
