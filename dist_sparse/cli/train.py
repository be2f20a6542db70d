"""`dist-sparse train CONFIG [--set key=value ...] [--nproc N | --nnodes N --node-rank R | --hostfile FILE]`.

The config is loaded and validated here, before any rank starts, so a bad key fails fast with its key path.
With ``--nproc``, ``--nnodes`` or ``--hostfile`` this command starts the ranks itself (torchrun by default, the
deepspeed runner or mpirun; dist_sparse/cli/launch.py) and each rank runs this module under the launcher; under an
existing launcher (RANK/WORLD_SIZE set, a Slurm task, or mpirun with mpi4py discovery) it trains directly.
Exit codes: 0 done, 1 an error during training, 2 bad input, 75 stopped cleanly with a checkpoint (a signal or
train.time_limit; continue with --resume auto).
"""

import argparse
import json
import os
import sys

from dist_sparse import cluster, stopping
from dist_sparse import config as config_mod
from dist_sparse import distributed as D
from dist_sparse.cli import launch
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
    p.add_argument("--rewind", default=None, metavar="DIR",
                   help="start from a committed checkpoint of another run (its weights, optimizer moments, learning "
                        "rate schedule, data position and step) with this config's sparsity.init_masks applied: "
                        "pruned positions zeroed (lottery tickets with rewinding; dist-sparse lottery uses it)")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="with torchrun (--nproc, --nnodes, --hostfile): restart all ranks this many times after a "
                        "failure; a restart resumes from the newest committed checkpoint (a clean stop, exit code "
                        "75, is never restarted)")
    p.add_argument("--launcher", choices=launch.LAUNCHERS, default="torchrun",
                   help="launcher used with --nproc / --hostfile (default: torchrun)")
    # the deepspeed launcher passes --local_rank to each rank (the env var LOCAL_RANK says the same)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    launch.add_arguments(p)
    return p


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
    # launch flags start ranks, unless this process already is one (our own launcher's child carries the torch or
    # MPI variables; a Slurm task given --nproc starts torchrun on its node, whose workers then train)
    if launch.requested(args) and not cluster.under_launcher():
        return launch.main(args, cfg)
    try:
        placement = cluster.apply_discovery()  # Slurm -> torch variables -> MPI (inside init_distributed)
    except DistSparseError as exc:
        print(f"dist-sparse train: {exc}", file=sys.stderr)
        return 2
    if placement is not None and placement.source == "slurm" and not os.environ.get("DIST_SPARSE_START_TIME"):
        os.environ["DIST_SPARSE_START_TIME"] = f"{stopping.start_time():.3f}"

    from dist_sparse.trainer import train

    try:
        if args.rewind is not None and (args.resume is not None or cfg.sparsity.init_masks is None):
            raise config_mod.ConfigError("--rewind", "needs sparsity.init_masks (the masks to apply) and excludes "
                                                     "--resume")
        summary = train(cfg, resume=args.rewind or args.resume, rewind=args.rewind is not None)
    except DistSparseError as exc:
        print(f"dist-sparse train: error on rank {os.environ.get('RANK', '0')}: {exc}", file=sys.stderr)
        return 1
    if "stopped" in summary:
        s = summary["stopped"]
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"dist-sparse train: stopped ({s['reason']}) at step {s['step']}; checkpoint {s['checkpoint']}; "
                  f"continue with --resume auto (exit code {stopping.EXIT_STOPPED})", file=sys.stderr)
        return stopping.rank_exit_code(True)
    if int(os.environ.get("RANK", "0")) == 0:
        keys = ("final_val_loss", "achieved_sparsity", "median_step_seconds", "tokens_per_second", "peak_rss_mb")
        print(json.dumps({k: summary[k] for k in keys}))
        print(f"summary: {os.path.join(cfg.train.output_dir, 'summary.json')}  "
              f"metrics: {os.path.join(cfg.train.output_dir, 'metrics.jsonl')}  "
              f"model: {os.path.join(cfg.train.output_dir, 'final')}")
    return 0


if __name__ == "__main__":
    rc = main()
    if cluster.under_launcher():
        D.exit_rank(rc)
    sys.exit(rc)
