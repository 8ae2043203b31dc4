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
    Sharded HEALPix local attention (issue 17): for each nside, on the same field ``[B, N, E]``
    and weights, :class:`~hpattn_dist.local.DistributedLocalSpatialSelfAttention` with
    neighbourhood windows, ``window_nside = nside / 8`` (:data:`LOCAL_WINDOW_DIV`, at least 1),
    on P ranks; global ``ring`` attention (the distributed layer) on the same shards; and the
    same local layer in ONE process (rank 0, a group of its own, no communication) with
    ``P * threads_per_rank`` threads while the other ranks wait. Times as in ``scaling``;
    ``efficiency = t_single / t_local`` (goal >= 0.9), ``vs ring = t_ring / t_local``; peak
    memory (Note [peak memory]) and bytes sent (counted: the halo rows) per rank.

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

Note [windowed baseline]
    The windowed oracle ``SpatialCrossAttention(..., window_nside=W)`` is a reference: it scores
    all ``Nq x Nk`` pairs and masks them (several ``Nq x Nk`` tensors, GBs at nside 64 -> 16), so
    timing P ranks against it would measure the window, not the distribution. A windowed row is
    timed against the same windowed layer (the halo path) on a group of one, which computes only
    the allowed cell blocks, as ``local`` mode does; the weights and inputs are the same.

Note [peak memory]
    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory
    allocated before the measured call. CPU: the Linux resident-set high-water mark: we reset it
    (``/proc/self/clear_refs`` <- ``5``), run, and report ``VmHWM - VmRSS(before)``. This counts
    every byte the process touched, torch or not; the local launcher sets
    ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors return to the OS and the mark tracks live
    tensors. Where ``clear_refs`` is unavailable it falls back to the ``ru_maxrss`` growth (a lower
    bound, marked ``"method": "ru_maxrss"``).

Bytes: the closed forms (uneven shards and hybrid included) are Note [communication volume] in
:mod:`hpattn_dist.strategies.auto` (:func:`~hpattn_dist.strategies.auto.communication_volume`);
bench compares them with the counted bytes (``payload_bytes_per_rank``, shape handshakes
``*.meta`` excluded).

Tables and the plot: :mod:`hpattn_dist.tools.bench_report`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from hpattn_dist.comm.counters import count_communication
from hpattn_dist.comm.groups import resolve_group
from hpattn_dist.healpix import check_nside, nside2npix, shard_bounds, shard_sizes
from hpattn_dist.local.traffic import WindowTraffic, window_traffic
from hpattn_dist.kernels import select_kernel
from hpattn_dist.kernels.manual import TILE_ELEMENTS
from hpattn_dist.precision import DTYPES, acc_dtype
from hpattn_dist.merge import merge_into
from hpattn_dist.oracle import ATTN_BACKENDS, SpatialSelfAttention
from hpattn_dist.strategies import STRATEGIES, ring_attention, sharded_attention
from hpattn_dist.strategies.auto import choose_strategy, communication_volume
from hpattn_dist.tools.bench_report import check_plot_target, format_tables, plot_scaling
from hpattn_dist.tools.config import load_section
from hpattn_dist.tools.verify_cases import make_distributed_layer, strategy_variants

MODES = ("scaling", "emulation", "memory", "masks", "local", "cross")
LOCAL_WINDOW_DIV = 8
"""Local mode: ``window_nside = max(1, nside // LOCAL_WINDOW_DIV)`` (issue 17's closing note)."""
MASK_SCENARIOS = ("one_rank", "global")
CROSS_CASES = ("encoder", "decoder")
CROSS_STRATEGIES = ("ring", "ulysses")
"""Cross mode: the strategies timed when ``strategies`` is empty."""
SCHEMA = "hpattn_dist.bench/1"


