#!/usr/bin/env bash
# Launch dist-export with one process per GPU on this node (or a single process with NPROC=1).
#
# Knobs (environment variables, defaults in brackets):
#   NPROC        processes on this node                       [number of visible GPUs, or 1 without GPUs]
#   NNODES       nodes taking part                            [1]
#   RDZV_ENDPOINT host:port of the c10d rendezvous (NNODES>1) [required when NNODES>1]
#   RDZV_ID      rendezvous id shared by all nodes            [dist-export]
#   SINGLE       1 = no torchrun at all (plain single process) [0]
#   PYTHON       python interpreter                           [python3]
# Everything after the script name is passed to `dist_export` unchanged, e.g.
#   launch/torchrun.sh export --model /models/Qwen3-8B --recipe fp8-block --format fp8-block --out /out/q8
set -euo pipefail

PYTHON=${PYTHON:-python3}
SINGLE=${SINGLE:-0}
NNODES=${NNODES:-1}
RDZV_ID=${RDZV_ID:-dist-export}
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi

if [[ "$SINGLE" == "1" ]]; then
  exec "$PYTHON" -m dist_export "$@"
fi

if [[ "$NNODES" == "1" ]]; then
  exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$NPROC" -m dist_export "$@"
fi

: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of the rendezvous when NNODES>1}"
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$NPROC" \
  --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$RDZV_ID" -m dist_export "$@"
