"""Run a function on N gloo ranks (CPU) in spawned processes, or a worker script under torchrun."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_spawned(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; an exception on any rank fails the call."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)


def run_torchrun(script: str, nproc: int, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``tests/workers/<script>`` under torchrun with ``nproc`` CPU ranks; raises with the output on failure."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    # --standalone: torchrun binds a free port itself (no race with other processes picking ports)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "tests" / "workers" / script), *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc


def run_group(cmd, env, timeout) -> subprocess.CompletedProcess:
    """Run in a new session and kill the whole process group on timeout (no orphaned ranks survive a test)."""
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"timed out after {timeout}s:\n{out[-2000:]}\n{err[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def dist_sparse_train(out, overrides, nproc=None, resume=None, fault=None, max_restarts=None, expect_ok=True,
                      timeout=600) -> subprocess.CompletedProcess:
    """`dist-sparse train configs/demo.yaml --set ...` as a user would run it (CPU; no launcher variables leak in)."""
    cmd = [sys.executable, "-m", "dist_sparse.cli.main", "train", str(ROOT / "configs" / "demo.yaml")]
    for o in (*overrides, f"train.output_dir={out}"):
        cmd += ["--set", o]
    if nproc:
        cmd += ["--nproc", str(nproc)]
    if resume:
        cmd += ["--resume", str(resume)]
    if max_restarts is not None:
        cmd += ["--max-restarts", str(max_restarts)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DIST_SPARSE_FAULT")}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    if fault:
        env["DIST_SPARSE_FAULT"] = fault
    proc = run_group(cmd, env, timeout)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc
