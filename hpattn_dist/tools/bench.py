"""``hpattn-dist bench``: time, peak memory and communication per rank of the distributed layer.

Modes (``BenchConfig.mode``):

``scaling`` (default)
    For each nside and strategy: the distributed layer (``[B, N_r, E]`` shard per rank) forward
    (under ``no_grad``) and forward+backward, median over ``repeats`` after ``warmup``; each
    repeat starts after a barrier and its time is the SLOWEST rank's. Then, in the same run and on
    the same input, two baselines:

    * ``oracle``: the single-process layer ``SpatialSelfAttention`` (same ``attn_backend``) on the
      full field, run by rank 0 with ``P * threads_per_rank`` threads (the same total threads)
      while the other ranks wait. ``efficiency = t_oracle / t_ours`` (1.0 = perfect scaling).
    * ``deepspeed_ulysses`` (when deepspeed is importable, heads % P == 0 and N % P == 0):
      ``deepspeed.sequence.layer.DistributedAttention`` around PyTorch SDPA, with the same
      projections and weights. ``speed_vs_peer = t_peer / t_ours`` (>= 1: we are faster).

    Bytes sent per rank come from :func:`hpattn_dist.count_communication` around one extra
    forward+backward; ``expected_bytes`` is the closed form of Note [communication volume] (``strategies/auto.py``).

``emulation``
    One process (rank 0): the ring's per-block path -- ``P x P`` calls of the block kernel on
    ``N/P x N/P`` blocks plus the online-softmax merge, forward and backward -- against ONE call
    of the same kernel on the full ``N``. ``ratio = t_fused / t_blocks`` (target >= 0.9).

``memory``
    Peak memory per rank of ``ring`` attention alone with the ``manual`` kernel (forward+backward,
    ``[B, H, N_r, D]`` inputs) next to the size of one full ``N x N`` (and ``N_r x N``) score
    matrix, showing that no such tile is ever allocated (Note [bounded score tile]).

``masks``
    What the ring's masked-key compaction saves (Note [masked key compaction] in
    ``masks.py``: keys masked in every batch element are neither sent nor computed, and
    a mask shared by the batch leaves no bias, so the fused kernels apply). ``ring_attention``
    alone on ``[B, H, N_r, D]`` inputs with a land mask (``key_mask`` False = land, the same in
    every batch element; the first ``round(f * N_r)`` pixels of a shard are land) for each land
    fraction ``f`` of ``land_fractions`` (0 always included: the baseline, measured in each
    scenario, so the two baselines show the run-to-run drift) in two scenarios:
    ``one_rank`` (rank 0's pixels only, every other rank all ocean) and ``global`` (every rank).
    Per rank: forward and forward+backward time, forward bytes sent (counted), keys and key blocks
    computed and the compute proxy ``scores = B * H * N_r * sum_s M_s`` (``M_s`` keys of rank s
    kept, from the known mask; the backward recomputes as many), and their ratios to ``f = 0``.

``local``
    Sharded HEALPix local attention (issue 17): for each nside and window mode of
    ``local_modes``, on the same field ``[B, N, E]`` and weights,
    :class:`~hpattn_dist.local.DistributedLocalSpatialSelfAttention` with ``window_nside = nside /
    8`` (:data:`LOCAL_WINDOW_DIV`, at least 1), on P ranks; global ``ring`` attention (the
    distributed layer) on the same shards; and the same local layer in ONE process (rank 0, a
    group of its own, no communication) with ``P * threads_per_rank`` threads while the other
    ranks wait (``local_layers=False`` skips these three). Times as in ``scaling``;
    ``efficiency = t_single / t_local`` (goal >= 0.9), ``vs ring = t_ring / t_local``; peak
    memory (Note [peak memory]) and bytes sent (counted: the halo rows) per rank. Then, on rank 0
    with its own threads, the attention alone (``healpix_local_attention`` on ``[B, H, N, D]``)
    against FlexAttention with a block mask of the same windows, alternating, forward (Note [flex
    baseline] in :mod:`hpattn_dist.tools.bench_flex`): ``vs flex = t_flex / t_ours`` from the
    minima, and our ``f+b / f``.

``cross``
    Cross-grid attention (issue 18): an encoder (queries on the latent grid ``latent_nside``,
    keys and values on the data grid ``data_nside`` with ``kv_dim`` features) and a decoder
    (queries on the data grid, keys and values on the latent grid), each
    :class:`~hpattn_dist.cross.DistributedSpatialCrossAttention` on P ranks (both fields sharded
    by :func:`hpattn_dist.healpix.scatter`; strategies default ``ring, ulysses``) against the
    single-device :class:`~hpattn_dist.cross.SpatialCrossAttention` with the same weights in ONE
    process (rank 0) with ``P * threads_per_rank`` threads. Times as in ``scaling``
    (``efficiency = t_oracle / t``), peak memory per rank next to the oracle's and to the size of
    one ``Nq x Nk`` score matrix, bytes sent per rank in the forward and the backward (counted)
    against :func:`expected_cross_bytes`. Each entry of ``windows`` other than ``"none"``
    (``"cell:4"``, ``"neighbourhood:4"``) runs the layers with ``window_nside`` and ``mode`` (the
    locality option: the halo exchange, ring / auto only), compares its bytes with
    :func:`hpattn_dist.local.window_traffic` and adds the fractions of the ring's bytes, of the
    cell blocks and of the (query, key) pairs it skips; its 1-process baseline is the windowed
    layer itself on rank 0 alone (Note [windowed baseline]).

Bytes: the closed forms (uneven shards and hybrid included) are Note [communication volume] in
:mod:`hpattn_dist.strategies.auto` (:func:`~hpattn_dist.strategies.auto.communication_volume`);
bench compares them with the counted bytes (``payload_bytes_per_rank``, shape handshakes
``*.meta`` excluded).

Tables and the plot: :mod:`hpattn_dist.tools.bench_report`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from hpattn_dist.comm.groups import resolve_group
from hpattn_dist.tools.bench_report import check_plot_target, format_tables, plot_scaling

# Re-exported: callers (the command line, launch/ scripts, tests) read these names here.
from hpattn_dist.tools.bench_config import (
    BenchConfig, CROSS_CASES, CROSS_STRATEGIES, cross_window, LOCAL_WINDOW_DIV, MASK_SCENARIOS, MODES,
    SCHEMA,
)
from hpattn_dist.tools.bench_measure import gather_objects, payload_bytes, PeakMemory, time_call
from hpattn_dist.tools.bench_scaling import DeepSpeedUlyssesLayer, expected_bytes, run_scaling
from hpattn_dist.tools.bench_kernels import ring_emulation, run_emulation, run_memory
from hpattn_dist.tools.bench_local import run_local
from hpattn_dist.tools.bench_cross import expected_cross_bytes, run_cross, windowed_cross_bytes
from hpattn_dist.tools.bench_masks import land_mask, land_pixels, run_masks

__all__ = [
    "BenchConfig", "cli_bench", "CROSS_CASES", "CROSS_STRATEGIES", "cross_window", "DeepSpeedUlyssesLayer",
    "expected_bytes", "expected_cross_bytes", "land_mask", "land_pixels", "LOCAL_WINDOW_DIV",
    "MASK_SCENARIOS", "MODES", "payload_bytes", "PeakMemory", "ring_emulation", "run_cross",
    "run_emulation", "run_local", "run_masks", "run_memory", "run_scaling", "SCHEMA", "time_call",
    "windowed_cross_bytes",
]


def cli_bench(cfg: BenchConfig, args: Any, device: torch.device) -> int:
    """``hpattn-dist bench`` on this rank (process group initialised); returns the exit code."""
    info = resolve_group(None)
    world, rank = info.world_size, info.rank
    threads = torch.get_num_threads()
    progress = _stderr if rank == 0 else None
    if getattr(args, "plot", None) is not None:
        # before any measurement; rank 0 writes the plot, so its verdict holds on every rank
        problem = None
        if rank == 0:
            try:
                check_plot_target(args.plot, cfg.mode)
            except ValueError as err:
                problem = str(err)
        problem = gather_objects(problem)[0]
        if problem is not None:
            raise ValueError(problem)
    load_before = os.getloadavg()
    if cfg.mode == "scaling":
        records = run_scaling(cfg, device, threads, progress)
    elif cfg.mode == "emulation":
        records = run_emulation(cfg, device, progress)
    elif cfg.mode == "masks":
        records = run_masks(cfg, device, progress)
    elif cfg.mode == "local":
        records = run_local(cfg, device, threads, progress)
    elif cfg.mode == "cross":
        records = run_cross(cfg, device, threads, progress)
    else:
        records = run_memory(cfg, device, progress)
    if rank == 0:
        print(f"hpattn-dist bench --mode {cfg.mode}: P={world} x {threads} threads, {cfg.dtype}, "
              f"B={cfg.batch}, E={cfg.embed_dim}, H={cfg.num_heads}, backend={cfg.backend}, "
              f"device={device.type}, load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}")
        print(format_tables(records, cfg.mode), flush=True)
        report = {"schema": SCHEMA, "mode": cfg.mode, "world_size": world, "threads_per_rank": threads,
                  "device": device.type, "torch": torch.__version__,
                  "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                  else os.cpu_count(),
                  # 1-minute load average before and after: other processes skew CPU timings
                  "load_average_1min": [load_before[0], os.getloadavg()[0]],
                  "config": dataclasses.asdict(cfg), "records": records}
        if args.json_path is not None:
            Path(args.json_path).write_text(json.dumps(report, indent=1))
        if args.plot is not None and not os.environ.get("HPATTN_DIST_LOCAL_LAUNCH"):
            plot_scaling([report], args.plot)
    return 0


def _stderr(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)