@dataclass
class BenchConfig:
    """What ``hpattn-dist bench`` measures. Defaults: ``hpattn_dist/tools/configs/bench.toml``
    (table ``[bench]``).

    Attributes:
        mode: ``"scaling" | "emulation" | "memory" | "masks" | "local" | "cross"`` (see the
            module docstring).
        nsides: HEALPix resolutions to measure (``N = 12 * nside**2``).
        batch: batch size ``B``.
        embed_dim: ``E`` (divisible by ``num_heads``).
        num_heads: ``H``; DeepSpeed-Ulysses and our ``ulysses`` need ``H % P == 0``.
        strategies: strategies to time; empty = every registered strategy.
        backend: layer ``attn_backend`` (``"auto" | "sdpa" | "manual"``); memory mode always
            uses ``"manual"``.
        dtype: ``float32 | bfloat16 | float16 | float64``.
        warmup: untimed repeats before timing.
        repeats: timed repeats; the median is reported.
        blocks: emulation mode: numbers of ring blocks ``P`` to emulate.
        oracle: time the single-process oracle baseline.
        deepspeed: time DeepSpeed-Ulysses when deepspeed is importable.
        seed: seed of weights and inputs.
        land_fractions: masks mode: fractions of masked ("land") pixels, each in ``[0, 1]``.
        data_nside, latent_nside: cross mode: the data grid and the (coarser or equal) latent grid.
        kv_dim: cross mode: the data grid's feature dimension ``C`` (the encoder's ``kv_dim``).
        cross_cases: cross mode: ``"encoder"`` (data -> latent) and/or ``"decoder"`` (latent -> data).
        windows: cross mode: ``"none"`` (attention to every source pixel) and/or locality windows
            ``"MODE:WINDOW_NSIDE"`` (:func:`hpattn_dist.local.windows.parse_window`).
    """

    mode: str = "scaling"
    nsides: tuple[int, ...] = (16, 32)
    batch: int = 1
    embed_dim: int = 128
    num_heads: int = 4
    strategies: tuple[str, ...] = ()
    backend: str = "auto"
    dtype: str = "float32"
    warmup: int = 1
    repeats: int = 5
    blocks: tuple[int, ...] = (2, 4)
    oracle: bool = True
    deepspeed: bool = True
    seed: int = 0
    land_fractions: tuple[float, ...] = (0.0, 0.3, 0.7, 1.0)
    data_nside: int = 64
    latent_nside: int = 16
    kv_dim: int = 8
    cross_cases: tuple[str, ...] = CROSS_CASES
    windows: tuple[str, ...] = ("none",)

    def __post_init__(self) -> None:
        self.nsides, self.strategies, self.blocks = tuple(self.nsides), tuple(self.strategies), \
            tuple(self.blocks)
        self.land_fractions = tuple(self.land_fractions)
        self.cross_cases, self.windows = tuple(self.cross_cases), tuple(self.windows)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.nsides:
            raise ValueError("nsides must not be empty")
        for n in self.nsides:
            check_nside(n, nest=True)
        for name in ("batch", "embed_dim", "num_heads", "repeats"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        for s in self.strategies:
            if s not in STRATEGIES:
                raise ValueError(f"strategies: unknown strategy {s!r}; registered: {tuple(STRATEGIES)}")
        if self.backend not in ATTN_BACKENDS:
            raise ValueError(f"backend must be one of {ATTN_BACKENDS}, got {self.backend!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if not self.blocks or any(not isinstance(b, int) or b < 1 for b in self.blocks):
            raise ValueError(f"blocks must be positive integers, got {self.blocks!r}")
        if not self.land_fractions or any(
                isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0
                for f in self.land_fractions):
            raise ValueError(f"land_fractions must be numbers in [0, 1], got {self.land_fractions!r}")
        for name in ("data_nside", "latent_nside"):
            check_nside(getattr(self, name), nest=True)
        if self.latent_nside > self.data_nside:
            raise ValueError(f"latent_nside ({self.latent_nside}) must not exceed data_nside "
                             f"({self.data_nside})")
        if isinstance(self.kv_dim, bool) or not isinstance(self.kv_dim, int) or self.kv_dim < 1:
            raise ValueError(f"kv_dim must be a positive integer, got {self.kv_dim!r}")
        if not self.cross_cases or any(c not in CROSS_CASES for c in self.cross_cases):
            raise ValueError(f"cross_cases must be a non-empty list of {CROSS_CASES}, got {self.cross_cases!r}")
        if not self.windows:
            raise ValueError('windows must not be empty (["none"]: no locality window)')
        for spec in self.windows:
            try:
                cross_window(spec, self.latent_nside)
            except ValueError as err:
                raise ValueError(f"windows: {err}, or 'none' (every source pixel)") from None

    def strategy_names(self) -> tuple[str, ...]:
        return self.strategies or tuple(STRATEGIES)

    @classmethod
    def load(cls, path: Optional[Path], **overrides: Any) -> "BenchConfig":
        """Defaults of this class, then table ``[bench]`` of ``path``, then ``overrides``."""
        values = load_section(path, "bench", cls)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


# --------------------------------------------------------------------------------------------
# Measurement helpers
# --------------------------------------------------------------------------------------------


def _proc_status_kib(*keys: str) -> Optional[dict[str, int]]:
    try:
        with open("/proc/self/status") as f:
            rows = dict(line.split(":", 1) for line in f if ":" in line)
        return {k: int(rows[k].split()[0]) for k in keys}
    except (OSError, KeyError, ValueError):
        return None


class PeakMemory:
    """Peak memory of a block of code on this rank (Note [peak memory]); ``.bytes``, ``.method``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes = 0
        self.method = ""

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda.max_memory_allocated"
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._base = _proc_status_kib("VmRSS")["VmRSS"] * 1024
            self.method = "VmHWM"
        except (OSError, TypeError):
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "ru_maxrss"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method == "VmHWM":
            peak = _proc_status_kib("VmHWM")["VmHWM"] * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.bytes = max(0, peak - self._base)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _barrier(group: Optional[dist.ProcessGroup] = None) -> None:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.barrier(group=group)


def time_call(fn: Callable[[], Any], warmup: int, repeats: int, device: torch.device,
              collective: bool = True, slowest: bool = True) -> list[float]:
    """Wall times of ``fn()`` over ``repeats`` runs after ``warmup`` runs.

    With ``collective``, every repeat starts after a barrier and (with ``slowest``) its time is
    the slowest rank's (one all-reduce MAX of the times at the end); ``slowest=False`` returns this
    rank's own times.
    """
    times = []
    for i in range(warmup + repeats):
        if collective:
            _barrier()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    info = resolve_group(None)
    if collective and slowest and info.world_size > 1:
        t = torch.tensor(times, dtype=torch.float64, device=info.comm_device(device))
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times = t.tolist()
    return times


def _gather_objects(obj: Any) -> list[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------------------
# Communication formulas (Note [communication volume] in strategies/auto.py)
# --------------------------------------------------------------------------------------------


def expected_bytes(
    strategy: str, sizes: Sequence[int], rank: int, batch: int, heads: int, head_dim: int,
    dtype: torch.dtype, ulysses_degree: Optional[int] = None,
) -> Optional[dict[str, int]]:
    """Closed-form bytes rank ``rank`` sends in one forward+backward of ``strategy``
    (:func:`hpattn_dist.strategies.auto.communication_volume`, shape handshakes excluded), or
    None when the strategy has no formula. ``"auto"`` is resolved as the library resolves it.
    """
    if strategy == "auto":
        choice = choose_strategy(heads, len(sizes), dtype=dtype)
        strategy, ulysses_degree = choice.strategy, choice.ulysses_degree
    if strategy not in ("ring", "ulysses") and ulysses_degree is None:
        return None
    vol = communication_volume(
        strategy, batch=batch, heads=heads, head_dim=head_dim, sizes=list(sizes), rank=rank,
        itemsize=torch.empty((), dtype=dtype).element_size(),
        acc_itemsize=torch.empty((), dtype=acc_dtype(dtype)).element_size(),
        ulysses_degree=ulysses_degree,
    )
    return {"forward": vol.forward, "backward": vol.backward, "total": vol.total}


def payload_bytes(bytes_sent: dict[str, int]) -> int:
    """Bytes of attention traffic in a ``CommStats.bytes_sent`` dict, without ``*.meta`` labels."""
    return int(sum(n for label, n in bytes_sent.items() if not label.endswith(".meta")))


# --------------------------------------------------------------------------------------------
# The DeepSpeed-Ulysses peer (imported lazily, only here)
# --------------------------------------------------------------------------------------------


class _SdpaLocal(nn.Module):
    """Local attention for DeepSpeed's ``DistributedAttention``: ``[B, N, H/P, D]`` in and out."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)


class DeepSpeedUlyssesLayer(nn.Module):
    """The oracle's projections around ``deepspeed.sequence.layer.DistributedAttention`` + SDPA.

    Input and output: this rank's shard ``[B, N_r, E]`` (N_r equal on every rank).
    """

    def __init__(self, oracle: SpatialSelfAttention, group: Optional[dist.ProcessGroup]) -> None:
        super().__init__()
        if torch.device("cpu") == next(oracle.parameters()).device:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed.comm as ds_comm
        from deepspeed.sequence.layer import DistributedAttention

        if not ds_comm.is_initialized():
            ds_comm.init_distributed(dist_backend=dist.get_backend(), verbose=False)
        self.num_heads, self.embed_dim = oracle.num_heads, oracle.embed_dim
        self.qkv_proj = oracle.qkv_proj
        self.out_proj = oracle.out_proj
        self.attn = DistributedAttention(_SdpaLocal(), group or dist.group.WORLD,
                                         scatter_idx=2, gather_idx=1)

    def forward(self, x: Tensor) -> Tensor:
        batch, n_local, _ = x.shape
        qkv = self.qkv_proj(x).reshape(batch, n_local, 3, self.num_heads, -1)
        q, k, v = qkv.unbind(2)  # 3 x [B, N_r, H, D]
        out = self.attn(q, k, v, 0)  # [B, N_r, H, D]
        return self.out_proj(out.reshape(batch, n_local, self.embed_dim))


def _deepspeed_refusal(cfg: BenchConfig, npix: int, world: int) -> Optional[str]:
    try:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            return "deepspeed is not installed"
    except (ImportError, ValueError):
        return "deepspeed is not importable"
    if cfg.num_heads % world:
        return f"heads ({cfg.num_heads}) not divisible by P ({world})"
    if npix % world:
        return f"N ({npix}) not divisible by P ({world})"
    return None


# --------------------------------------------------------------------------------------------
# scaling mode
# --------------------------------------------------------------------------------------------


def _layer_times(layer: nn.Module, x: Tensor | tuple[Tensor, ...], g: Tensor, cfg: BenchConfig,
                 device: torch.device, collective: bool = True) -> dict[str, Any]:
    """Forward and forward+backward times of ``layer(*x)`` (``x``: one input or a tuple; every
    input gets a gradient), then peak memory and bytes sent of one more forward+backward."""
    inputs = x if isinstance(x, tuple) else (x,)

    def fwd() -> None:
        with torch.no_grad():
            layer(*inputs)

    def fwd_bwd() -> None:
        xg = [t.detach().requires_grad_(True) for t in inputs]
        layer.zero_grad(set_to_none=True)
        layer(*xg).backward(g)

    t_f = time_call(fwd, cfg.warmup, cfg.repeats, device, collective)
    t_fb = time_call(fwd_bwd, cfg.warmup, cfg.repeats, device, collective)
    with PeakMemory(device) as mem, count_communication() as stats:
        fwd_bwd()
    return {
        "fwd_s": statistics.median(t_f), "fwd_bwd_s": statistics.median(t_fb),
        "fwd_min_s": min(t_f), "fwd_bwd_min_s": min(t_fb),
        "fwd_times": t_f, "fwd_bwd_times": t_fb,
        "peak_mem": {"bytes": mem.bytes, "method": mem.method},
        "comm": stats.as_dict(),
    }


def _per_rank(record: dict[str, Any]) -> dict[str, Any]:
    """Gather the per-rank parts (memory, communication) of a measurement onto every rank."""
    rows = _gather_objects({"peak_mem": record.pop("peak_mem"), "comm": record.pop("comm")})
    record["peak_mem_bytes_per_rank"] = [r["peak_mem"]["bytes"] for r in rows]
    record["peak_mem_method"] = rows[0]["peak_mem"]["method"]
    record["comm_per_rank"] = [r["comm"] for r in rows]
    record["bytes_per_rank"] = [sum(r["comm"]["bytes_sent"].values()) for r in rows]
    record["payload_bytes_per_rank"] = [payload_bytes(r["comm"]["bytes_sent"]) for r in rows]
    return record


def run_scaling(cfg: BenchConfig, device: torch.device, threads_per_rank: int,
                progress: Optional[Callable[[str], None]] = None) -> list[dict[str, Any]]:
    """The scaling mode on every rank (collective); returns the records (same on every rank)."""
    info = resolve_group(None)
    world, rank = info.world_size, info.rank
    dtype = DTYPES[cfg.dtype]
    head_dim = cfg.embed_dim // cfg.num_heads
    records: list[dict[str, Any]] = []
    say = progress or (lambda _msg: None)
    for nside in cfg.nsides:
        npix = nside2npix(nside)
        torch.manual_seed(cfg.seed)
        oracle = SpatialSelfAttention(cfg.embed_dim, cfg.num_heads, attn_backend=cfg.backend)
        oracle = oracle.to(device=device, dtype=dtype)
        gen = torch.Generator().manual_seed(cfg.seed)
        x = torch.randn(cfg.batch, npix, cfg.embed_dim, generator=gen).to(device=device, dtype=dtype)
        g = torch.randn(cfg.batch, npix, cfg.embed_dim, generator=gen).to(device=device, dtype=dtype)
        sizes = shard_sizes(npix, world)
        start, stop = shard_bounds(npix, world)[rank]
        x_local, g_local = x[:, start:stop].contiguous(), g[:, start:stop].contiguous()
        base = {"nside": nside, "npix": npix, "world_size": world, "dtype": cfg.dtype,
                "batch": cfg.batch, "embed_dim": cfg.embed_dim, "num_heads": cfg.num_heads,
                "backend": cfg.backend, "threads_per_rank": threads_per_rank}
        probe = torch.empty(1, cfg.num_heads, 1, head_dim, dtype=dtype, device=device)
        kernel = select_kernel(cfg.backend, probe).name

        oracle_rec = None
        if cfg.oracle:
            say(f"nside {nside}: oracle, 1 process x {world * threads_per_rank} threads")
            oracle_rec = {**base, "impl": "oracle", "strategy": None, "kernel": cfg.backend,
                          "world_size": 1, "threads_per_rank": world * threads_per_rank}
            if rank == 0:
                threads = torch.get_num_threads()
                torch.set_num_threads(world * threads_per_rank)
                try:
                    rec = _layer_times(oracle, x, g, cfg, device, collective=False)
                finally:
                    torch.set_num_threads(threads)
                rec["peak_mem_bytes_per_rank"] = [rec.pop("peak_mem")["bytes"]]
                rec["bytes_per_rank"] = [0]
                rec.pop("comm")
                oracle_rec.update(rec)
            oracle_rec = _gather_objects(oracle_rec)[0]
            records.append(oracle_rec)

        runs = []
        for strategy in cfg.strategy_names():
            variants = strategy_variants(strategy, world, cfg.num_heads, proper_only=True)
            if not variants:
                records.append({**base, "impl": "hpattn_dist", "strategy": strategy,
                                "skipped": f"no Ulysses degree 1 < U < P={world} divides "
                                           f"H={cfg.num_heads}"})
            runs += [(strategy, label, u) for label, u in variants]
        for strategy, label, degree in runs:
            say(f"nside {nside}: {label}, {world} ranks x {threads_per_rank} threads")
            rec = {**base, "impl": "hpattn_dist", "strategy": label, "kernel": kernel,
                   "ulysses_degree": degree}
            try:
                layer = make_distributed_layer(oracle, strategy=strategy, attn_backend=cfg.backend,
                                               group=None, dtype=dtype, device=device,
                                               ulysses_degree=degree)
                with torch.no_grad():
                    layer(x_local)  # configuration errors (ValueError on every rank) surface here
            except ValueError as err:
                rec["skipped"] = str(err)
                say(f"  skipped: {err}")
                records.append(rec)
                continue
            rec.update(_per_rank(_layer_times(layer, x_local, g_local, cfg, device)))
            formula = expected_bytes(strategy, sizes, rank, cfg.batch, cfg.num_heads, head_dim, dtype,
                                     ulysses_degree=degree)
            rec["expected_bytes_per_rank"] = _gather_objects(formula)
            records.append(rec)

        refusal = _deepspeed_refusal(cfg, npix, world) if cfg.deepspeed else "disabled"
        if refusal is None and world > 1:
            say(f"nside {nside}: deepspeed_ulysses, {world} ranks x {threads_per_rank} threads")
            rec = {**base, "impl": "deepspeed_ulysses", "strategy": "ulysses", "kernel": "torch sdpa"}
            peer = DeepSpeedUlyssesLayer(oracle, None)
            rec.update(_per_rank(_layer_times(peer, x_local, g_local, cfg, device)))
            rec["bytes_per_rank"] = [
                expected_bytes("ulysses", sizes, r, cfg.batch, cfg.num_heads, head_dim, dtype)["total"]
                for r in range(world)]
            rec.pop("payload_bytes_per_rank")
            rec.pop("comm_per_rank")
            rec["bytes_source"] = "formula (DeepSpeed's all-to-alls are not counted by hpattn_dist)"
            records.append(rec)
        elif world > 1 and cfg.deepspeed:
            records.append({**base, "impl": "deepspeed_ulysses", "strategy": "ulysses",
                            "skipped": refusal})
        _add_ratios(records, nside)
    return records


def _add_ratios(records: list[dict[str, Any]], nside: int) -> None:
    rows = [r for r in records if r["nside"] == nside and "skipped" not in r]
    oracle = next((r for r in rows if r["impl"] == "oracle"), None)
    peer = next((r for r in rows if r["impl"] == "deepspeed_ulysses"), None)
    for r in rows:
        if r["impl"] == "oracle":
            continue
        if oracle is not None:
            r["efficiency_fwd"] = oracle["fwd_s"] / r["fwd_s"]
            r["efficiency_fwd_bwd"] = oracle["fwd_bwd_s"] / r["fwd_bwd_s"]
        if peer is not None and r["impl"] == "hpattn_dist":
            r["speed_vs_peer_fwd"] = peer["fwd_s"] / r["fwd_s"]
            r["speed_vs_peer_fwd_bwd"] = peer["fwd_bwd_s"] / r["fwd_bwd_s"]


# --------------------------------------------------------------------------------------------
# emulation mode (issue 3, figure a)
# --------------------------------------------------------------------------------------------


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
        dtype = DTYPES[cfg.dtype]
        head_dim = cfg.embed_dim // cfg.num_heads
        for nside in cfg.nsides:
            npix = nside2npix(nside)
            gen = torch.Generator().manual_seed(cfg.seed)
            q, k, v, dout = (torch.randn(cfg.batch, cfg.num_heads, npix, head_dim, generator=gen)
                             .to(device=device, dtype=dtype) for _ in range(4))
            for blocks in cfg.blocks:
                if progress:
                    progress(f"nside {nside}: emulating {blocks} ring blocks")
                rec = {"impl": "ring_emulation", "nside": nside, "npix": npix, "blocks": blocks,
                       "dtype": cfg.dtype, "batch": cfg.batch, "num_heads": cfg.num_heads,
                       "head_dim": head_dim, "backend": cfg.backend,
                       "threads": torch.get_num_threads()}
                rec.update(ring_emulation(q, k, v, dout, blocks, cfg.backend, cfg.warmup, cfg.repeats))
                records.append(rec)
    return _gather_objects(records)[0]


# --------------------------------------------------------------------------------------------
# memory mode (issue 3, figure c)
# --------------------------------------------------------------------------------------------


def run_memory(cfg: BenchConfig, device: torch.device,
               progress: Optional[Callable[[str], None]] = None) -> list[dict[str, Any]]:
    """Peak memory per rank of ``ring`` attention with the manual kernel, fwd+bwd (collective)."""
    info = resolve_group(None)
    world, rank = info.world_size, info.rank
    dtype = DTYPES[cfg.dtype]
    head_dim = cfg.embed_dim // cfg.num_heads
    elt = torch.empty((), dtype=dtype).element_size()
    acc = torch.empty((), dtype=acc_dtype(dtype)).element_size()
    records = []
    for nside in cfg.nsides:
        npix = nside2npix(nside)
        n_local = shard_sizes(npix, world)[rank]
        if progress:
            progress(f"nside {nside}: peak memory of ring/manual on {world} ranks")
        gen = torch.Generator().manual_seed(cfg.seed + rank)
        q, k, v, dout = (torch.randn(cfg.batch, cfg.num_heads, n_local, head_dim, generator=gen)
                         .to(device=device, dtype=dtype) for _ in range(4))
        q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)

        def fwd_bwd() -> None:
            sharded_attention("ring", q, k, v, None, backend="manual").backward(dout)
            q.grad = k.grad = v.grad = None

        fwd_bwd()  # warm-up: thread pools and allocator caches are not the kernel's memory
        _barrier()
        with PeakMemory(device) as mem:
            fwd_bwd()
        rows = _gather_objects(mem.bytes)
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


# --------------------------------------------------------------------------------------------
# local mode (issue 17)
# --------------------------------------------------------------------------------------------


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
        rec.update(_per_rank(_layer_times(local, x_local, g_local, cfg, device)))
        group = [rec]

        say(f"nside {nside}: global ring, {world} ranks x {threads_per_rank} threads")
        ring = DistributedSpatialSelfAttention(cfg.embed_dim, cfg.num_heads, attn_backend=cfg.backend,
                                               strategy="ring").to(device=device, dtype=dtype)
        ring.load_state_dict(local.state_dict())
        rec = {**base, "impl": "ring", "world_size": world, "threads_per_rank": threads_per_rank}
        rec.update(_per_rank(_layer_times(ring, x_local, g_local, cfg, device)))
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
                res = _layer_times(single, x, g, cfg, device, collective=False)
            finally:
                torch.set_num_threads(threads)
            rec.update(res, peak_mem_bytes_per_rank=[res.pop("peak_mem")["bytes"]],
                       bytes_per_rank=[sum(res.pop("comm")["bytes_sent"].values())])
        group.append(_gather_objects(rec)[0])
        t_local = group[0]["fwd_bwd_s"]
        group[0]["efficiency_fwd_bwd"] = group[2]["fwd_bwd_s"] / t_local
        group[0]["efficiency_fwd"] = group[2]["fwd_s"] / group[0]["fwd_s"]
        group[0]["speed_vs_ring_fwd_bwd"] = group[1]["fwd_bwd_s"] / t_local
        records += group
    return records


# --------------------------------------------------------------------------------------------
# cross mode (issue 18)
# --------------------------------------------------------------------------------------------


def cross_window(spec: str, nside: Optional[int] = None) -> Optional[tuple[str, int]]:
    """A ``windows`` entry: ``"none"`` -> None (every source pixel), ``"cell:4"`` ->
    ``("cell", 4)`` (:func:`~hpattn_dist.local.windows.parse_window`; with ``nside``, the window
    must divide it).

    Raises:
        ValueError: neither ``"none"`` nor ``MODE:WINDOW_NSIDE``.
    """
    if spec == "none":
        return None
    from hpattn_dist.local.windows import parse_window

    return parse_window(spec, nside)


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
    head_dim = cfg.embed_dim // cfg.num_heads
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
                threads = torch.get_num_threads()
                torch.set_num_threads(world * threads_per_rank)
                try:
                    res = _layer_times(single, (x_q, x_kv), g, cfg, device, collective=False)
                finally:
                    torch.set_num_threads(threads)
                single_rec.update(res, peak_mem_bytes_per_rank=[res.pop("peak_mem")["bytes"]],
                                  bytes_per_rank=[payload_bytes(res.pop("comm")["bytes_sent"])])
            single_rec = _gather_objects(single_rec)[0]
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
                rec.update(_per_rank(_layer_times(layer, local[:2], local[2], cfg, device)))
                split = _gather_objects(_fwd_bwd_bytes(layer, local[:2], local[2]))
                rec["fwd_bytes_per_rank"] = [b["forward"] for b in split]
                rec["bwd_bytes_per_rank"] = [b["backward"] for b in split]
                rec["expected_bytes_per_rank"] = [
                    expected_cross_bytes(strategy, q_sizes, k_sizes, r, cfg.batch, cfg.num_heads, head_dim, dtype)
                    for r in range(world)] if traffic is None else windowed_cross_bytes(
                        traffic, cfg.batch, cfg.num_heads, head_dim, dtype)
                rec["efficiency_fwd"] = single_rec["fwd_s"] / rec["fwd_s"]
                rec["efficiency_fwd_bwd"] = single_rec["fwd_bwd_s"] / rec["fwd_bwd_s"]
                rec["peak_mem_vs_single"] = _ratio(max(rec["peak_mem_bytes_per_rank"]),
                                                   single_rec["peak_mem_bytes_per_rank"][0])
                if traffic is not None:
                    ring_fwd = sum(t.ring_bytes_sent for t in traffic.ranks)
                    rec["locality"] = {
                        # of the dense ring's forward K/V bytes, counted here
                        "fwd_bytes_skipped": _ratio(ring_fwd - sum(rec["fwd_bytes_per_rank"]), ring_fwd),
                        "pairs_skipped": traffic.pairs_skipped, "blocks_skipped": traffic.blocks_skipped,
                        "window_traffic": traffic.as_dict()}
                records.append(rec)
    return records


# --------------------------------------------------------------------------------------------
# masks mode (issue 9, item 3)
# --------------------------------------------------------------------------------------------


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


def _ratio(value: float, base: float) -> Optional[float]:
    return value / base if base else None


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
        rows = _gather_objects(time_call(fn, cfg.warmup, cfg.repeats, device, slowest=False))
        rec[f"{name}_s_per_rank"] = [statistics.median(t) for t in rows]
        rec[f"{name}_s"] = statistics.median(max(col) for col in zip(*rows))  # slowest rank's
    with count_communication() as fwd_stats:
        fwd()
    with count_communication() as stats:
        fwd_bwd()
    b, h, n_local, _ = q.shape
    rows = _gather_objects({
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
    dtype = DTYPES[cfg.dtype]
    head_dim = cfg.embed_dim // cfg.num_heads
    fractions = sorted({0.0, *(float(f) for f in cfg.land_fractions)})
    records: list[dict[str, Any]] = []
    for nside in cfg.nsides:
        npix = nside2npix(nside)
        sizes = shard_sizes(npix, world)
        gen = torch.Generator().manual_seed(cfg.seed + rank)
        q, k, v, dout = (torch.randn(cfg.batch, cfg.num_heads, sizes[rank], head_dim, generator=gen)
                         .to(device=device, dtype=dtype) for _ in range(4))
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
                    "fwd_bytes_ratio": _ratio(sum(rec["fwd_bytes_per_rank"]),
                                              sum(base["fwd_bytes_per_rank"])),
                    "fwd_bytes_ratio_per_rank": [_ratio(a, b) for a, b in zip(
                        rec["fwd_bytes_per_rank"], base["fwd_bytes_per_rank"])],
                    "scores_ratio": _ratio(sum(rec["scores_computed_per_rank"]),
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
        problem = _gather_objects(problem)[0]
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
