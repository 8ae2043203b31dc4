"""``hpattn-dist bench --mode local``: sharded HEALPix local attention against global ring
attention, its own 1-process run and FlexAttention.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from hpattn_dist.comm.groups import resolve_group
from hpattn_dist.healpix import nside2npix, shard_bounds
from hpattn_dist.precision import DTYPES
from hpattn_dist.tools.bench_config import BenchConfig, LOCAL_WINDOW_DIV
from hpattn_dist.tools.bench_measure import gather_objects, gather_per_rank, layer_times


def run_local(cfg: BenchConfig, device: torch.device, threads_per_rank: int,
              progress: Optional[Callable[[str], None]] = None) -> list[dict[str, Any]]:
    """The local mode on every rank (collective); returns the records (same on every rank)."""
    from hpattn_dist.local import DistributedLocalSpatialSelfAttention
    from hpattn_dist.modules import DistributedSpatialSelfAttention

    info = resolve_group(None)
    world, rank = info.world_size, info.rank
    dtype = DTYPES[cfg.dtype]
    say = progress or (lambda _msg: None)
    solo = dist.new_group([0]) if world > 1 else None  # collective: every rank takes part
    records: list[dict[str, Any]] = []
    for nside in cfg.nsides:
        npix = nside2npix(nside)
        window_nside = max(1, nside // LOCAL_WINDOW_DIV)
        torch.manual_seed(cfg.seed)  # the same weights on every rank (they are checked)
        local = DistributedLocalSpatialSelfAttention(
            cfg.embed_dim, cfg.num_heads, attn_backend=cfg.backend, window_nside=window_nside,
            mode="neighbourhood").to(device=device, dtype=dtype)
        gen = torch.Generator().manual_seed(cfg.seed)
        x = torch.randn(cfg.batch, npix, cfg.embed_dim, generator=gen).to(device=device, dtype=dtype)
        g = torch.randn(cfg.batch, npix, cfg.embed_dim, generator=gen).to(device=device, dtype=dtype)
        start, stop = shard_bounds(npix, world)[rank]
        x_local, g_local = x[:, start:stop].contiguous(), g[:, start:stop].contiguous()
        base = {"nside": nside, "npix": npix, "window_nside": window_nside, "mode": "neighbourhood",
                "cell_pixels": (nside // window_nside) ** 2, "dtype": cfg.dtype, "batch": cfg.batch,
                "embed_dim": cfg.embed_dim, "num_heads": cfg.num_heads, "backend": cfg.backend}

        say(f"nside {nside}: local (window_nside {window_nside}), {world} ranks x {threads_per_rank} threads")
        rec = {**base, "impl": "local", "world_size": world, "threads_per_rank": threads_per_rank}
        rec.update(gather_per_rank(layer_times(local, x_local, g_local, cfg, device)))
        group = [rec]

        say(f"nside {nside}: global ring, {world} ranks x {threads_per_rank} threads")
        ring = DistributedSpatialSelfAttention(cfg.embed_dim, cfg.num_heads, attn_backend=cfg.backend,
                                               strategy="ring").to(device=device, dtype=dtype)
        ring.load_state_dict(local.state_dict())
        rec = {**base, "impl": "ring", "world_size": world, "threads_per_rank": threads_per_rank}
        rec.update(gather_per_rank(layer_times(ring, x_local, g_local, cfg, device)))
        group.append(rec)

        say(f"nside {nside}: local, 1 process x {world * threads_per_rank} threads")
        rec = {**base, "impl": "local_single", "world_size": 1, "threads_per_rank": world * threads_per_rank}
        if rank == 0:
            single = DistributedLocalSpatialSelfAttention(
                cfg.embed_dim, cfg.num_heads, attn_backend=cfg.backend, window_nside=window_nside,
                mode="neighbourhood", process_group=solo).to(device=device, dtype=dtype)
            single.load_state_dict(local.state_dict())
            threads = torch.get_num_threads()
            torch.set_num_threads(world * threads_per_rank)
            try:
                res = layer_times(single, x, g, cfg, device, collective=False)
            finally:
                torch.set_num_threads(threads)
            rec.update(res, peak_mem_bytes_per_rank=[res.pop("peak_mem")["bytes"]],
                       bytes_per_rank=[sum(res.pop("comm")["bytes_sent"].values())])
        group.append(gather_objects(rec)[0])
        t_local = group[0]["fwd_bwd_s"]
        group[0]["efficiency_fwd_bwd"] = group[2]["fwd_bwd_s"] / t_local
        group[0]["efficiency_fwd"] = group[2]["fwd_s"] / group[0]["fwd_s"]
        group[0]["speed_vs_ring_fwd_bwd"] = group[1]["fwd_bwd_s"] / t_local
        records += group
    return records
