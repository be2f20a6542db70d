"""Worker for tests/test_compact_state.py (torchrun, CPU, gloo): ``dist-sparse train`` in fp16 on CPU.

DeepSpeed's CPU accelerator declines fp16 on this machine's CPU (:func:`tests.workers.allow_cpu_fp16`), so the test
cannot go through the CLI's launcher; this worker lifts that check and then calls the trainer the CLI calls
(``dist_sparse.trainer.train``) with ``configs/demo.yaml`` and ``--set``-style overrides. argv: the overrides, then
optionally ``--resume PATH``.
"""

import sys

from dist_sparse import config
from dist_sparse.distributed import exit_rank
from dist_sparse.trainer import train
from tests.distributed_utils import ROOT
from tests.workers import allow_cpu_fp16


def main():
    args = sys.argv[1:]
    resume = None
    if "--resume" in args:
        i = args.index("--resume")
        resume = args[i + 1]
        del args[i: i + 2]
    allow_cpu_fp16()
    train(config.load(ROOT / "configs" / "demo.yaml", args), resume=resume)  # leaves the process group itself
    # then end as a launched rank does, without interpreter teardown (its C++ destructors occasionally abort a
    # finished rank on a loaded machine)
    exit_rank(0)


if __name__ == "__main__":
    main()
