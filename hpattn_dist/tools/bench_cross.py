"""``hpattn-dist bench --mode cross``: cross-grid attention (encoder, decoder; optionally windowed)
against its single-device layer, with the bytes each rank sends next to their closed form.

Note [windowed baseline]
    The windowed oracle ``SpatialCrossAttention(..., window_nside=W)`` is a reference: it scores
    all ``Nq x Nk`` pairs and masks them (several ``Nq x Nk`` tensors, GBs at nside 64 -> 16), so
    timing P ranks against it would measure the window, not the distribution. A windowed row is
    timed against the same windowed layer (the halo path) on a group of one, which computes only
    the allowed cell blocks, as ``local`` mode does; the weights and inputs are the same.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from hpattn_dist.comm.counters import count_communication
from hpattn_dist.comm.groups import resolve_group
from hpattn_dist.healpix import nside2npix, shard_sizes
from hpattn_dist.local.traffic import WindowTraffic, window_traffic
from hpattn_dist.kernels import select_kernel
from hpattn_dist.precision import DTYPES, acc_dtype
from hpattn_dist.strategies.auto import choose_strategy
from hpattn_dist.tools.verify_cases import strategy_variants
from hpattn_dist.tools.bench_config import BenchConfig, CROSS_STRATEGIES, cross_window
from hpattn_dist.tools.bench_measure import (
    gather_objects, gather_per_rank, layer_times, payload_bytes, ratio_or_none, single_process_times,
)


def expected_cross_bytes(
    strategy: str, q_sizes: Sequence[int], k_sizes: Sequence[int], rank: int, batch: int, heads: int,
    head_dim: int, dtype: torch.dtype,
) -> Optional[dict[str, int]]:
    """Closed-form bytes rank ``rank`` sends in one forward+backward of cross-attention over every
    source pixel (no mask, no window), shape handshakes excluded; None for hybrid. ``"auto"`` is
    resolved as the library resolves it.

    With ``s`` the bytes of one element of q/k/v, ``a`` of the accumulators, ``Nq_r`` / ``Nk_r``
    the query / key shard sizes and ``P`` their number:

    * ring (queries stay, K/V blocks rotate; README, Cross-grid attention): forward
      ``2 s B H D sum_{j < P-1} Nk_{(r - j) mod P}`` (the K and V block passed on at each of the
      ``P - 1`` steps: its own first, then those received); backward the same K/V again plus
      ``2 a B H D Nk`` (the dK/dV accumulators travel the whole ring);
    * ulysses (``h = H / P`` heads per rank): forward ``s B D ((H - h)(Nq_r + 2 Nk_r) + h (Nq -
      Nq_r))`` (q and K/V to head-parallel layout, the output back); backward ``s B D ((H - h)
      Nq_r + h (Nq - Nq_r) + 2 h (Nk - Nk_r))``.
    """
    p = len(q_sizes)
    if strategy == "auto":
        choice = choose_strategy(heads, p, dtype=dtype)
        strategy = choice.strategy
    if strategy not in ("ring", "ulysses"):
        return None
    s = torch.empty((), dtype=dtype).element_size()
    a = torch.empty((), dtype=acc_dtype(dtype)).element_size()
    n_q, n_k = sum(q_sizes), sum(k_sizes)
    if strategy == "ring":
        passed = sum(k_sizes[(rank - j) % p] for j in range(p - 1))
        fwd = 2 * s * batch * heads * head_dim * passed
        bwd = fwd + (2 * a * batch * heads * head_dim * n_k if p > 1 else 0)
    else:
        h, nq_r, nk_r = heads // p, q_sizes[rank], k_sizes[rank]
        fwd = s * batch * head_dim * ((heads - h) * (nq_r + 2 * nk_r) + h * (n_q - nq_r))
        bwd = s * batch * head_dim * ((heads - h) * nq_r + h * (n_q - nq_r) + 2 * h * (n_k - nk_r))
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd}


def windowed_cross_bytes(traffic: WindowTraffic, batch: int, heads: int, head_dim: int,
                         dtype: torch.dtype) -> list[dict[str, int]]:
    """Bytes each rank sends in one forward+backward of windowed cross-attention without masks:
    the halo K/V rows of :func:`hpattn_dist.local.window_traffic` forward, and back the gradient
    of every row it received (dK and dV, in the accumulation dtype)."""
    acc = torch.empty((), dtype=acc_dtype(dtype)).element_size()
    out = []
    for t in traffic.ranks:
        bwd = 2 * batch * heads * head_dim * acc * t.rows_received
        out.append({"forward": t.bytes_sent, "backward": bwd, "total": t.bytes_sent + bwd})
    return out


def _locality_kwargs(window: Optional[tuple[str, int]]) -> dict[str, Any]:
    """The layers' locality keywords (none without a window)."""
    return {} if window is None else {"window_nside": window[1], "mode": window[0]}


