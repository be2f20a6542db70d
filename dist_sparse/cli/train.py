"""`dist-sparse train CONFIG [--set key=value ...] [--nproc N] [--launcher torchrun|deepspeed]`.

The config is loaded and validated here, before any rank starts, so a bad key fails fast with its key path.
With ``--nproc N`` this command starts N local ranks itself (torchrun by default, or the deepspeed launcher) and
each rank runs this same command under the launcher; under an existing launcher (RANK/WORLD_SIZE set, or mpirun
with mpi4py discovery) it trains directly.
"""

import argparse
import json
import os
import socket
import subprocess
import sys

from dist_sparse import config as config_mod
from dist_sparse.errors import DistSparseError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-sparse train", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="YAML or JSON config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set sparsity.method=rigl (repeatable)")
    p.add_argument("--nproc", type=int, default=None, help="start N local ranks")
    p.add_argument("--resume", default=None, metavar="DIR|auto",
                   help="continue from a committed checkpoint directory, or the newest one under "
                        "<train.output_dir>/checkpoints (auto); a missing or uncommitted target is an error")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="with --nproc (torchrun): restart all ranks this many times after a failure; a restart "
                        "resumes from the newest committed checkpoint")
    p.add_argument("--launcher", choices=("torchrun", "deepspeed"), default="torchrun",
                   help="launcher used with --nproc (default: torchrun)")
    # the deepspeed launcher passes --local_rank to each rank (the env var LOCAL_RANK says the same)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _under_launcher() -> bool:
    return ("RANK" in os.environ and "WORLD_SIZE" in os.environ) or "OMPI_COMM_WORLD_SIZE" in os.environ \
        or "PMI_SIZE" in os.environ


def launch_command(args, n: int) -> list:
    inner = [args.config] + [f"--set={o}" for o in args.overrides]
    if args.resume is not None:
        inner += ["--resume", args.resume]
    if args.launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(n), "--master_port",
                str(_free_port()), "--module", "dist_sparse.cli.train", *inner]
    # --standalone: a single-node rendezvous on a port torchrun picks itself
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
            "--max-restarts", str(args.max_restarts), "-m", "dist_sparse.cli.train", *inner]


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = config_mod.load(args.config, args.overrides)
    except DistSparseError as exc:
        print(f"dist-sparse train: config error: {exc}", file=sys.stderr)
        return 2
    from dist_sparse.integration.patches import UntestedDeepSpeedError, check_deepspeed_version

    try:  # before any rank starts: the DeepSpeed patches are written for specific releases
        check_deepspeed_version()
    except UntestedDeepSpeedError as exc:
        print(f"dist-sparse train: {exc}", file=sys.stderr)
        return 2
    if args.nproc is not None and args.nproc < 1:
        print("dist-sparse train: --nproc must be >= 1", file=sys.stderr)
        return 2
    if args.nproc is not None and not _under_launcher():
        env = dict(os.environ)
        env.setdefault("DS_ACCELERATOR", "cpu" if _no_cuda() else "cuda")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
        return subprocess.call(launch_command(args, args.nproc), env=env)

    from dist_sparse.trainer import train

    try:
        summary = train(cfg, resume=args.resume)
    except DistSparseError as exc:
        print(f"dist-sparse train: error on rank {os.environ.get('RANK', '0')}: {exc}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        keys = ("final_val_loss", "achieved_sparsity", "median_step_seconds", "tokens_per_second", "peak_rss_mb")
        print(json.dumps({k: summary[k] for k in keys}))
        print(f"summary: {os.path.join(cfg.train.output_dir, 'summary.json')}  "
              f"metrics: {os.path.join(cfg.train.output_dir, 'metrics.jsonl')}  "
              f"model: {os.path.join(cfg.train.output_dir, 'final')}")
    return 0


def _no_cuda() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:
        return True


def _exit_rank(code: int) -> None:
    """End a launched rank without interpreter teardown. By now every output is committed (atomic writes, a
    barrier) and the process group is destroyed, but C++ destructors of communication threads run at teardown, and
    on a loaded CPU machine they occasionally abort a rank that has finished ("terminate called without an active
    exception", exit -6: seen 3 times in one session of test runs on a loaded 2-core machine), which fails the
    whole job. ``os._exit`` skips them after flushing what Python still buffers."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    rc = main()
    if _under_launcher():
        _exit_rank(rc)
    sys.exit(rc)
