"""Train the small HEALPix transformer with DeepSpeed: sequence parallelism x data parallelism x ZeRO.

    deepspeed --num_gpus 8 launch/train_deepspeed.py --deepspeed_config configs/deepspeed/zero2_bf16.json \
        --sequence-parallel-size 4
    torchrun --standalone --nproc_per_node 4 launch/train_deepspeed.py \
        --deepspeed_config configs/deepspeed/zero3.json --sequence-parallel-size 2   # CPU: fp32
    ./launch/deepspeed.sh                   # the wrapper, with environment overrides

The W ranks form R = W / S replicas of S consecutive ranks (:func:`hpattn_dist.integrations.
deepspeed.sequence_parallel_mpu`). Every rank of a replica holds the whole model and one contiguous
NESTED range of the pixels of the replica's samples; the attention layers are converted to the
sequence-parallel layer over the replica's group. DeepSpeed reduces gradients over all W ranks and
shards what the ZeRO stage says over them; each rank's loss is its share of the replica's per-pixel
mean times :func:`~hpattn_dist.integrations.deepspeed.deepspeed_loss_factor`, so a step is the
single-device step on the global batch of R * B samples (Note [DeepSpeed gradient scaling]).

Where the settings come from: the model section and ``nside``, ``steps``, ``strategy``, ``seed``,
``log_every`` of the training config (``--config``, as for ``launch/train.py``); the optimizer, its
learning rate, gradient clipping, ZeRO stage, precision and micro-batch size B from the DeepSpeed
config (``--deepspeed_config``). The ``lr``, ``grad_clip``, ``weight_decay`` and ``dtype`` of the
training config are not used here.

Rank 0 prints one line per step: ``step i/n [###---] loss <replica mean over all replicas> | ms``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from hpattn_dist import convert_spatial_attention
from hpattn_dist.grad_sync import global_loss
from hpattn_dist.healpix import nside2npix, shard_bounds
from hpattn_dist.integrations.deepspeed import (
    deepspeed_loss_factor,
    initialize,
    sequence_parallel_mpu,
)
from hpattn_dist.shutdown import ending_process_group

if __package__ in (None, ""):  # run as a script (deepspeed / torchrun launch/train_deepspeed.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from healpix_model import ModelConfig, build_model, local_loss, make_batch
    from train import DEFAULT_CONFIG, load_config, loss_summary, progress_bar, smoothed
else:  # imported as launch.train_deepspeed (tests)
    from .healpix_model import ModelConfig, build_model, local_loss, make_batch
    from .train import DEFAULT_CONFIG, load_config, loss_summary, progress_bar, smoothed

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DS_CONFIG = REPO_ROOT / "configs" / "deepspeed" / "zero2.json"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                        default=str(DEFAULT_DS_CONFIG), help="DeepSpeed JSON config")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="training config (model section, nside, steps, strategy, seed)")
    parser.add_argument("--sequence-parallel-size", "--sequence_parallel_size", type=int,
                        dest="sequence_parallel_size",
                        help="S, consecutive ranks sharing one sample's pixels (default: all ranks)")
    parser.add_argument("--local_rank", "--local-rank", type=int, dest="local_rank",
                        default=None, help="set by the deepspeed launcher (else LOCAL_RANK)")
    parser.add_argument("--nside", type=int, help="override train.nside")
    parser.add_argument("--steps", type=int, help="override train.steps")
    parser.add_argument("--strategy", help="override train.strategy")
    parser.add_argument("--seed", type=int, help="override train.seed")
    parser.add_argument("--metrics", help="rank 0 writes the losses and step times here (JSON)")
    return parser.parse_args(argv)


def _init_distributed(local_rank: Optional[int]) -> torch.device:
    """Initialise torch.distributed through DeepSpeed (its accelerator picks NCCL / gloo / ccl)
    and return this rank's device."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if local_rank is not None:
        os.environ["LOCAL_RANK"] = str(local_rank)
    os.environ.setdefault("LOCAL_RANK", "0")
    accelerator = get_accelerator()
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:  # plain `python launch/train_deepspeed.py`: one process
            os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
        deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    index = int(os.environ["LOCAL_RANK"])
    if accelerator.device_name() == "cpu":
        return torch.device("cpu")
    accelerator.set_device(index)
    return torch.device(accelerator.device_name(index))


