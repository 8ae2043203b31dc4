"""``hpattn-dist plan``: what each strategy would cost on a given grid and machine, before running it.

For one attention layer ``[B, N, E]`` with H heads on P ranks (N = 12 * nside**2, split by
:func:`hpattn_dist.healpix.shard_sizes`), every candidate (ring, Ulysses, each proper hybrid
degree, windowed attention when a window is given) gets, per rank, from the one cost model
(:mod:`hpattn_dist.cost_model`):

* ``peak_bytes_per_rank``: the layer's peak over forward and backward (Note [activation memory]),
  plus, with ``--layers L``, the saved tensors of the L - 1 other layers, plus the L layers'
  weights;
* ``bytes_sent_per_rank``: bytes sent in one forward and backward, what
  :func:`~hpattn_dist.count_communication` counts (Note [communication volume], Note [halo
  traffic], the agreement's row included);
* FLOPs and a time lower bound from the peak FLOP/s and the link's bandwidth (Note [time lower
  bound]);
* whether the peak fits the device's memory.

Numbers are for the worst rank (shards differ by one pixel at most). The recommendation is the
candidate that fits with the smallest time bound (then the fewest bytes); ``auto`` (which picks by
bytes alone, Note [communication volume]) is shown beside it. Nothing here is measured: the table
says "predicted"; ``tests/distributed/test_cost_model.py`` holds the model to measurements at small
sizes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from hpattn_dist.cost_model.communication import AGREEMENT_BYTES, communication_volume, halo_rows
from hpattn_dist.cost_model.compute import LayerWork, attention_flops, time_lower_bound
from hpattn_dist.cost_model.memory import (
    LayerMemory, MemoryCase, global_layer_memory, local_layer_memory, unit_batches,
)

__all__ = ["PlanConfig", "StrategyEstimate", "format_plan", "parse_bytes", "plan_layer", "recommend"]

SCHEMA = "hpattn_dist.plan/1"

_ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}

#: Dense peak FLOP/s of an H100 SXM per dtype (tensor cores for the 16-bit types; fp32 and fp64
#: without TF32): the defaults of ``--tflops``.
H100_FLOPS = {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12, "float64": 67e12}

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str, per_second: bool = False) -> float:
    """``"80GiB"`` -> bytes, ``"450GB/s"`` -> bytes per second (``per_second``; the ``/s`` optional).

    Raises:
        ValueError: anything else, or a value that is not positive.
    """
    pattern = r"\s*([0-9.]+(?:e[0-9+-]+)?)\s*([kmgt]i?b|b)?\s*" + (r"(?:/s)?\s*" if per_second else "")
    match = re.fullmatch(pattern, str(text).lower())
    if match is None or float(match.group(1)) <= 0:
        what = "a bandwidth such as 450GB/s" if per_second else "a size such as 80GiB"
        raise ValueError(f"expected {what}, got {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2) or ""]


@dataclass(frozen=True)
class PlanConfig:
    """One planned layer and machine.

    Attributes:
        nside, embed, heads, batch, world: the field (N = 12 * nside**2), E, H, B and P.
        dtype: ``bfloat16 | float16 | float32 | float64``.
        gpu_memory: bytes per device.
        link: bytes per second one rank can send.
        flops: peak FLOP/s of one device (default: :data:`H100_FLOPS` for the dtype).
        window_nside, mode: also plan windowed attention with this window.
        layers: attention layers whose saved tensors are held at once (no checkpointing).
        device: ``"cuda"`` (fused GPU kernels) or ``"cpu"`` (the CPU flash kernel's tiles).
        threads: torch threads per CPU rank.
    """

    nside: int
    embed: int
    heads: int
    batch: int
    world: int
    dtype: str = "bfloat16"
    gpu_memory: float = 80 * 2**30
    link: float = 450e9
    flops: Optional[float] = None
    window_nside: Optional[int] = None
    mode: str = "neighbourhood"
    layers: int = 1
    device: str = "cuda"
    threads: int = 1

    def __post_init__(self) -> None:
        from hpattn_dist.healpix import check_nside
        from hpattn_dist.local.windows import check_window, check_window_fits

        check_nside(self.nside, nest=True)
        for name in ("embed", "heads", "batch", "world", "layers", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.embed % self.heads:
            raise ValueError(f"embed ({self.embed}) must be divisible by heads ({self.heads})")
        if self.dtype not in _ITEMSIZE:
            raise ValueError(f"dtype must be one of {sorted(_ITEMSIZE)}, got {self.dtype!r}")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {self.device!r}")
        if self.window_nside is not None:
            check_window(self.window_nside, self.mode)
            check_window_fits(self.nside, self.window_nside)

    @property
    def npix(self) -> int:
        return 12 * self.nside**2

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.dtype]

    @property
    def acc_itemsize(self) -> int:
        return 8 if self.dtype == "float64" else 4

    @property
    def peak_flops(self) -> float:
        return self.flops if self.flops is not None else H100_FLOPS[self.dtype]


@dataclass
class StrategyEstimate:
    """One candidate's predicted costs, per rank (lists in group-rank order).

    Attributes:
        strategy: ``ring``, ``ulysses``, ``hybrid:U<u>`` or ``local:<mode>:<window_nside>``.
        ulysses_degree: U (None for windowed attention).
        bytes_forward, bytes_backward: bytes sent per rank (the agreement's row in the forward).
        memory: :class:`~hpattn_dist.cost_model.memory.LayerMemory` per rank.
        work: :class:`~hpattn_dist.cost_model.compute.LayerWork` per rank.
        time_s: the time lower bound per rank.
        weights: bytes of one layer's parameters.
        layers: layers held at once.
        gpu_memory: bytes per device.
    """

    strategy: str
    ulysses_degree: Optional[int]
    bytes_forward: list[int]
    bytes_backward: list[int]
    memory: list[LayerMemory]
    work: list[LayerWork]
    time_s: list[float]
    weights: int
    layers: int
    gpu_memory: float
    window_nside: Optional[int] = None
    mode: Optional[str] = None

    @property
    def bytes_sent(self) -> list[int]:
        return [f + b for f, b in zip(self.bytes_forward, self.bytes_backward)]

    @property
    def peak_bytes(self) -> list[int]:
        """Per rank: the layer's peak, the other layers' saved tensors and every layer's weights."""
        return [m.peak + (self.layers - 1) * m.saved + self.layers * self.weights for m in self.memory]

    @property
    def fits(self) -> bool:
        return max(self.peak_bytes) <= self.gpu_memory

    def record(self) -> dict[str, Any]:
        """The JSON record (worst rank; the per-rank lists under ``by_rank``)."""
        return {
            "strategy": self.strategy, "ulysses_degree": self.ulysses_degree,
            "window_nside": self.window_nside, "mode": self.mode,
            "bytes_sent_per_rank": max(self.bytes_sent),
            "bytes_forward_per_rank": max(self.bytes_forward),
            "bytes_backward_per_rank": max(self.bytes_backward),
            "peak_bytes_per_rank": max(self.peak_bytes),
            "layer_peak_bytes_per_rank": max(m.peak for m in self.memory),
            "saved_bytes_per_rank": max(m.saved for m in self.memory),
            "flops_per_rank": max(w.total for w in self.work),
            "time_lower_bound_s": max(self.time_s),
            "fits": self.fits,
            "predicted": True,
            "by_rank": {"bytes_sent": self.bytes_sent, "peak_bytes": self.peak_bytes},
        }


def _global(cfg: PlanConfig, sizes: list[int], strategy: str, u_deg: int) -> StrategyEstimate:
    b, h, d = cfg.batch, cfg.heads, cfg.embed // cfg.heads
    fwd, bwd, mem, work, times = [], [], [], [], []
    r_deg = cfg.world // u_deg
    groups = [sum(sizes[j * u_deg:(j + 1) * u_deg]) for j in range(r_deg)]
    for rank in range(cfg.world):
        vol = communication_volume(strategy, batch=b, heads=h, head_dim=d, sizes=sizes, rank=rank,
                                   itemsize=cfg.itemsize, acc_itemsize=cfg.acc_itemsize,
                                   ulysses_degree=u_deg if strategy == "hybrid" else None)
        fwd.append(vol.forward + AGREEMENT_BYTES)
        bwd.append(vol.backward)
        case = MemoryCase(b, h, d, tuple(sizes), rank, cfg.itemsize, cfg.acc_itemsize, cfg.device, cfg.threads)
        mem.append(global_layer_memory(case, strategy, u_deg))
        m = groups[rank // u_deg]
        w = attention_flops(b, d, (h // u_deg) * m * cfg.npix, sizes[rank], cfg.embed)
        work.append(w)
        ring = vol.total - (_a2a_bytes(cfg, sizes, rank, u_deg) if u_deg > 1 else 0)
        times.append(time_lower_bound(w, ring, vol.total - ring + AGREEMENT_BYTES, cfg.peak_flops, cfg.link))
    label = strategy if strategy != "hybrid" else f"hybrid:U{u_deg}"
    return StrategyEstimate(label, u_deg, fwd, bwd, mem, work, times, _weights(cfg), cfg.layers, cfg.gpu_memory)


def _a2a_bytes(cfg: PlanConfig, sizes: list[int], rank: int, u_deg: int) -> int:
    """The all-to-all part of a rank's bytes (Note [communication volume]: the ring of one)."""
    u_sizes = sizes[rank // u_deg * u_deg:(rank // u_deg + 1) * u_deg]
    vol = communication_volume("ulysses", batch=cfg.batch, heads=cfg.heads, head_dim=cfg.embed // cfg.heads,
                               sizes=u_sizes, rank=rank % u_deg, itemsize=cfg.itemsize)
    return vol.total


def _local(cfg: PlanConfig, sizes: list[int]) -> StrategyEstimate:
    from hpattn_dist.local.plan import plan_local_attention

    b, h, d = cfg.batch, cfg.heads, cfg.embed // cfg.heads
    kv_row = 2 * b * h * d
    halo = halo_rows(sizes, cfg.window_nside, cfg.mode)
    fwd, bwd, mem, work, times = [], [], [], [], []
    for rank in range(cfg.world):
        fwd.append(AGREEMENT_BYTES + halo[rank].sent * kv_row * cfg.itemsize)
        bwd.append(halo[rank].received * kv_row * cfg.acc_itemsize)
        case = MemoryCase(b, h, d, tuple(sizes), rank, cfg.itemsize, cfg.acc_itemsize, cfg.device, cfg.threads)
        mem.append(local_layer_memory(case, plan_local_attention(tuple(sizes), cfg.window_nside, cfg.mode,
                                                                 rank).geometry()))
        c, _, batches = unit_batches(tuple(sizes), rank, cfg.window_nside, cfg.mode)
        w = attention_flops(b, d, h * sum(n * c * m * c for m, n in batches.items()), sizes[rank], cfg.embed)
        work.append(w)
        times.append(time_lower_bound(w, 0, fwd[-1] + bwd[-1], cfg.peak_flops, cfg.link))
    return StrategyEstimate(f"local:{cfg.mode}:{cfg.window_nside}", None, fwd, bwd, mem, work, times,
                            _weights(cfg), cfg.layers, cfg.gpu_memory, cfg.window_nside, cfg.mode)


def _weights(cfg: PlanConfig) -> int:
    return (4 * cfg.embed * cfg.embed + 4 * cfg.embed) * cfg.itemsize


def plan_layer(cfg: PlanConfig) -> list[StrategyEstimate]:
    """Every candidate of ``cfg``: ring, Ulysses (when P divides H), each hybrid degree
    ``1 < U < P`` dividing P and H, and windowed attention when ``cfg.window_nside`` is set."""
    from hpattn_dist.healpix import shard_sizes

    sizes = shard_sizes(cfg.npix, cfg.world)
    out = [_global(cfg, sizes, "ring", 1)]
    degrees = [u for u in range(2, cfg.world) if cfg.world % u == 0 and cfg.heads % u == 0]
    out += [_global(cfg, sizes, "hybrid", u) for u in degrees]
    if cfg.world > 1 and cfg.heads % cfg.world == 0:
        out.append(_global(cfg, sizes, "ulysses", cfg.world))
    if cfg.window_nside is not None:
        out.append(_local(cfg, sizes))
    return out


def recommend(estimates: Sequence[StrategyEstimate]) -> Optional[StrategyEstimate]:
    """The candidate that fits with the smallest time bound, then the fewest bytes; None if none fits."""
    fitting = [e for e in estimates if e.fits]
    if not fitting:
        return None
    return min(fitting, key=lambda e: (max(e.time_s), max(e.bytes_sent), max(e.peak_bytes)))


def _auto_choice(cfg: PlanConfig) -> str:
    import torch

    from hpattn_dist.strategies.auto import choose_strategy

    choice = choose_strategy(cfg.heads, cfg.world, dtype=getattr(torch, cfg.dtype))
    return choice.strategy if choice.strategy != "hybrid" else f"hybrid:U{choice.ulysses_degree}"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def format_plan(cfg: PlanConfig, estimates: Sequence[StrategyEstimate]) -> str:
    """A fixed-width table of the candidates, the recommendation and ``auto``'s choice."""
    best = recommend(estimates)
    lines = [
        f"hpattn-dist plan (PREDICTED by the cost model, not measured): nside {cfg.nside} "
        f"(N = {cfg.npix:,}), E={cfg.embed}, H={cfg.heads}, B={cfg.batch}, P={cfg.world}, {cfg.dtype}, "
        f"{cfg.layers} attention layer(s) held",
        f"device {_gib(cfg.gpu_memory)} GiB, link {cfg.link / 1e9:g} GB/s per rank, peak "
        f"{cfg.peak_flops / 1e12:g} TFLOP/s; worst rank shown (N_r = {math.ceil(cfg.npix / cfg.world):,})",
    ]
    cols = (f"{'strategy':<24} {'peak GiB':>9} {'fits':>5} {'saved GiB':>9} {'sent GB':>9} "
            f"{'TFLOP':>8} {'time >= ms':>10}")
    lines += [cols, "-" * len(cols)]
    for e in estimates:
        rec = e.record()
        mark = "  <- recommended" if e is best else ""
        lines.append(f"{e.strategy:<24} {_gib(rec['peak_bytes_per_rank']):>9} {'yes' if e.fits else 'NO':>5} "
                     f"{_gib(rec['saved_bytes_per_rank']):>9} {rec['bytes_sent_per_rank'] / 1e9:>9.3f} "
                     f"{rec['flops_per_rank'] / 1e12:>8.2f} {1e3 * rec['time_lower_bound_s']:>10.2f}{mark}")
    if cfg.world > 1 and cfg.heads % cfg.world:
        lines.append(f"ulysses: not a candidate (H = {cfg.heads} is not divisible by P = {cfg.world}); "
                     "hybrid degrees U divide both")
    if best is None:
        lines.append("nothing fits: more ranks, a window (--window-nside), fewer layers held at once "
                     "(activation checkpointing) or a smaller batch")
    lines.append(f"strategy='auto' would run {_auto_choice(cfg)} (fewest bytes, Note [communication volume])")
    return "\n".join(lines)


def as_json(cfg: PlanConfig, estimates: Sequence[StrategyEstimate]) -> dict[str, Any]:
    best = recommend(estimates)
    return {"schema": SCHEMA, "config": asdict(cfg), "predicted": True,
            "recommended": None if best is None else best.strategy, "auto": _auto_choice(cfg),
            "records": [e.record() for e in estimates]}


def _selected(estimates: list[StrategyEstimate], names: Optional[Sequence[str]], auto: str) -> list[StrategyEstimate]:
    """The estimates ``--strategies`` asks for (windowed attention always, when planned).

    Raises:
        ValueError: an unknown name.
    """
    if not names:
        return estimates
    unknown = sorted(set(names) - {"ring", "ulysses", "hybrid", "auto"})
    if unknown:
        raise ValueError(f"--strategies: unknown {unknown}; choose from ring, ulysses, hybrid, auto")
    keep = {n for n in names if n != "hybrid"} | ({auto} if "auto" in names else set())
    return [e for e in estimates if e.strategy in keep or e.ulysses_degree is None
            or ("hybrid" in names and e.strategy.startswith("hybrid:"))]


def cli_plan(args: Any) -> int:
    """``hpattn-dist plan``: one table per (nside, world) pair; ``--json`` gets every record."""
    documents = []
    for nside in args.nside:
        for world in args.world:
            cfg = PlanConfig(nside=nside, embed=args.embed, heads=args.heads, batch=args.batch, world=world,
                             dtype=args.dtype, gpu_memory=args.gpu_memory, link=args.link,
                             flops=None if args.tflops is None else args.tflops * 1e12,
                             window_nside=args.window_nside, mode=args.mode, layers=args.layers,
                             device=args.plan_device)
            estimates = _selected(plan_layer(cfg), args.strategies, _auto_choice(cfg))
            print(format_plan(cfg, estimates), end="\n\n", flush=True)
            documents.append(as_json(cfg, estimates))
    if args.json_path is not None:  # one flat list of records, each naming its nside and world
        records = [dict(r, nside=d["config"]["nside"], world=d["config"]["world"], dtype=d["config"]["dtype"],
                        recommended=r["strategy"] == d["recommended"]) for d in documents for r in d["records"]]
        Path(args.json_path).write_text(json.dumps(records, indent=1))
    return 0
