#!/usr/bin/env bash
# Launch launch/train_deepspeed.py with the deepspeed launcher (or torchrun), environment overrides
# in the style of launch/run.sh. Extra arguments go to train_deepspeed.py.
#
#   ./launch/deepspeed.sh                                     # 2 CPU ranks, ZeRO-2 fp32, S = 2
#   NPROC=4 SP=2 DS_CONFIG=configs/deepspeed/zero3.json ./launch/deepspeed.sh --steps 10
#   NGPU=8 SP=4 DS_CONFIG=configs/deepspeed/zero2_bf16.json ./launch/deepspeed.sh --nside 64
#   LAUNCHER=torchrun NPROC=4 ./launch/deepspeed.sh           # same script under torchrun
#   HOSTFILE=hosts NGPU=8 SP=8 ./launch/deepspeed.sh          # multi-node (deepspeed launcher)
#
# Variables:
#   NGPU / NPROC   processes per node (NGPU wins when both are set; default 2)
#   SP             sequence-parallel size S, a divisor of the world size (default: all ranks)
#   DS_CONFIG      DeepSpeed JSON (default configs/deepspeed/zero2.json; *_bf16.json on GPUs)
#   CONFIG         training config: model, nside, steps, strategy (default configs/train_small.json)
#   LAUNCHER       deepspeed (default) or torchrun
#   HOSTFILE       deepspeed launcher hostfile for multi-node runs
#   MASTER_PORT    rendezvous port (default 29500)
#   DS_ACCELERATOR cpu / cuda (DeepSpeed detects it when unset; set cpu on machines without GPUs)
#   DRY_RUN=1      print the command instead of running it
#
# The first DeepSpeed start on a machine JIT-compiles a small CPU communication op with g++/ninja
# (about 1-3 minutes on 2 cores), cached in ~/.cache/torch_extensions (TORCH_EXTENSIONS_DIR).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "${HERE}/.." && pwd)"

NPROC="${NGPU:-${NPROC:-2}}"
DS_CONFIG="${DS_CONFIG:-${ROOT}/configs/deepspeed/zero2.json}"
CONFIG="${CONFIG:-${ROOT}/configs/train_small.json}"
LAUNCHER="${LAUNCHER:-deepspeed}"
MASTER_PORT="${MASTER_PORT:-29500}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

script_args=(--deepspeed_config "${DS_CONFIG}" --config "${CONFIG}")
if [[ -n "${SP:-}" ]]; then
    script_args+=(--sequence-parallel-size "${SP}")
fi

case "${LAUNCHER}" in
    deepspeed)
        args=(--master_port "${MASTER_PORT}")
        if [[ -n "${HOSTFILE:-}" ]]; then
            args+=(--hostfile "${HOSTFILE}" --num_gpus "${NPROC}")
        else
            args+=(--num_gpus "${NPROC}")
        fi
        cmd=(python -m deepspeed.launcher.runner "${args[@]}" "${HERE}/train_deepspeed.py")
        ;;
    torchrun)
        cmd=(python -m torch.distributed.run --standalone --nproc_per_node "${NPROC}"
             "${HERE}/train_deepspeed.py")
        ;;
    *)
        echo "LAUNCHER must be deepspeed or torchrun, got '${LAUNCHER}'" >&2
        exit 2
        ;;
esac

cmd+=("${script_args[@]}" "$@")
if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
fi
exec "${cmd[@]}"