def _fwd_bwd_bytes(layer: nn.Module, inputs: tuple[Tensor, ...], g: Tensor) -> dict[str, int]:
    """Payload bytes this rank sends in the forward and in the backward of one call (collective)."""
    xg = [t.detach().requires_grad_(True) for t in inputs]
    layer.zero_grad(set_to_none=True)
    with count_communication() as fwd:
        y = layer(*xg)
    with count_communication() as bwd:
        y.backward(g)
    return {"forward": payload_bytes(fwd.bytes_sent), "backward": payload_bytes(bwd.bytes_sent)}


def run_cross(cfg: BenchConfig, device: torch.device, threads_per_rank: int,
              progress: Optional[Callable[[str], None]] = None) -> list[dict[str, Any]]:
    """The cross mode on every rank (collective); returns the records (same on every rank).

    For each case (encoder: queries on the latent grid ``[B, Nq, E]``, keys and values on the data
    grid ``[B, Nk, C]``; decoder: queries on the data grid, keys and values on the latent grid
    ``[B, Nk, E]``) and each window: the single-device
    :class:`~hpattn_dist.cross.SpatialCrossAttention` (with a window: Note [windowed baseline])
    on the full fields, run by rank 0 with ``P * threads_per_rank`` threads while the other ranks
    wait, then :class:`~hpattn_dist.cross.DistributedSpatialCrossAttention` with the same weights
    for each strategy on the shards :func:`hpattn_dist.healpix.scatter` takes. Times as in
    ``scaling``; peak memory per rank (Note [peak memory]) next to the ``Nq x Nk`` score matrix;
    bytes sent per rank in the forward and in the backward (counted) against
    :func:`expected_cross_bytes`, or with a window against :func:`windowed_cross_bytes`, and what
    the window skips.
    """
    from hpattn_dist import healpix
    from hpattn_dist.cross import DistributedSpatialCrossAttention, SpatialCrossAttention

    info = resolve_group(None)
    world, rank = info.world_size, info.rank
    dtype = DTYPES[cfg.dtype]
    head_dim = cfg.head_dim
    acc = torch.empty((), dtype=acc_dtype(dtype)).element_size()
    say = progress or (lambda _msg: None)
    windows = [(spec, cross_window(spec, cfg.latent_nside)) for spec in cfg.windows]
    solo = None  # rank 0 alone: the windowed layer's 1-process baseline
    if world > 1 and any(w is not None for _, w in windows):
        solo = dist.new_group([0])  # collective: every rank takes part
    probe = torch.empty(1, cfg.num_heads, 1, head_dim, dtype=dtype, device=device)
    kernel = select_kernel(cfg.backend, probe).name
    runs = []  # (strategy, label, ulysses degree, why it cannot run)
    for strategy in cfg.strategies or CROSS_STRATEGIES:
        variants = strategy_variants(strategy, world, cfg.num_heads, proper_only=True)
        runs += [(strategy, label, u, None) for label, u in variants] or [
            (strategy, strategy, None, f"no Ulysses degree 1 < U < P={world} divides H={cfg.num_heads}")]
    records: list[dict[str, Any]] = []
    for case in cfg.cross_cases:
        encoder = case == "encoder"
        nside_q, nside_k = (cfg.latent_nside, cfg.data_nside) if encoder else (cfg.data_nside, cfg.latent_nside)
        kv_dim = cfg.kv_dim if encoder else cfg.embed_dim
        npix_q, npix_k = nside2npix(nside_q), nside2npix(nside_k)
        q_sizes, k_sizes = shard_sizes(npix_q, world), shard_sizes(npix_k, world)
        gen = torch.Generator().manual_seed(cfg.seed)
        x_q = torch.randn(cfg.batch, npix_q, cfg.embed_dim, generator=gen).to(device=device, dtype=dtype)
        x_kv = torch.randn(cfg.batch, npix_k, kv_dim, generator=gen).to(device=device, dtype=dtype)
        g = torch.randn(cfg.batch, npix_q, cfg.embed_dim, generator=gen).to(device=device, dtype=dtype)
        local = tuple(healpix.scatter(t) for t in (x_q, x_kv, g))  # [B, Nq_r, E], [B, Nk_r, C], [B, Nq_r, E]
        bh = cfg.batch * cfg.num_heads
        for spec, window in windows:
            base = {"case": case, "window": spec, "window_mode": window and window[0],
                    "window_nside": window and window[1], "nside_q": nside_q, "nside_k": nside_k,
                    "npix_q": npix_q, "npix_k": npix_k, "q_sizes": q_sizes, "k_sizes": k_sizes,
                    "dtype": cfg.dtype, "batch": cfg.batch, "embed_dim": cfg.embed_dim,
                    "num_heads": cfg.num_heads, "head_dim": head_dim, "kv_dim": kv_dim,
                    "backend": cfg.backend,
                    "full_score_matrix_bytes": bh * npix_q * npix_k * acc,
                    "local_score_rows_bytes": bh * max(q_sizes) * npix_k * acc}
            traffic = None if window is None else window_traffic(
                q_sizes, k_sizes, window[1], window[0], batch=cfg.batch, heads=cfg.num_heads,
                head_dim=head_dim, itemsize=torch.empty((), dtype=dtype).element_size())
            torch.manual_seed(cfg.seed)  # the same weights on every rank (they are checked)
            oracle = SpatialCrossAttention(cfg.embed_dim, cfg.num_heads, kv_dim=kv_dim, attn_backend=cfg.backend)
            oracle = oracle.to(device=device, dtype=dtype)
            name = "1-process layer" if window is None else "windowed layer, 1 process"
            say(f"{case} {nside_k} -> {nside_q}, window {spec}: {name}, {world * threads_per_rank} threads")
            single_rec = {**base, "impl": "oracle" if window is None else "windowed_single",
                          "strategy": None if window is None else "ring", "kernel": cfg.backend,
                          "world_size": 1, "threads_per_rank": world * threads_per_rank}
            if rank == 0:
                single = oracle
                if window is not None:  # Note [windowed baseline]
                    single = DistributedSpatialCrossAttention(
                        cfg.embed_dim, cfg.num_heads, kv_dim=kv_dim, attn_backend=cfg.backend,
                        strategy="ring", process_group=solo, **_locality_kwargs(window))
                    single.load_state_dict(oracle.state_dict())
                    single = single.to(device=device, dtype=dtype)
                res = single_process_times(single, (x_q, x_kv), g, cfg, device, world * threads_per_rank)
                single_rec.update(res, peak_mem_bytes_per_rank=[res.pop("peak_mem")["bytes"]],
                                  bytes_per_rank=[payload_bytes(res.pop("comm")["bytes_sent"])])
            single_rec = gather_objects(single_rec)[0]
            records.append(single_rec)
            for strategy, label, degree, refusal in runs:
                rec = {**base, "impl": "hpattn_dist", "strategy": label, "kernel": kernel,
                       "world_size": world, "threads_per_rank": threads_per_rank}
                if refusal is not None:
                    records.append({**rec, "skipped": refusal})
                    continue
                say(f"{case} {nside_k} -> {nside_q}, window {spec}: {label}, {world} ranks x "
                    f"{threads_per_rank} threads")
                try:
                    layer = DistributedSpatialCrossAttention(
                        cfg.embed_dim, cfg.num_heads, kv_dim=kv_dim, attn_backend=cfg.backend,
                        strategy=strategy, ulysses_degree=degree, **_locality_kwargs(window))
                    layer.load_state_dict(oracle.state_dict())
                    layer = layer.to(device=device, dtype=dtype)
                    with torch.no_grad():
                        layer(*local[:2])  # configuration errors (ValueError on every rank) surface here
                except ValueError as err:
                    rec["skipped"] = str(err)
                    say(f"  skipped: {err}")
                    records.append(rec)
                    continue
                rec.update(gather_per_rank(layer_times(layer, local[:2], local[2], cfg, device)))
                split = gather_objects(_fwd_bwd_bytes(layer, local[:2], local[2]))
                rec["fwd_bytes_per_rank"] = [b["forward"] for b in split]
                rec["bwd_bytes_per_rank"] = [b["backward"] for b in split]
                rec["expected_bytes_per_rank"] = [
                    expected_cross_bytes(strategy, q_sizes, k_sizes, r, cfg.batch, cfg.num_heads, head_dim, dtype)
                    for r in range(world)] if traffic is None else windowed_cross_bytes(
                        traffic, cfg.batch, cfg.num_heads, head_dim, dtype)
                rec["efficiency_fwd"] = single_rec["fwd_s"] / rec["fwd_s"]
                rec["efficiency_fwd_bwd"] = single_rec["fwd_bwd_s"] / rec["fwd_bwd_s"]
                rec["peak_mem_vs_single"] = ratio_or_none(max(rec["peak_mem_bytes_per_rank"]),
                                                   single_rec["peak_mem_bytes_per_rank"][0])
                if traffic is not None:
                    ring_fwd = sum(t.ring_bytes_sent for t in traffic.ranks)
                    rec["locality"] = {
                        # of the dense ring's forward K/V bytes, counted here
                        "fwd_bytes_skipped": ratio_or_none(ring_fwd - sum(rec["fwd_bytes_per_rank"]), ring_fwd),
                        "pairs_skipped": traffic.pairs_skipped, "blocks_skipped": traffic.blocks_skipped,
                        "window_traffic": traffic.as_dict()}
                records.append(rec)
    return records
