#!/usr/bin/env bash
# One node, N ranks with the deepspeed launcher:   launch/deepspeed.sh N CONFIG [--set key=value ...]
# Multi-node: `dist-sparse train CONFIG --hostfile hosts --launcher deepspeed` (docs/multinode.md).
# On a CPU-only machine export DS_ACCELERATOR=cpu first.
set -euo pipefail
N=${1:?usage: launch/deepspeed.sh NPROC CONFIG [--set key=value ...]}; shift
PY=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
exec "$PY" -m deepspeed.launcher.runner --num_gpus "$N" --master_port "${MASTER_PORT:-29512}" \
  --module dist_sparse.cli.train "$@"
