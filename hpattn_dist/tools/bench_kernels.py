"""``hpattn-dist bench --mode emulation`` (the ring's per-block path in one process against one
fused call) and ``--mode memory`` (ring attention's peak next to an ``N x N`` score matrix).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from hpattn_dist.comm.groups import resolve_group
from hpattn_dist.healpix import nside2npix, shard_bounds, shard_sizes
from hpattn_dist.kernels import select_kernel
from hpattn_dist.kernels.manual import TILE_ELEMENTS
from hpattn_dist.precision import DTYPES, acc_dtype
from hpattn_dist.merge import merge_into
from hpattn_dist.strategies import sharded_attention
from hpattn_dist.tools.bench_config import BenchConfig
from hpattn_dist.tools.bench_measure import barrier, gather_objects, PeakMemory, time_call


def ring_emulation(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, blocks: int, backend: str,
                   warmup: int, repeats: int) -> dict[str, Any]:
    """One process: ring per-block kernel+merge over ``blocks`` blocks vs one fused call.

    ``q, k, v, dout``: ``[B, H, N, D]``. The blocked path computes, for each of the P query
    blocks, the P key blocks' ``(out, lse)`` and merges them (what P ring ranks do together), and
    the blocked backward with the final lse; the fused path is one kernel call on the full N.
    Returns median times and ``ratio = t_fused / t_blocked`` for forward and forward+backward.
    """
    kernel = select_kernel(backend, q)
    scale = q.shape[-1] ** -0.5
    acc = acc_dtype(q.dtype)
    bounds = shard_bounds(q.shape[2], blocks)
    dev = q.device

    def fused() -> tuple[Tensor, Tensor]:
        out, lse = kernel.forward(q, k, v, scale)
        return out.to(q.dtype), lse

    def blocked() -> tuple[Tensor, Tensor]:
        outs, lses = [], []
        for qs, qe in bounds:
            out = torch.zeros((*q.shape[:2], qe - qs, q.shape[3]), dtype=acc, device=dev)
            lse = torch.full((*q.shape[:2], qe - qs), -math.inf, dtype=acc, device=dev)
            for ks, ke in bounds:
                bo, bl = kernel.forward(q[:, :, qs:qe], k[:, :, ks:ke], v[:, :, ks:ke], scale)
                merge_into(out, lse, bo, bl)
            outs.append(out.to(q.dtype))
            lses.append(lse)
        return torch.cat(outs, 2), torch.cat(lses, 2)

    def fused_bwd() -> None:
        out, lse = fused()
        delta = (dout.to(acc) * out.to(acc)).sum(-1)
        kernel.backward(dout, q, k, v, out, lse, delta, scale)

    def blocked_bwd() -> None:
        out, lse = blocked()
        delta = (dout.to(acc) * out.to(acc)).sum(-1)
        dk = torch.zeros(k.shape, dtype=acc, device=dev)
        dv = torch.zeros(v.shape, dtype=acc, device=dev)
        for qs, qe in bounds:
            dq = torch.zeros((*q.shape[:2], qe - qs, q.shape[3]), dtype=acc, device=dev)
            for ks, ke in bounds:
                dq_b, dk_b, dv_b, _ = kernel.backward(
                    dout[:, :, qs:qe], q[:, :, qs:qe], k[:, :, ks:ke], v[:, :, ks:ke],
                    out[:, :, qs:qe], lse[:, :, qs:qe], delta[:, :, qs:qe], scale)
                dq += dq_b
                dk[:, :, ks:ke] += dk_b
                dv[:, :, ks:ke] += dv_b

    with torch.no_grad():
        res = {}
        for name, fn in (("fused_fwd", fused), ("blocked_fwd", blocked),
                         ("fused_fwd_bwd", fused_bwd), ("blocked_fwd_bwd", blocked_bwd)):
            res[name + "_s"] = statistics.median(time_call(fn, warmup, repeats, dev, collective=False))
        res["max_abs_diff_out"] = float((fused()[0].double() - blocked()[0].double()).abs().max())
    res["ratio_fwd"] = res["fused_fwd_s"] / res["blocked_fwd_s"]
    res["ratio_fwd_bwd"] = res["fused_fwd_bwd_s"] / res["blocked_fwd_bwd_s"]
    res["kernel"] = kernel.name
    return res


def run_emulation(cfg: BenchConfig, device: torch.device,
                  progress: Optional[Callable[[str], None]] = None) -> list[dict[str, Any]]:
    """The emulation mode: rank 0 measures, the other ranks wait (collective)."""
    rank = resolve_group(None).rank
    records: list[dict[str, Any]] = []
    if rank == 0:
        for nside in cfg.nsides:
            npix = nside2npix(nside)
            q, k, v, dout = cfg.head_tensors(npix, cfg.seed, device)
            for blocks in cfg.blocks:
                if progress:
                    progress(f"nside {nside}: emulating {blocks} ring blocks")
                rec = {"impl": "ring_emulation", "nside": nside, "npix": npix, "blocks": blocks,
                       "dtype": cfg.dtype, "batch": cfg.batch, "num_heads": cfg.num_heads,
                       "head_dim": cfg.head_dim, "backend": cfg.backend,
                       "threads": torch.get_num_threads()}
                rec.update(ring_emulation(q, k, v, dout, blocks, cfg.backend, cfg.warmup, cfg.repeats))
                records.append(rec)
    return gather_objects(records)[0]


def run_memory(cfg: BenchConfig, device: torch.device,
               progress: Optional[Callable[[str], None]] = None) -> list[dict[str, Any]]:
    """Peak memory per rank of ``ring`` attention with the manual kernel, fwd+bwd (collective)."""
    info = resolve_group(None)
    world, rank = info.world_size, info.rank
    dtype, head_dim = DTYPES[cfg.dtype], cfg.head_dim
    elt = torch.empty((), dtype=dtype).element_size()
    acc = torch.empty((), dtype=acc_dtype(dtype)).element_size()
    records = []
    for nside in cfg.nsides:
        npix = nside2npix(nside)
        n_local = shard_sizes(npix, world)[rank]
        if progress:
            progress(f"nside {nside}: peak memory of ring/manual on {world} ranks")
        q, k, v, dout = cfg.head_tensors(n_local, cfg.seed + rank, device)
        q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)

        def fwd_bwd() -> None:
            sharded_attention("ring", q, k, v, None, backend="manual").backward(dout)
            q.grad = k.grad = v.grad = None

        fwd_bwd()  # warm-up: thread pools and allocator caches are not the kernel's memory
        barrier()
        with PeakMemory(device) as mem:
            fwd_bwd()
        rows = gather_objects(mem.bytes)
        bh = cfg.batch * cfg.num_heads
        records.append({
            "impl": "ring/manual", "nside": nside, "npix": npix, "world_size": world,
            "dtype": cfg.dtype, "batch": cfg.batch, "num_heads": cfg.num_heads, "head_dim": head_dim,
            "peak_mem_bytes_per_rank": rows, "peak_mem_method": mem.method,
            "inputs_bytes_per_rank": 4 * bh * n_local * head_dim * elt,
            "full_score_matrix_bytes": bh * npix * npix * acc,
            "local_score_rows_bytes": bh * max(shard_sizes(npix, world)) * npix * acc,
            "score_tile_bound_bytes": TILE_ELEMENTS * acc,
        })
    return records
