"""The only module that imports deepspeed: the version check, the import, and the process group.

Everything else in :mod:`dist_sparse.integration` works on DeepSpeed's objects (the engine, its ZeRO optimizer)
without importing the package: :mod:`views` reads where a rank's partition lives, :mod:`engine` runs the step's
components, :mod:`patches` installs (and records) every replacement of a DeepSpeed method.
"""

import os

import torch

from dist_sparse import distributed as D
from dist_sparse.integration.patches import check_deepspeed_version, replace


def import_deepspeed():
    """``import deepspeed`` for this device, after checking that it is a release the patches were tested against
    (``DIST_SPARSE_ALLOW_UNTESTED_DEEPSPEED=1`` turns the refusal into a warning)."""
    check_deepspeed_version()
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    import deepspeed

    _answer_zero_support_from_the_list()
    return deepspeed


def _answer_zero_support_from_the_list() -> None:
    """DeepSpeed's ZeRO optimizer check (``is_zero_supported_optimizer``, run at every engine start) first imports
    its Muon optimizer to append it to ``ZERO_SUPPORTED_OPTIMIZERS``; that import decorates Muon's kernels with
    ``torch.compile``, about 2 CPU-seconds per process, although no dist_sparse run uses Muon. An optimizer already
    on the list is supported whatever Muon adds, so the engine's check answers from the list first and falls back
    to DeepSpeed's own function (which still imports Muon) for any other optimizer: the same answer for every
    optimizer, without the import where it cannot change it. Installed once per process, recorded like the
    instance patches (:mod:`~dist_sparse.integration.patches`)."""
    from deepspeed.runtime import engine as ds_engine
    from deepspeed.runtime.zero import utils as zero_utils

    original = ds_engine.is_zero_supported_optimizer
    if getattr(original, "_dist_sparse_listed_first", False):
        return

    def is_zero_supported_optimizer(optimizer):
        return type(optimizer) in zero_utils.ZERO_SUPPORTED_OPTIMIZERS or original(optimizer)

    is_zero_supported_optimizer._dist_sparse_listed_first = True
    replace(ds_engine, "is_zero_supported_optimizer", is_zero_supported_optimizer,
            by="a listed optimizer is ZeRO-supported without importing DeepSpeed's Muon (torch.compile at import)")


def init_distributed(timeout_s: float = 600.0) -> None:
    """Start the process group the way DeepSpeed does (env vars, or MPI discovery), gloo on CPU, NCCL on GPU."""
    deepspeed = import_deepspeed()
    if D.is_initialized():
        return
    D.discover_mpi_env()
    if "RANK" not in os.environ:  # a single process without a launcher
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    # The rendezvous store outlives a torchrun restart; without a per-attempt key prefix a restarted rank reads
    # the dead attempt's addresses and gloo's connect fails ("Connection refused").
    import torch.distributed as dist

    backend = D.backend_for_device()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # DeepSpeed creates its data-parallel groups with new_group() and no timeout, which falls back to torch's
    # module default (30 min): set that default too, so a hung peer fails every collective within timeout_s.
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = D.timeout(timeout_s)
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = D.timeout(timeout_s)
    store, rank, world = next(dist.rendezvous("env://", timeout=D.timeout(timeout_s)))
    store = dist.PrefixStore(f"dist_sparse/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world,
                            timeout=D.timeout(timeout_s))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=D.timeout(timeout_s))

