"""Train a small HEALPix transformer with sequence-parallel attention (torchrun entry point).

    torchrun --standalone --nproc_per_node 4 launch/train.py --config configs/train_small.json
    python launch/train.py --steps 30                 # one process, no torchrun needed
    NPROC=4 ./launch/run.sh --nside 8                # the wrapper, with environment overrides

Every rank of the job holds the whole model (replicated parameters) and one contiguous NESTED
range of the pixels (:func:`hpattn_dist.healpix.shard_bounds`); the model's attention layers are
converted with :func:`hpattn_dist.convert_spatial_attention`, each rank's loss is its share of the
per-pixel mean (local SUM / GLOBAL count) and :func:`hpattn_dist.grad_sync.sync_gradients` sums
the gradients over the group, so each step is the single-device step (see
:mod:`hpattn_dist.grad_sync`). The whole job is one sequence-parallel group; there is no data
parallelism here.

Process group: initialised from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
...) with NCCL when the run uses CUDA and gloo on CPU; without that environment the script runs
as a single process without ``torch.distributed``.

Data: by default each step draws a fresh synthetic batch (``make_batch``, the full field on every
rank, then :func:`hpattn_dist.healpix.scatter`: fine for the toy sizes here). With ``--data STORE``
(a zarr store of ``x (time, C_in, cell)`` and ``y (time, C_out, cell)``, e.g. written by
``launch/write_store.py``) no rank ever holds a full field: a
:class:`hpattn_dist.io.ShardDataset` reads each rank's NESTED range of the sampled time indices
(``--workers`` DataLoader workers), every rank draws the same indices from one seeded sampler, and
:func:`hpattn_dist.io.check_same_index` asserts that they did. The store's grid sets ``nside``.

Rank 0 prints one line per step: a progress bar, the global loss and the step time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from hpattn_dist import convert_spatial_attention
from hpattn_dist.grad_sync import global_loss, sync_gradients
from hpattn_dist.healpix import check_nside, nside2npix, scatter
from hpattn_dist.precision import DTYPES
from hpattn_dist.shutdown import ending_process_group
from hpattn_dist.strategies import check_strategy_name

if __package__ in (None, ""):  # run as a script (python / torchrun launch/train.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from healpix_model import ModelConfig, build_model, config_from_dict, local_loss, make_batch
else:  # imported as launch.train (tests)
    from .healpix_model import ModelConfig, build_model, config_from_dict, local_loss, make_batch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "train_small.json"

_TRAIN_DTYPES = ("float32", "float64", "bfloat16")  # of hpattn_dist.precision.DTYPES


@dataclass
class TrainConfig:
    """Training settings (the ``"train"`` section of a config file)."""

    nside: int = 4
    """HEALPix resolution (a power of two); ``N = 12 * nside**2`` pixels are sharded."""
    steps: int = 30
    """Optimizer steps."""
    lr: float = 3e-3
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Max global gradient norm (after the gradient sync, so equal on every rank); 0 = off."""
    strategy: str = "auto"
    """Sequence-parallel strategy: ``"ring" | "ulysses" | "hybrid" | "auto"``."""
    ulysses_degree: Optional[int] = None
    """Ulysses sub-group size U for ``strategy="hybrid"`` (a divisor of P and of the heads)."""
    seed: int = 0
    """Seed of the model initialisation and of the data stream (the same on every rank)."""
    dtype: str = "float32"
    """Parameter and activation dtype: ``"float32" | "float64" | "bfloat16"``."""
    device: str = "auto"
    """``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``."""
    log_every: int = 1
    """Print every this many steps on rank 0 (the first and last step are always printed)."""
    data: Optional[str] = None
    """A zarr store of ``x (time, C_in, cell)`` and ``y (time, C_out, cell)`` to train on instead of
    fresh synthetic batches; each rank reads only its shard (its grid sets ``nside``)."""
    workers: int = 0
    """DataLoader worker processes per rank reading ``data``."""

    def __post_init__(self) -> None:
        check_nside(self.nside)
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 0:
            raise ValueError(f"train.workers must be an int >= 0, got {self.workers!r}")
        for name in ("steps", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"train.{name} must be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("train.weight_decay and train.grad_clip must be >= 0")
        check_strategy_name(self.strategy)
        if (self.strategy == "hybrid") != (self.ulysses_degree is not None):
            raise ValueError(
                "train.ulysses_degree must be set exactly when train.strategy is 'hybrid', got "
                f"strategy={self.strategy!r}, ulysses_degree={self.ulysses_degree!r}"
            )
        if self.dtype not in _TRAIN_DTYPES:
            raise ValueError(f"train.dtype must be one of {sorted(_TRAIN_DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"train.device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build from a mapping; unknown keys raise ``ValueError`` naming them."""
        return config_from_dict(cls, values, "train")


def load_config(
    path: str | Path, overrides: Optional[dict[str, Any]] = None
) -> tuple[ModelConfig, TrainConfig]:
    """Read a JSON config ``{"model": {...}, "train": {...}}`` and apply ``train`` overrides.

    Raises:
        ValueError: unknown sections or keys, or invalid values (naming them).
    """
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    unknown = sorted(set(raw) - {"model", "train", "description"})
    if unknown:
        raise ValueError(f"{path}: unknown config sections {unknown}; known: model, train")
    train_values = dict(raw.get("train", {}))
    train_values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return ModelConfig.from_dict(raw.get("model", {})), TrainConfig.from_dict(train_values)


# --------------------------------------------------------------------------------------------
# Process group and device
# --------------------------------------------------------------------------------------------


@dataclass
class Runtime:
    """Where this process runs: its group (None without torch.distributed), rank and device."""

    group: Optional[dist.ProcessGroup]
    rank: int
    world_size: int
    device: torch.device
    owns_process_group: bool = False


def resolve_device(name: str) -> torch.device:
    """``"auto"``: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device='cuda' but CUDA is not available")
        index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def init_runtime(device_name: str) -> Runtime:
    """Initialise the default process group from torchrun's environment, if there is one.

    NCCL when the device is CUDA, gloo otherwise. With ``torch.distributed`` already initialised
    (e.g. by a test harness) that group is used as is; without ``WORLD_SIZE`` in the environment
    the run is a single process.
    """
    device = resolve_device(device_name)
    if dist.is_available() and dist.is_initialized():
        return Runtime(dist.group.WORLD, dist.get_rank(), dist.get_world_size(), device)
    if "WORLD_SIZE" not in os.environ:
        return Runtime(None, 0, 1, device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return Runtime(dist.group.WORLD, dist.get_rank(), dist.get_world_size(), device, True)


# --------------------------------------------------------------------------------------------
# Model, data, step
# --------------------------------------------------------------------------------------------


def build(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    group: Optional[dist.ProcessGroup],
    device: torch.device,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The sequence-parallel model and its optimizer, identical on every rank (seeded build)."""
    torch.manual_seed(train_cfg.seed)
    model = build_model(model_cfg)
    model = convert_spatial_attention(
        model, process_group=group, strategy=train_cfg.strategy,
        ulysses_degree=train_cfg.ulysses_degree,
    )
    model = model.to(device=device, dtype=train_cfg.torch_dtype)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay
    )
    return model, optimizer


def shard(x_full: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """This rank's pixels ``[B, N_r, C]`` of a full field ``[B, N, C]`` (the field itself alone)."""
    if group is None:
        return x_full
    return scatter(x_full, group=group, dim=1)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x_full: Tensor,
    y_full: Tensor,
    group: Optional[dist.ProcessGroup],
    grad_clip: float = 0.0,
) -> Tensor:
    """One optimizer step from a full batch ``[B, N, C]`` identical on every rank of ``group``
    (None: a single process): each rank takes its shard, then :func:`train_step_local`."""
    return train_step_local(model, optimizer, shard(x_full, group), shard(y_full, group), x_full.shape[1],
                            group, grad_clip)


def train_step_local(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x_local: Tensor,
    y_local: Tensor,
    npix: int,
    group: Optional[dist.ProcessGroup],
    grad_clip: float = 0.0,
) -> Tensor:
    """One optimizer step on this rank's shard; returns the global (single-device) loss.

    Args:
        x_local, y_local: this rank's pixels ``[B, N_r, C_in]`` / ``[B, N_r, C_out]``.
        npix: the global pixel count N.
        grad_clip: max global gradient norm, 0 = off.

    Returns:
        A detached 0-dim tensor: the per-pixel mean loss over the whole field, equal on all ranks.
    """
    optimizer.zero_grad(set_to_none=True)
    loss_local = local_loss(model(x_local), y_local, npix)
    loss_local.backward()
    sync_gradients(model, group)  # now every rank has the single-device gradient
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return global_loss(loss_local, group)


def store_batches(train_cfg: TrainConfig, batch_size: int, group: Optional[dist.ProcessGroup],
                  device: torch.device) -> tuple[int, Iterator[tuple[Tensor, Tensor]]]:
    """``(N, batches)``: this rank's ``(x_local [B, N_r, C_in], y_local [B, N_r, C_out])`` of the
    store's samples, drawn by one seeded shuffle (the same on every rank, checked each batch),
    epoch after epoch (see the module doc)."""
    from hpattn_dist.io import ShardDataset, check_same_index

    dataset = ShardDataset(train_cfg.data, ("x", "y"), group, return_index=True)
    if len(dataset) < batch_size:
        raise ValueError(f"{train_cfg.data} holds {len(dataset)} samples, fewer than one batch of {batch_size}")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=train_cfg.workers,
        generator=torch.Generator().manual_seed(train_cfg.seed + 2), persistent_workers=train_cfg.workers > 0)

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            for index, item in loader:
                check_same_index(index, group)
                yield (item["x"].transpose(1, 2).to(device=device, dtype=train_cfg.torch_dtype),
                       item["y"].transpose(1, 2).to(device=device, dtype=train_cfg.torch_dtype))

    return 12 * dataset.nside**2, batches()


def progress_bar(step: int, steps: int, width: int = 20) -> str:
    done = width * step // steps
    return "[" + "#" * done + "-" * (width - done) + "]"


def smoothed(losses: Sequence[float], beta: float = 0.8) -> list[float]:
    """Exponential moving average of the losses, bias-corrected (step t weighs the earlier ones
    by ``beta**k``; the first value is the first loss). Each step draws a fresh random batch, so
    single losses jump; the average shows the trend."""
    out, acc = [], 0.0
    for t, value in enumerate(losses, start=1):
        acc = beta * acc + (1.0 - beta) * value
        out.append(acc / (1.0 - beta**t))
    return out


def loss_summary(losses: Sequence[float]) -> str:
    """The end-of-run line: the smoothed loss at the start and the end, and the per-step range."""
    ema = smoothed(losses)
    return (f"smoothed loss (EMA 0.8) {ema[0]:.3e} at step 1 -> {ema[-1]:.3e} at step {len(losses)} "
            f"(single steps ranged {min(losses):.3e} .. {max(losses):.3e}: each step draws a new batch)")


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, runtime: Runtime) -> dict[str, Any]:
    """Run ``train_cfg.steps`` steps; rank 0 prints progress. Returns the run's metrics."""
    model, optimizer = build(model_cfg, train_cfg, runtime.group, runtime.device)
    generator = torch.Generator().manual_seed(train_cfg.seed + 1)
    npix = nside2npix(train_cfg.nside)
    from_store = None
    if train_cfg.data is not None:
        npix, from_store = store_batches(train_cfg, model_cfg.batch_size, runtime.group, runtime.device)
    log = runtime.rank == 0
    if log:
        n_params = sum(p.numel() for p in model.parameters())
        source = f"store {train_cfg.data} (shards only)" if from_store is not None else "synthetic batches"
        print(
            f"hpattn_dist train: world {runtime.world_size}, device {runtime.device}, "
            f"nside {math.isqrt(npix // 12)} ({npix} pixels) from {source}, strategy {train_cfg.strategy}, "
            f"dtype {train_cfg.dtype}, {n_params} parameters, {train_cfg.steps} steps",
            flush=True,
        )
    losses: list[float] = []
    step_times: list[float] = []
    for step in range(1, train_cfg.steps + 1):
        start = time.perf_counter()
        if from_store is not None:
            x_local, y_local = next(from_store)
            loss = train_step_local(model, optimizer, x_local, y_local, npix, runtime.group, train_cfg.grad_clip)
        else:
            x_full, y_full = make_batch(
                model_cfg, train_cfg.nside, generator,
                dtype=train_cfg.torch_dtype, device=runtime.device,
            )
            loss = train_step(model, optimizer, x_full, y_full, runtime.group, train_cfg.grad_clip)
        loss_value = float(loss)  # syncs the device
        step_times.append(time.perf_counter() - start)
        losses.append(loss_value)
        if log and (step % train_cfg.log_every == 0 or step in (1, train_cfg.steps)):
            print(
                f"step {step:>{len(str(train_cfg.steps))}}/{train_cfg.steps} "
                f"{progress_bar(step, train_cfg.steps)} loss {loss_value:.6e} "
                f"| {1e3 * step_times[-1]:.1f} ms/step",
                flush=True,
            )
    steady = step_times[1:] or step_times
    metrics = {
        "world_size": runtime.world_size,
        "nside": math.isqrt(npix // 12),
        "data": train_cfg.data,
        "strategy": train_cfg.strategy,
        "device": str(runtime.device),
        "losses": losses,
        "smoothed_losses": smoothed(losses),
        "step_times_s": step_times,
        "mean_step_time_s": sum(steady) / len(steady),
    }
    if log:
        print(
            f"done: {loss_summary(losses)}; "
            f"{1e3 * metrics['mean_step_time_s']:.1f} ms/step (mean after step 1)",
            flush=True,
        )
    return metrics


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="JSON config file")
    parser.add_argument("--nside", type=int, help="override train.nside")
    parser.add_argument("--steps", type=int, help="override train.steps")
    parser.add_argument("--strategy", help="override train.strategy")
    parser.add_argument("--ulysses-degree", dest="ulysses_degree", type=int,
                        help="override train.ulysses_degree (strategy 'hybrid')")
    parser.add_argument("--seed", type=int, help="override train.seed")
    parser.add_argument("--dtype", help="override train.dtype")
    parser.add_argument("--device", help="override train.device")
    parser.add_argument("--data", help="train on this zarr store (x, y; e.g. from launch/write_store.py): "
                                       "each rank reads its shard, no full field")
    parser.add_argument("--workers", type=int, help="override train.workers (DataLoader workers with --data)")
    parser.add_argument("--metrics", help="rank 0 writes the losses and step times here (JSON)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Parse arguments, load the config, train; returns the metrics (see :func:`train`)."""
    parser = _parser()
    args = parser.parse_args(argv)
    overrides = {
        k: getattr(args, k)
        for k in ("nside", "steps", "strategy", "ulysses_degree", "seed", "dtype", "device", "data", "workers")
    }
    try:
        model_cfg, train_cfg = load_config(args.config, overrides)
    except (OSError, ValueError) as err:
        parser.error(f"bad configuration: {err}")  # exits with status 2 on every rank
    runtime = init_runtime(train_cfg.device)
    # Note [clean exit] in hpattn_dist/shutdown.py; a group someone else opened is theirs to end.
    with ending_process_group() if runtime.owns_process_group else contextlib.nullcontext():
        metrics = train(model_cfg, train_cfg, runtime)
        if args.metrics and runtime.rank == 0:
            Path(args.metrics).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return metrics


if __name__ == "__main__":
    main()
