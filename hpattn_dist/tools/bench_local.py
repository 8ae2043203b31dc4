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
from hpattn_dist.tools.bench_measure import gather_objects, gather_per_rank, layer_times, single_process_times


def run_local(cfg: BenchConfig, device: torch.device, threads_per_rank: int,
              progress: Optional[Callable[[str], None]] = None) -> list[dict[str, Any]]:
    """The local mode on every rank (collective); returns the records (same on every rank)."""
    from hpattn_dist.local import DistributedLocalSpatialSelfAttention
    from hpattn_dist.modules import DistributedSpatialSelfAttention
    from hpattn_dist.tools.bench_flex import compare_with_flex

    info = resolve_group(None)
    world, rank = info.world_size, info.rank
    dtype = DTYPES[cfg.dtype]
    say = progress or (lambda _msg: None)
    solo = dist.new_group([0]) if world > 1 else None  # collective: every rank takes part
    records: list[dict[str, Any]] = []
    for nside in cfg.nsides:
        npix = nside2npix(nside)
        window_nside = max(1, nside // LOCAL_WINDOW_DIV)
        gen = torch.Generator().manual_seed(cfg.seed)
        x = torch.randn(cfg.batch, npix, cfg.embed_dim, generator=gen).to(device=device, dtype=dtype)
        g = torch.randn(cfg.batch, npix, cfg.embed_dim, generator=gen).to(device=device, dtype=dtype)
        start, stop = shard_bounds(npix, world)[rank]
        x_local, g_local = x[:, start:stop].contiguous(), g[:, start:stop].contiguous()
        base = {"nside": nside, "npix": npix, "window_nside": window_nside,
                "cell_pixels": (nside // window_nside) ** 2, "dtype": cfg.dtype, "batch": cfg.batch,
                "embed_dim": cfg.embed_dim, "num_heads": cfg.num_heads, "backend": cfg.backend}
        ring_rec = None
        for mode in cfg.local_modes if cfg.local_layers else ():
            torch.manual_seed(cfg.seed)  # the same weights on every rank (they are checked)
            local = DistributedLocalSpatialSelfAttention(
                cfg.embed_dim, cfg.num_heads, attn_backend=cfg.backend, window_nside=window_nside,
                mode=mode).to(device=device, dtype=dtype)
            say(f"nside {nside}: local {mode} (window_nside {window_nside}), {world} ranks x "
                f"{threads_per_rank} threads")
            local_rec = {**base, "mode": mode, "impl": "local", "world_size": world,
                         "threads_per_rank": threads_per_rank}
            local_rec.update(gather_per_rank(layer_times(local, x_local, g_local, cfg, device)))
            records.append(local_rec)

            if ring_rec is None:
                say(f"nside {nside}: global ring, {world} ranks x {threads_per_rank} threads")
                ring = DistributedSpatialSelfAttention(cfg.embed_dim, cfg.num_heads, attn_backend=cfg.backend,
                                                       strategy="ring").to(device=device, dtype=dtype)
                ring.load_state_dict(local.state_dict())
                ring_rec = {**base, "mode": "global", "impl": "ring", "world_size": world,
                            "threads_per_rank": threads_per_rank}
                ring_rec.update(gather_per_rank(layer_times(ring, x_local, g_local, cfg, device)))
                records.append(ring_rec)

            say(f"nside {nside}: local {mode}, 1 process x {world * threads_per_rank} threads")
            rec = {**base, "mode": mode, "impl": "local_single", "world_size": 1,
                   "threads_per_rank": world * threads_per_rank}
            if rank == 0:
                single = DistributedLocalSpatialSelfAttention(
                    cfg.embed_dim, cfg.num_heads, attn_backend=cfg.backend, window_nside=window_nside,
                    mode=mode, process_group=solo).to(device=device, dtype=dtype)
                single.load_state_dict(local.state_dict())
                res = single_process_times(single, x, g, cfg, device, world * threads_per_rank)
                rec.update(res, peak_mem_bytes_per_rank=[res.pop("peak_mem")["bytes"]],
                           bytes_per_rank=[sum(res.pop("comm")["bytes_sent"].values())])
            single_rec = gather_objects(rec)[0]
            local_rec["efficiency_fwd_bwd"] = single_rec["fwd_bwd_s"] / local_rec["fwd_bwd_s"]
            local_rec["efficiency_fwd"] = single_rec["fwd_s"] / local_rec["fwd_s"]
            local_rec["speed_vs_ring_fwd_bwd"] = ring_rec["fwd_bwd_s"] / local_rec["fwd_bwd_s"]
            records.append(single_rec)

        # The attention alone against FlexAttention (Note [flex baseline]), on rank 0.
        for mode in cfg.local_modes:
            say(f"nside {nside}: local {mode} attention vs FlexAttention, 1 process x {threads_per_rank} threads")
            rows = None
            if rank == 0:
                q, k, v = cfg.head_tensors(npix, cfg.seed + 1, device, count=3)
                rows = compare_with_flex(q, k, v, window_nside, mode, solo, cfg.warmup, cfg.repeats,
                                         {**base, "world_size": 1, "threads_per_rank": threads_per_rank})
            records += gather_objects(rows)[0]
    return records
