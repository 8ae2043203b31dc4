"""Write the synthetic task of ``launch/healpix_model.py`` to a zarr store, each rank its shard.

    python launch/write_store.py --store task.zarr --nside 8 --samples 64          # one process
    torchrun --standalone --nproc_per_node 2 launch/write_store.py --store task.zarr --nside 64
    torchrun --standalone --nproc_per_node 2 launch/write_store.py --store f.zarr --nside 256 \
        --random-channels 64 --samples 1      # x (time, 64, cell): a seeded random field

With ``--random-channels C`` the store holds one seeded random field ``x`` ``(time, C, cell)``
instead (the field of ``hpattn-dist verify --sample-queries``, :func:`shard_field`), the input of
``hpattn-dist verify --sample-queries K --data STORE``.

The store holds ``x`` ``(time, 4, cell)`` and ``y`` ``(time, 1, cell)`` (one sample per time
index, NESTED order, xdggs and easygems attributes: :func:`hpattn_dist.io.write_shard`); ``python
launch/train.py --data task.zarr`` trains from it. Every rank computes and writes only its
contiguous NESTED range (:func:`hpattn_dist.healpix.shard_bounds`): the samples' random draws come
from one seeded generator, the same on every rank, and each rank evaluates them on its own pixels
(:func:`healpix_model.make_batch` with ``pixels``). No rank ever holds a full field.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from hpattn_dist.comm.groups import resolve_group
from hpattn_dist.healpix import check_nside, nside2npix, shard_bounds
from hpattn_dist.io import write_shard
from hpattn_dist.shutdown import ending_process_group

if __package__ in (None, ""):  # run as a script (python / torchrun launch/write_store.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from healpix_model import ModelConfig, make_batch
else:  # imported as launch.write_store (tests)
    from .healpix_model import ModelConfig, make_batch


def write_task(store: str, nside: int, samples: int, *, seed: int = 0, kappa: float = 4.0, num_bumps: int = 4,
               dtype: torch.dtype = torch.float32, group: Optional[dist.ProcessGroup] = None,
               chunk_cells: Optional[int] = None) -> None:
    """Write ``samples`` samples of the synthetic task at ``nside`` into ``store`` (collective)."""
    info = resolve_group(group)
    start, stop = shard_bounds(nside2npix(check_nside(nside)), info.world_size)[info.rank]
    cfg = ModelConfig(batch_size=1, num_bumps=num_bumps, kappa=kappa)
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.arange(start, stop)
    for t in range(samples):
        x, y = make_batch(cfg, nside, generator, dtype=dtype, pixels=pixels)  # [1, N_r, C]
        write_shard(store, "x", x[0].T, group, time=t, chunk_cells=chunk_cells)
        write_shard(store, "y", y[0].T, group, time=t, chunk_cells=chunk_cells)


def write_random(store: str, nside: int, samples: int, channels: int, *, seed: int = 0,
                 dtype: torch.dtype = torch.float32, group: Optional[dist.ProcessGroup] = None,
                 chunk_cells: Optional[int] = None) -> None:
    """Write ``samples`` seeded random fields ``x`` ``(time, channels, cell)`` (collective)."""
    from hpattn_dist.tools.verify_sampled import shard_field

    info = resolve_group(group)
    npix = nside2npix(check_nside(nside))
    start, stop = shard_bounds(npix, info.world_size)[info.rank]
    for t in range(samples):
        x = shard_field(seed + t, 1, npix, channels, start, stop)[0].T.to(dtype)  # [C, N_r]
        write_shard(store, "x", x, group, time=t, chunk_cells=chunk_cells)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="zarr store to write (created if absent)")
    parser.add_argument("--nside", type=int, default=8, help="HEALPix resolution (default: 8)")
    parser.add_argument("--samples", type=int, default=64, help="samples (time indices) (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples' draws (default: 0)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="(default: float32)")
    parser.add_argument("--chunk-cells", type=int, default=None, help="cells per chunk (default: about 2 MiB)")
    parser.add_argument("--random-channels", type=int, default=None,
                        help="write a seeded random field x (time, C, cell) instead of the task (default: the task)")
    args = parser.parse_args(argv)
    import os

    owns = "WORLD_SIZE" in os.environ and not dist.is_initialized()
    if owns:
        dist.init_process_group("gloo")
    with ending_process_group() if owns else contextlib.nullcontext():
        if args.random_channels:
            write_random(args.store, args.nside, args.samples, args.random_channels, seed=args.seed,
                         dtype=getattr(torch, args.dtype), chunk_cells=args.chunk_cells)
        else:
            write_task(args.store, args.nside, args.samples, seed=args.seed, dtype=getattr(torch, args.dtype),
                       chunk_cells=args.chunk_cells)
        if resolve_group(None).rank == 0:
            print(f"wrote {args.samples} samples of nside {args.nside} to {args.store}", flush=True)


if __name__ == "__main__":
    main()
