"""Every collective dist_sparse uses, in one place, so each is testable on gloo with 2 ranks on a CPU.

All functions work without an initialised process group (a single process): they then return their input.
"""

import datetime
import os
import sys

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank(group=None) -> int:
    return dist.get_rank(group) if is_initialized() else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_initialized() else 1


def backend_for_device() -> str:
    """NCCL when a GPU is there (and DS_ACCELERATOR does not force the CPU), gloo otherwise."""
    if os.environ.get("DS_ACCELERATOR", "") == "cpu" or not torch.cuda.is_available():
        return "gloo"
    return "nccl"


def discover_mpi_env() -> bool:
    """Under mpirun (no RANK/WORLD_SIZE set), read rank and size from MPI via mpi4py and export the torch env vars.

    Returns True when it set the variables. MASTER_ADDR defaults to the hostname of rank 0, broadcast over MPI.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return False
    mpi_markers = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
    if not any(m in os.environ for m in mpi_markers):
        return False
    import socket

    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    master = comm.bcast(socket.gethostname() if comm.Get_rank() == 0 else None, root=0)
    os.environ["RANK"] = str(comm.Get_rank())
    os.environ["WORLD_SIZE"] = str(comm.Get_size())
    local = os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", os.environ.get("MPI_LOCALRANKID", "0"))
    os.environ["LOCAL_RANK"] = str(local)
    # ranks on this node (threads per rank, and the log line of every rank, read it)
    local_size = os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", os.environ.get("MPI_LOCALNRANKS", "1"))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(local_size))
    os.environ.setdefault("MASTER_ADDR", master)
    os.environ.setdefault("MASTER_PORT", "29500")
    return True


def timeout(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=float(seconds))


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    if world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def all_reduce_max(t: torch.Tensor, group=None) -> torch.Tensor:
    if world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


def all_reduce_sum_flat(tensors: list, group=None, bucket_elements: int = 1 << 24) -> int:
    """Sum 1-D fp32 tensors across ``group`` in place, concatenated into buckets of at most ``bucket_elements``
    (one collective per bucket instead of one per tensor). Returns the bytes handed to the collectives."""
    if world_size(group) == 1 or not tensors:
        return 0
    handed, i = 0, 0
    while i < len(tensors):
        j, n = i, 0
        while j < len(tensors) and (j == i or n + tensors[j].numel() <= bucket_elements):
            n += tensors[j].numel()
            j += 1
        bucket = torch.cat([t.reshape(-1) for t in tensors[i:j]])
        dist.all_reduce(bucket, op=dist.ReduceOp.SUM, group=group)
        handed += bucket.numel() * bucket.element_size()
        offset = 0
        for t in tensors[i:j]:
            t.copy_(bucket[offset: offset + t.numel()].view_as(t))
            offset += t.numel()
        i = j
    return handed


def subgroup(members: list):
    """The process group of this rank among ``members`` (a partition of all ranks into lists, the same on every
    rank): every rank creates every group, in the same order, as torch.distributed requires."""
    if not is_initialized():
        return None
    mine = None
    for ranks in members:
        g = dist.new_group(ranks=sorted(ranks))
        if rank() in ranks:
            mine = g
    return mine


def all_gather_equal(t: torch.Tensor, group=None) -> list:
    """All-gather tensors of identical shape; returns a list indexed by rank."""
    n = world_size(group)
    if n == 1:
        return [t]
    out = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def all_gather_flat(out: torch.Tensor, t: torch.Tensor, group=None, async_op: bool = False):
    """All-gather equal-sized 1-D tensors into the flat ``out`` (rank r's at ``[r n, (r + 1) n)``), as DeepSpeed's
    ZeRO-3 parameter gathers do; returns the work handle when ``async_op`` (else None)."""
    # torch 2.13 renamed all_gather_into_tensor (which still works, with a deprecation warning) all_gather_single
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(out, t.contiguous(), group=group, async_op=async_op)


def all_gather_varlen(t: torch.Tensor, group=None) -> list:
    """All-gather 1-D tensors whose lengths differ across ranks (padded to the longest, then trimmed)."""
    n = world_size(group)
    if n == 1:
        return [t]
    length = torch.tensor([t.numel()], dtype=torch.int64, device=t.device)
    lengths = [int(x) for x in all_gather_equal(length, group)]
    longest = max(lengths)
    if longest == 0:  # nothing anywhere: no second collective (every rank knows it from the lengths)
        return [t.reshape(-1)[:0].clone() for _ in lengths]
    padded = torch.zeros(longest, dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t.reshape(-1)
    return [x[:m] for x, m in zip(all_gather_equal(padded, group), lengths)]


def all_gather_runs(flat: torch.Tensor, runs, group=None, max_buffer: int = 1 << 26) -> int:
    """Fill every rank's run of the 1-D ``flat`` from that rank: ``runs[r] = (start, n)`` in group-rank order, the
    same list on every rank, runs disjoint; this rank's run holds its values already. Returns the number of
    collectives issued.

    The runs differ in length (packed partitions: each holds its own share of active values), which an all-gather
    does not allow, so each rank's run is padded to the longest and the padded pieces are gathered into a receive
    buffer, then copied into place. One collective whatever the world size, where one broadcast per rank costs
    ``world`` sequential collectives. The receive buffer (``world x`` the longest run) is bounded by ``max_buffer``
    elements: longer runs go in rounds of at most ``max_buffer // world`` elements per rank (``ceil(longest /
    that)`` collectives), so the exchange never holds more than that on top of ``flat``.
    """
    world = world_size(group)
    if world <= 1:
        return 0
    if len(runs) != world:
        raise ValueError(f"runs has {len(runs)} entries for a group of {world} ranks")
    me = dist.get_rank(group=group) if group is not None else dist.get_rank()
    longest = max(n for _, n in runs)
    if longest == 0:
        return 0
    step = max(1, min(longest, max_buffer // world))
    recv = torch.empty(world * step, dtype=flat.dtype, device=flat.device)
    send = torch.zeros(step, dtype=flat.dtype, device=flat.device)
    my_start, my_n = runs[me]
    calls = 0
    for at in range(0, longest, step):
        take = max(0, min(step, my_n - at))
        if take:
            send[:take].copy_(flat.narrow(0, my_start + at, take))
        if take < step:
            send[take:].zero_()  # padding: sent, never copied out
        all_gather_flat(recv, send, group=group)
        calls += 1
        for r, (start, n) in enumerate(runs):
            got = max(0, min(step, n - at))
            if r != me and got:
                flat.narrow(0, start + at, got).copy_(recv.narrow(0, r * step, got))
    return calls


def broadcast_from(t: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """Broadcast ``t`` in place from rank ``src`` of ``group`` (a group rank, translated to the global rank the
    collective wants)."""
    if world_size(group) > 1:
        root = src if group is None else dist.get_global_rank(group, src)
        dist.broadcast(t, src=root, group=group)
    return t


def barrier(group=None) -> None:
    if world_size(group) > 1:
        dist.barrier(group=group)


def shutdown() -> None:
    """Leave the process group cleanly at the end of a run: a barrier (no rank exits while a peer still talks to
    it), then destroy the group so its communication threads are joined before interpreter exit; an abrupt exit
    can abort a rank with "terminate called without an active exception". Not for error paths (peers may be
    gone)."""
    if is_initialized():
        barrier()
        dist.destroy_process_group()


def exit_rank(code: int) -> None:
    """End a launched rank without interpreter teardown. Call it once every output is committed (atomic writes, a
    barrier) and the process group is destroyed (:func:`shutdown`). C++ destructors of communication threads still
    run at teardown, and on a loaded CPU machine they occasionally abort a rank that has finished ("terminate
    called without an active exception", exit -6: seen in test runs on loaded 2-core machines, and once in CI
    after a worker had written its report), which fails the whole job. ``os._exit`` skips them after flushing what
    Python still buffers."""
    import logging

    # under mpirun, mpi4py's MPI_Finalize runs at interpreter exit, which os._exit skips; without it mpirun reports
    # the finished rank as "exiting improperly" and fails the job
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def all_gather_object(obj, group=None) -> list:
    n = world_size(group)
    if n == 1:
        return [obj]
    out = [None] * n
    dist.all_gather_object(out, obj, group=group)
    return out
