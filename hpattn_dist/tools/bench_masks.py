"""``hpattn-dist bench --mode masks``: what the ring's masked-key compaction saves (Note [masked key
compaction]), per land fraction, in two scenarios.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from hpattn_dist.comm.counters import count_communication
from hpattn_dist.comm.groups import resolve_group
from hpattn_dist.healpix import nside2npix, shard_sizes
from hpattn_dist.kernels import select_kernel
from hpattn_dist.precision import DTYPES
from hpattn_dist.strategies import ring_attention
from hpattn_dist.tools.bench_config import BenchConfig, MASK_SCENARIOS
from hpattn_dist.tools.bench_measure import gather_objects, payload_bytes, ratio_or_none, time_call
from hpattn_dist.tools.bench_scaling import expected_bytes


def land_pixels(sizes: Sequence[int], fraction: float, scenario: str) -> list[int]:
    """Land (masked) pixels per rank: ``round(fraction * N_s)`` on rank 0 only (``"one_rank"``)
    or on every rank (``"global"``); ``sizes`` are the ``N_s`` in rank order."""
    if scenario not in MASK_SCENARIOS:
        raise ValueError(f"scenario must be one of {MASK_SCENARIOS}, got {scenario!r}")
    return [round(fraction * n) if scenario == "global" or s == 0 else 0
            for s, n in enumerate(sizes)]


def land_mask(batch: int, n_local: int, n_land: int, device: torch.device) -> Tensor:
    """``key_mask`` ``[B, N_r]`` (True = ocean, may be attended to): the first ``n_land`` pixels
    of the shard are land, alike in every batch element (a land mask)."""
    mask = torch.ones(batch, n_local, dtype=torch.bool, device=device)
    mask[:, :n_land] = False
    return mask


def _masked_ring_case(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, mask: Tensor, cfg: BenchConfig,
                      device: torch.device) -> dict[str, Any]:
    """Times (this rank's and the slowest rank's), counted bytes and the compute proxy of
    ``ring_attention`` with ``key_mask=mask`` on this rank's ``[B, H, N_r, D]`` shard
    (collective)."""
    def fwd() -> None:
        with torch.no_grad():
            ring_attention(q, k, v, backend=cfg.backend, key_mask=mask)

    def fwd_bwd() -> None:
        qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
        ring_attention(qg, kg, vg, backend=cfg.backend, key_mask=mask).backward(dout)

    rec: dict[str, Any] = {}
    for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        rows = gather_objects(time_call(fn, cfg.warmup, cfg.repeats, device, slowest=False))
        rec[f"{name}_s_per_rank"] = [statistics.median(t) for t in rows]
        rec[f"{name}_s"] = statistics.median(max(col) for col in zip(*rows))  # slowest rank's
    with count_communication() as fwd_stats:
        fwd()
    with count_communication() as stats:
        fwd_bwd()
    b, h, n_local, _ = q.shape
    rows = gather_objects({
        "n": n_local, "fwd_bytes": fwd_stats.bytes_sent["ring.forward"],
        "bytes": payload_bytes(stats.bytes_sent),
        # keys kept by the compaction: unmasked in at least one batch element
        "kept": int(mask.any(dim=0).sum()),
    })
    sizes, kept = [r["n"] for r in rows], [r["kept"] for r in rows]
    rec.update({
        "kept_keys_per_rank": kept,
        "fwd_bytes_per_rank": [r["fwd_bytes"] for r in rows],
        "payload_bytes_per_rank": [r["bytes"] for r in rows],
        # each rank computes its N_r queries against every kept key block, own block included
        "key_blocks_computed_per_rank": [sum(m > 0 for m in kept) if n else 0 for n in sizes],
        "keys_computed_per_rank": [sum(kept) if n else 0 for n in sizes],
        "scores_computed_per_rank": [b * h * n * sum(kept) for n in sizes],
    })
    return rec


def run_masks(cfg: BenchConfig, device: torch.device,
              progress: Optional[Callable[[str], None]] = None) -> list[dict[str, Any]]:
    """The masks mode on every rank (collective); returns the records (same on every rank)."""
    info = resolve_group(None)
    world, rank = info.world_size, info.rank
    dtype, head_dim = DTYPES[cfg.dtype], cfg.head_dim
    fractions = sorted({0.0, *(float(f) for f in cfg.land_fractions)})
    records: list[dict[str, Any]] = []
    for nside in cfg.nsides:
        npix = nside2npix(nside)
        sizes = shard_sizes(npix, world)
        q, k, v, dout = cfg.head_tensors(sizes[rank], cfg.seed + rank, device)
        # a land mask is shared by the batch: nothing is left to mask after compaction, no bias
        kernel = select_kernel(cfg.backend, q, has_bias=False).name
        for scenario in MASK_SCENARIOS:
            # each scenario measures its own 0 % baseline: the two tell the run-to-run drift
            base: Optional[dict[str, Any]] = None
            for fraction in fractions:
                land = land_pixels(sizes, fraction, scenario)
                if progress:
                    progress(f"nside {nside}: ring, land {fraction:.0%} on "
                             f"{'rank 0' if scenario == 'one_rank' else 'every rank'}")
                mask = land_mask(cfg.batch, sizes[rank], land[rank], device)
                rec = {"impl": "ring", "nside": nside, "npix": npix, "world_size": world,
                       "dtype": cfg.dtype, "batch": cfg.batch, "num_heads": cfg.num_heads,
                       "head_dim": head_dim, "backend": cfg.backend, "kernel": kernel,
                       "scenario": scenario, "land_fraction": fraction,
                       "land_rank": 0 if scenario == "one_rank" else None,
                       "sizes": sizes, "land_pixels_per_rank": land,
                       **_masked_ring_case(q, k, v, dout, mask, cfg, device)}
                rec["expected_bytes_per_rank"] = [
                    expected_bytes("ring", rec["kept_keys_per_rank"], r, cfg.batch, cfg.num_heads,
                                   head_dim, dtype) for r in range(world)]
                base = base or rec
                rec["savings_vs_no_land"] = {
                    "fwd_bytes_ratio": ratio_or_none(sum(rec["fwd_bytes_per_rank"]),
                                              sum(base["fwd_bytes_per_rank"])),
                    "fwd_bytes_ratio_per_rank": [ratio_or_none(a, b) for a, b in zip(
                        rec["fwd_bytes_per_rank"], base["fwd_bytes_per_rank"])],
                    "scores_ratio": ratio_or_none(sum(rec["scores_computed_per_rank"]),
                                           sum(base["scores_computed_per_rank"])),
                    "fwd_time_ratio": rec["fwd_s"] / base["fwd_s"],
                    "fwd_bwd_time_ratio": rec["fwd_bwd_s"] / base["fwd_bwd_s"],
                    "fwd_time_ratio_per_rank": [a / b for a, b in zip(
                        rec["fwd_s_per_rank"], base["fwd_s_per_rank"])],
                    "fwd_bwd_time_ratio_per_rank": [a / b for a, b in zip(
                        rec["fwd_bwd_s_per_rank"], base["fwd_bwd_s_per_rank"])],
                }
                records.append(rec)
    return records