def train(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Parse ``argv``, train, return the metrics (rank 0 prints progress)."""
    args = parse_args(argv)
    overrides = {k: getattr(args, k) for k in ("nside", "steps", "strategy", "seed")}
    model_cfg, train_cfg = load_config(args.config, overrides)
    device = _init_distributed(args.local_rank)
    rank, world = dist.get_rank(), dist.get_world_size()
    sp_size = args.sequence_parallel_size or world
    mpu = sequence_parallel_mpu(sp_size)  # ValueError unless S divides W
    replicas = world // sp_size

    with open(args.deepspeed_config, encoding="utf-8") as fh:
        ds_config = json.load(fh)
    micro = int(ds_config.get("train_micro_batch_size_per_gpu", model_cfg.batch_size))
    ds_config["train_micro_batch_size_per_gpu"] = micro
    ds_config.pop("train_batch_size", None)  # derived by DeepSpeed: micro * grad_accum * R
    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else (
        torch.float16 if ds_config.get("fp16", {}).get("enabled") else torch.float32)

    group = mpu.get_sequence_parallel_group()
    torch.manual_seed(train_cfg.seed)  # the same initial weights everywhere (DeepSpeed broadcasts too)
    model = build_model(model_cfg)
    model = convert_spatial_attention(model, process_group=group, strategy=train_cfg.strategy)
    engine, *_ = initialize(model.to(device), ds_config, mpu)
    factor = deepspeed_loss_factor(engine)

    npix = nside2npix(train_cfg.nside)
    start, stop = shard_bounds(npix, sp_size)[mpu.get_sequence_parallel_rank()]
    first = mpu.get_data_parallel_rank() * micro
    data_cfg = ModelConfig.from_dict({**model_cfg.__dict__, "batch_size": micro * replicas})
    generator = torch.Generator().manual_seed(train_cfg.seed + 1)  # same global batch on every rank
    log = rank == 0
    if log:
        print(
            f"hpattn_dist DeepSpeed train: world {world} = {sp_size} sp x {replicas} dp, "
            f"ZeRO-{engine.zero_optimization_stage()}, {dtype}, device {device}, nside "
            f"{train_cfg.nside} ({npix} pixels), strategy {train_cfg.strategy}, global batch "
            f"{micro * replicas}, loss factor {factor:g}, {train_cfg.steps} steps",
            flush=True,
        )
    losses: list[float] = []
    step_times: list[float] = []
    for step in range(1, train_cfg.steps + 1):
        t0 = time.perf_counter()
        x_full, y_full = make_batch(data_cfg, train_cfg.nside, generator, dtype=dtype, device=device)
        x = x_full[first : first + micro, start:stop]  # [B, N_r, C_in]
        y = y_full[first : first + micro, start:stop]
        loss = local_loss(engine(x).float(), y.float(), npix)  # share of the replica's mean
        engine.backward(loss * factor)
        engine.step()
        replica_loss = global_loss(loss, group)  # sum over the sp group
        dist.all_reduce(replica_loss, group=mpu.get_data_parallel_group())
        losses.append(float(replica_loss) / replicas)
        step_times.append(time.perf_counter() - t0)
        if log and (step % train_cfg.log_every == 0 or step in (1, train_cfg.steps)):
            print(
                f"step {step:>{len(str(train_cfg.steps))}}/{train_cfg.steps} "
                f"{progress_bar(step, train_cfg.steps)} loss {losses[-1]:.6e} "
                f"| {1e3 * step_times[-1]:.1f} ms/step",
                flush=True,
            )
    steady = step_times[1:] or step_times
    metrics = {
        "world_size": world, "sequence_parallel_size": sp_size, "replicas": replicas,
        "zero_stage": engine.zero_optimization_stage(), "losses": losses,
        "smoothed_losses": smoothed(losses),
        "step_times_s": step_times, "mean_step_time_s": sum(steady) / len(steady),
    }
    if log:
        print(f"done: {loss_summary(losses)}", flush=True)
        if args.metrics:
            Path(args.metrics).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    engine.destroy()
    return metrics


def main(argv: Optional[Sequence[str]] = None) -> None:
    with ending_process_group():  # Note [clean exit] in hpattn_dist/shutdown.py
        train(argv)


if __name__ == "__main__":
    main()
