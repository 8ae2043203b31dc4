#!/usr/bin/env bash
# Run `hpattn-dist verify|bench` under torchrun, on one node or many.
#
#   launch/torchrun_multinode.sh verify                      # one node, NPROC_PER_NODE ranks
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun_multinode.sh bench --nsides 32,64
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun_multinode.sh bench --nsides 32,64
#
# Environment overrides (defaults in brackets):
#   NNODES [1]            number of nodes
#   NODE_RANK [0]         this node's index, 0 .. NNODES-1
#   NPROC_PER_NODE [2]    ranks per node (on GPU nodes: the number of GPUs)
#   MASTER_ADDR [127.0.0.1], MASTER_PORT [29511]   rendezvous of node 0
#   DEVICE [cpu]          cpu (gloo) or cuda (nccl, one GPU per local rank)
#   OMP_NUM_THREADS [1]   torch threads per rank on CPU
#   LOG_RANKS [0]         ranks whose output is shown (torchrun --local-ranks-filter)
#   PYTHON [python]       interpreter with hpattn_dist installed
# Every further argument goes to `python -m hpattn_dist`.
set -euo pipefail

if [[ $# -lt 1 || ( "$1" != "verify" && "$1" != "bench" ) ]]; then
    echo "usage: $0 verify|bench [hpattn-dist options]" >&2
    exit 2
fi

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29511}
DEVICE=${DEVICE:-cpu}
LOG_RANKS=${LOG_RANKS:-0}
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

filter=()
if "$PYTHON" -m torch.distributed.run --help 2>/dev/null | grep -q -- "--local-ranks-filter"; then
    filter=(--local-ranks-filter "$LOG_RANKS")
fi

exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" "${filter[@]}" \
    -m hpattn_dist "$@" --device "$DEVICE"
