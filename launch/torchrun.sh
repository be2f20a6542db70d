#!/usr/bin/env bash
# One node, N ranks with torchrun:   launch/torchrun.sh N CONFIG [--set key=value ...]
# (equivalent to `dist-sparse train CONFIG --nproc N`). Multi-node: `dist-sparse train CONFIG --nnodes N --node-rank R
# --master-addr A` on every node, or `--hostfile FILE` once (docs/multinode.md; --dry-run prints the commands).
set -euo pipefail
N=${1:?usage: launch/torchrun.sh NPROC CONFIG [--set key=value ...]}; shift
PY=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$N" -m dist_sparse.cli.train "$@"
