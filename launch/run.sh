#!/usr/bin/env bash
# torchrun wrapper for launch/train.py (environment overrides in the style of torchtitan's
# run_train.sh). Extra arguments go to train.py.
#
#   ./launch/run.sh                                        # 2 CPU ranks, configs/train_small.json
#   NPROC=4 ./launch/run.sh --nside 8 --steps 50
#   NGPU=8 CONFIG=configs/train_gpu.json ./launch/run.sh
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 NGPU=8 \
#       CONFIG=configs/train_gpu.json ./launch/run.sh       # on each node, its own NODE_RANK
#
# Variables:
#   NGPU / NPROC   processes per node (NGPU wins when both are set; default 2)
#   CONFIG         JSON config (default configs/train_small.json)
#   NNODES         number of nodes (default 1)
#   NODE_RANK      this node's rank (default 0, multi-node only)
#   MASTER_ADDR    rendezvous host (default: a free local port when NNODES=1)
#   MASTER_PORT    rendezvous port (default 29500)
#   LOG_RANK       local ranks whose output is shown, e.g. 0 or 0,1 (default: all; train.py
#                  itself prints from rank 0 only)
#   TORCHRUN       the torchrun command (default: "python -m torch.distributed.run")
#   DRY_RUN=1      print the command instead of running it
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "${HERE}/.." && pwd)"

NPROC="${NGPU:-${NPROC:-2}}"
CONFIG="${CONFIG:-${ROOT}/configs/train_small.json}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_PORT="${MASTER_PORT:-29500}"
TORCHRUN="${TORCHRUN:-python -m torch.distributed.run}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

args=(--nnodes="${NNODES}" --nproc_per_node="${NPROC}")
if [[ "${NNODES}" == "1" && -z "${MASTER_ADDR:-}" ]]; then
    args+=(--standalone)
else
    args+=(--node_rank="${NODE_RANK}" --master_addr="${MASTER_ADDR:?set MASTER_ADDR for multi-node runs}"
           --master_port="${MASTER_PORT}")
fi
if [[ -n "${LOG_RANK:-}" ]]; then
    args+=(--local-ranks-filter="${LOG_RANK}" --role rank --tee 3)
fi

cmd=(${TORCHRUN} "${args[@]}" "${HERE}/train.py" --config "${CONFIG}" "$@")
if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
fi
exec "${cmd[@]}"
