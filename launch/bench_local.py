"""Benchmark of sharded HEALPix local attention (issue 17's closing note), one run, torchrun.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 \
        launch/bench_local.py --nsides 32 64

For each nside, on the same field ``[B, N, E]`` (NESTED) and the same weights:

* ``local``: :class:`~hpattn_dist.DistributedLocalSpatialSelfAttention`, neighbourhood windows
  with ``window_nside = nside / 8`` (``--window-div``), P ranks x ``threads`` threads;
* ``ring``: :class:`~hpattn_dist.DistributedSpatialSelfAttention` (global ring attention) on the
  same shards (``--no-ring`` skips it);
* ``single``: the same local layer in ONE process (a group of rank 0 alone, no communication)
  with ``P * threads`` threads, while the other ranks wait. ``efficiency = t_single / t_local``.

Times are forward+backward medians (slowest rank), peak memory per rank as in ``hpattn-dist bench``
(Note [peak memory] in ``hpattn_dist/tools/bench.py``), bytes sent per rank counted (halo rows; the
256-byte signature handshakes included). Prints one JSON line per measurement and a table.
"""

from __future__ import annotations

import argparse
import json
import types

import torch
import torch.distributed as dist

from hpattn_dist import DistributedLocalSpatialSelfAttention, DistributedSpatialSelfAttention
from hpattn_dist.tools.bench import _gather_objects, _layer_times, _per_rank
from hpattn_dist.healpix import shard_bounds


def main(argv: "list[str] | None" = None) -> list[dict]:
    """Run the benchmark on every rank (initialises gloo unless a process group exists) and
    return the records (rank 0 prints them)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nsides", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--window-div", type=int, default=8, help="window_nside = nside / this")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--backend", default="auto", choices=["auto", "sdpa", "manual"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-ring", action="store_true")
    args = parser.parse_args(argv)

    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    threads = torch.get_num_threads()
    solo = dist.new_group([0])  # collective: every rank takes part in creating it
    dtype = getattr(torch, args.dtype)
    cfg = types.SimpleNamespace(warmup=args.warmup, repeats=args.repeats)
    device = torch.device("cpu")
    rows = []
    for nside in args.nsides:
        npix = 12 * nside**2
        window_nside = max(1, nside // args.window_div)
        torch.manual_seed(0)
        local = DistributedLocalSpatialSelfAttention(
            args.embed_dim, args.heads, attn_backend=args.backend, window_nside=window_nside,
            mode="neighbourhood").to(dtype)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(args.batch, npix, args.embed_dim, generator=gen).to(dtype)
        g = torch.randn(args.batch, npix, args.embed_dim, generator=gen).to(dtype)
        start, stop = shard_bounds(npix, world)[rank]
        x_l, g_l = x[:, start:stop].contiguous(), g[:, start:stop].contiguous()
        base = {"nside": nside, "npix": npix, "window_nside": window_nside,
                "cell_pixels": (nside // window_nside) ** 2, "dtype": args.dtype,
                "batch": args.batch, "embed_dim": args.embed_dim, "heads": args.heads}

        rec = {**base, "impl": "local", "world_size": world, "threads_per_rank": threads}
        rec.update(_per_rank(_layer_times(local, x_l, g_l, cfg, device)))
        rows.append(rec)

        if not args.no_ring:
            ring = DistributedSpatialSelfAttention(args.embed_dim, args.heads,
                                                   attn_backend=args.backend, strategy="ring").to(dtype)
            ring.load_state_dict(local.state_dict())
            rec = {**base, "impl": "ring (global)", "world_size": world, "threads_per_rank": threads}
            rec.update(_per_rank(_layer_times(ring, x_l, g_l, cfg, device)))
            rows.append(rec)

        rec = {**base, "impl": "local, single process", "world_size": 1,
               "threads_per_rank": world * threads}
        if rank == 0:
            single = DistributedLocalSpatialSelfAttention(
                args.embed_dim, args.heads, attn_backend=args.backend, window_nside=window_nside,
                mode="neighbourhood", process_group=solo).to(dtype)
            single.load_state_dict(local.state_dict())
            torch.set_num_threads(world * threads)
            try:
                res = _layer_times(single, x, g, cfg, device, collective=False)
            finally:
                torch.set_num_threads(threads)
            rec.update(res, peak_mem_bytes_per_rank=[res["peak_mem"]["bytes"]])
            rec.pop("peak_mem")
            rec.pop("comm")
        rows.append(_gather_objects(rec)[0])
        dist.barrier()

    if rank == 0:
        for row in rows:
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("_times")}), flush=True)
        print(f"\n{'nside':>5} {'impl':<22} {'P':>2} {'thr':>3} {'fwd+bwd s':>10} {'peak MiB/rank':>14} "
              f"{'MiB sent/rank':>14} {'vs local':>9}")
        for row in rows:
            local_t = next(r["fwd_bwd_s"] for r in rows
                           if r["nside"] == row["nside"] and r["impl"] == "local")
            mem = "/".join(f"{b / 2**20:.0f}" for b in row["peak_mem_bytes_per_rank"])
            sent = "/".join(f"{b / 2**20:.2f}" for b in row.get("bytes_per_rank", [0]))
            print(f"{row['nside']:>5} {row['impl']:<22} {row['world_size']:>2} {row['threads_per_rank']:>3} "
                  f"{row['fwd_bwd_s']:>10.4f} {mem:>14} {sent:>14} {row['fwd_bwd_s'] / local_t:>9.2f}")
        print("vs local: time / local's time (single process: efficiency = this value; goal >= 0.9)")
    if own_group:
        dist.destroy_process_group()
    return rows


if __name__ == "__main__":
    main()
