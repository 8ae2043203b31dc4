"""``hpattn-dist verify``: does the sharded layer compute what the single-device layer computes?

Every rank builds the same float64 oracle, ``SpatialSelfAttention(attn_backend="manual")``, and
the same field ``x`` ``[B, N, E]`` on a HEALPix grid (random, or read from a file), runs the
oracle on the FULL field (forward and backward with a fixed upstream gradient ``g``), then runs
the distributed layer on its own shard ``x[:, start_r:stop_r]`` (the shard plan of
:func:`hpattn_dist.healpix.shard_bounds`) with the SAME weights cast to the tested dtype. Each rank
compares its shard of the output and of the input gradient with the oracle's slice; parameter
gradients (partial sums over each rank's pixels) are summed over the group first. The worst errors
are reduced over ranks (all-reduce MAX), so every rank reaches the same verdict and the same exit
code, under the tolerances of :mod:`hpattn_dist.tools.tolerances` (Note [verify tolerances]).

Legend: B batch, N = 12 * nside**2 pixels, N_r pixels on rank r, E embed dim, H heads, P ranks.

Note [float64 reproducibility]
    The same float64 case, run twice in one process on the same inputs, must give the same
    result: nothing in the layer or the oracle is random. On x86 machines whose torch uses MKL
    this has been seen to fail in rare fresh processes with two or more threads: the FIRST
    float64 attention call of the process came out ~1e-10 (relative) off, and every later call
    was exact. That is neither float64 rounding (reduction-order changes are ~1e-16 here) nor a
    float32 path (a float32 matmul or exp in the same place is ~1e-8 off): the math library took
    another code path on its first, multi-threaded call. Which routine is not proven; on CPU,
    torch computes float64 matmuls with MKL (``cblas_dgemm_batch``) and float64 ``exp``/``log``
    with MKL's vector library (``vmdExp``/``vmdLn``, entered by every OpenMP thread at once).
    MKL can be held to one code path with ``MKL_CBWR`` (conditional numerical
    reproducibility), which it reads once, at its first call. Hence:

    - every ``verify`` rank (local launch or torchrun), every rank of the test harness and the
      pytest process set ``MKL_CBWR=COMPATIBLE`` before their first tensor operation unless the
      user set it (:func:`hpattn_dist.tools.platform.pin_math_library`); ``bench`` does not (slower GEMMs);
    - a float64 case that fails is run once more in the same process, oracle recomputed; if the
      rerun passes or the oracle moved, the case still FAILS (the first result was wrong and a
      training run could get it too), and the report says the result was not reproducible and
      names ``MKL_CBWR`` as the remedy. No tolerance is widened.

    ``launch/repro_mkl_first_call.py`` is a torch-only reproducer (seed, ``Linear``, the manual
    kernel's ops, fresh processes); the README's troubleshooting section has what it measured.

Self-test: ``inject_error = e`` adds ``e`` to the distributed output before comparison (not to
the loss, so gradients are unaffected); ``tolerance_scale = 0`` makes every non-exact quantity
fail. Either must make ``verify`` exit non-zero; the tests use them to show the check can fail.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from hpattn_dist.tools.platform import PINNED_MATH_ENV
from hpattn_dist.tools import tolerances
from hpattn_dist.tools.config import load_section
from hpattn_dist.comm.groups import resolve_group
from hpattn_dist.grad_sync import sync_gradients
from hpattn_dist.healpix import check_nside, npix2nside, nside2npix, reorder, shard_bounds
from hpattn_dist.kernels import select_kernel
from hpattn_dist.local.windows import parse_window
from hpattn_dist.modules import DistributedSpatialSelfAttention
from hpattn_dist.oracle import ATTN_BACKENDS, SpatialSelfAttention
from hpattn_dist.precision import DTYPES
from hpattn_dist.strategies import STRATEGIES, choose_strategy




@dataclass
class VerifyConfig:
    """What ``hpattn-dist verify`` checks. Defaults: ``hpattn_dist/tools/configs/verify.toml``
    (table ``[verify]``).

    Attributes:
        nside: HEALPix resolution; ``N = 12 * nside**2`` pixels (nside 8: 768).
        batch: batch size ``B``.
        embed_dim: ``E``, divisible by ``num_heads``.
        num_heads: ``H``.
        strategies: strategy names to check; empty = every registered strategy
            (:data:`hpattn_dist.strategies.STRATEGIES`).
        backends: layer ``attn_backend`` values (``"auto" | "sdpa" | "manual"``).
        dtypes: dtypes of the distributed layer (``float64 | float32 | bfloat16 | float16``).
        seed: seed of the weights, the field and the upstream gradient.
        field: optional path to a field ``[N, E]`` or ``[B, N, E]`` (``.pt`` or ``.npy``); it
            overrides ``nside``, ``batch`` and ``embed_dim``.
        field_ordering: HEALPix ordering of ``field`` (``"NESTED"`` or ``"RING"``); RING fields
            are converted to NESTED before sharding.
        tolerance_scale: multiplies every tolerance (self-test: 0 makes the check fail).
        inject_error: added to the distributed output before comparison (self-test).
        local_windows: local-attention windows to check as well, ``"MODE:WINDOW_NSIDE"`` (e.g.
            ``"neighbourhood:2"``), against their own dense oracle (:mod:`hpattn_dist.tools.verify_local`).
        cross_nsides: source-grid resolutions for cross-grid attention cases (queries on the
            field, keys and values on a random field of each nside; :mod:`hpattn_dist.tools.verify_cross`).
        cross_window: ``"MODE:WINDOW_NSIDE"``: every ``cross_nsides`` case runs once more with
            that window (``window_nside`` dividing both grids' nsides); ``""`` = none.
        sample_queries: K > 0 checks K random query pixels against the float64 reference streamed
            over every rank's keys, no full field anywhere (Note [sampled verification] in
            :mod:`hpattn_dist.tools.verify_sampled`); the global strategies and ``local_windows``
            run, the cross-grid cases do not. 0 = the full-field check.
        data: a zarr store (``sample_queries`` only) whose ``data_variable`` at ``data_time`` is
            the field, ``(time, E, cell)`` or ``(time, B, E, cell)``, read with
            :func:`hpattn_dist.io.read_shard`; it overrides ``nside``, ``batch`` and ``embed_dim``.
        data_variable, data_time: the variable and time index of ``data``.
    """

    nside: int = 8
    batch: int = 2
    embed_dim: int = 32
    num_heads: int = 4
    strategies: tuple[str, ...] = ()
    backends: tuple[str, ...] = ("manual", "sdpa")
    dtypes: tuple[str, ...] = ("float64", "float32", "bfloat16")
    seed: int = 0
    field: Optional[str] = None
    field_ordering: str = "NESTED"
    tolerance_scale: float = 1.0
    inject_error: float = 0.0
    local_windows: tuple[str, ...] = ()
    cross_nsides: tuple[int, ...] = ()
    cross_window: str = ""
    sample_queries: int = 0
    data: Optional[str] = None
    data_variable: str = "x"
    data_time: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.sample_queries, int) or isinstance(self.sample_queries, bool) \
                or self.sample_queries < 0:
            raise ValueError(f"sample_queries must be an int >= 0, got {self.sample_queries!r}")
        if self.data is not None and not self.sample_queries:
            raise ValueError("data (a zarr store) is read by the sampled check only: give sample_queries > 0")
        if self.sample_queries and (self.cross_nsides or self.field is not None):
            raise ValueError("sample_queries checks the global strategies and local_windows on a sharded field; "
                             "cross_nsides and field need the full-field check (sample_queries = 0)")
        self.cross_nsides = tuple(self.cross_nsides)
        for source_nside in self.cross_nsides:
            try:
                check_nside(source_nside, nest=True)
            except (ValueError, TypeError) as err:
                raise ValueError(f"cross_nsides: {err}") from None
        if self.cross_window:
            try:
                parse_window(self.cross_window, min((self.nside, *self.cross_nsides)))
            except ValueError as err:
                raise ValueError(f"cross_window (with nside={self.nside}, cross_nsides="
                                 f"{list(self.cross_nsides)}): {err}") from None
        self.local_windows = tuple(self.local_windows)
        for spec in self.local_windows:
            try:
                parse_window(spec, self.nside)
            except ValueError as err:
                raise ValueError(f"local_windows: {err}") from None
        self.strategies = tuple(self.strategies)
        self.backends = tuple(self.backends)
        self.dtypes = tuple(self.dtypes)
        check_nside(self.nside, nest=True)  # NESTED shards: a power of two
        for name in ("batch", "embed_dim", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.strategies == ("none",) and not self.local_windows:
            raise ValueError("strategies = ['none'] (local_windows alone) leaves nothing to check")
        for s in self.strategy_names():
            if s not in STRATEGIES:
                raise ValueError(f"strategies: unknown strategy {s!r}; registered: {tuple(STRATEGIES)}")
        for b in self.backends:
            if b not in ATTN_BACKENDS:
                raise ValueError(f"backends: {b!r} is not one of {ATTN_BACKENDS}")
        for d in self.dtypes:
            if d not in DTYPES:
                raise ValueError(f"dtypes: {d!r} is not one of {tuple(DTYPES)}")
        if not self.backends or not self.dtypes:
            raise ValueError("backends and dtypes must not be empty")
        if self.field_ordering.upper() not in ("NESTED", "NEST", "RING"):
            raise ValueError(f"field_ordering must be 'NESTED' or 'RING', got {self.field_ordering!r}")
        if not (isinstance(self.tolerance_scale, (int, float)) and self.tolerance_scale >= 0):
            raise ValueError(f"tolerance_scale must be a number >= 0, got {self.tolerance_scale!r}")
        if not isinstance(self.inject_error, (int, float)) or not math.isfinite(self.inject_error):
            raise ValueError(f"inject_error must be a finite number, got {self.inject_error!r}")

    def strategy_names(self) -> tuple[str, ...]:
        """The global strategies to check: ``strategies``, every registered one when empty, none
        for ``("none",)`` (only ``local_windows``)."""
        if self.strategies == ("none",):
            return ()
        return self.strategies or tuple(STRATEGIES)

    @classmethod
    def load(cls, path: Optional[Path], **overrides: Any) -> "VerifyConfig":
        """Defaults of this class, then table ``[verify]`` of ``path``, then ``overrides``; with a
        ``field``, ``nside``, ``batch`` and ``embed_dim`` are those of the field.

        Raises:
            ValueError: a bad value, or a field that is not ``[N, E]`` / ``[B, N, E]`` with
                ``N = 12 * nside**2`` and ``E`` divisible by ``num_heads``.
        """
        values = load_section(path, "verify", cls)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values.get("field") is not None:
            batch, npix, embed_dim = _read_field(Path(values["field"])).shape
            values.update(nside=npix2nside(npix), batch=batch, embed_dim=embed_dim)
        if values.get("data") is not None:
            values.update(_store_shape(values["data"], values.get("data_variable", cls.data_variable),
                                       values.get("data_time", cls.data_time)))
        return cls(**values)


# --------------------------------------------------------------------------------------------
# The layer under test
# --------------------------------------------------------------------------------------------


def strategy_variants(strategy: str, world_size: int, heads: int,
                      proper_only: bool = False) -> list[tuple[str, Optional[int]]]:
    """``(label, ulysses_degree)`` of each configuration of ``strategy`` to run at this P and H.

    Every strategy runs once, except ``"hybrid"``: once per Ulysses degree U dividing both P and
    H (labels ``hybrid:U2`` ...); with ``proper_only``, only ``1 < U < P`` (U = 1 is a ring and
    U = P a Ulysses). An empty list means no degree fits.
    """
    if strategy != "hybrid":
        return [(strategy, None)]
    degrees = [u for u in range(1, world_size + 1) if world_size % u == 0 and heads % u == 0]
    if proper_only:
        degrees = [u for u in degrees if 1 < u < world_size]
    return [(f"hybrid:U{u}", u) for u in degrees]


def executed_strategy(label: str, world_size: int, heads: int, dtype: torch.dtype) -> str:
    """What a case labelled ``label`` executes: ``auto`` resolved the way the planner resolves it
    (:func:`hpattn_dist.strategies.choose_strategy`), and a hybrid whose Ulysses degree makes it
    a ring (U = 1) or a Ulysses (U = P) named so."""
    if label == "auto":
        choice = choose_strategy(heads, world_size, dtype=dtype)
        return choice.strategy if choice.strategy != "hybrid" else f"hybrid:U{choice.ulysses_degree}"
    if label.startswith("hybrid:U"):
        degree = int(label[len("hybrid:U"):])
        if world_size > 1 and degree in (1, world_size):
            return "ring" if degree == 1 else "ulysses"
    return label


def _shown_strategy(r: "CaseResult") -> str:
    if r.executed is None or r.executed == r.strategy:
        return r.strategy
    return f"{r.strategy}={r.executed}"


def make_distributed_layer(
    oracle: SpatialSelfAttention,
    *,
    strategy: str,
    attn_backend: str,
    group: Optional[dist.ProcessGroup],
    dtype: torch.dtype,
    device: torch.device,
    ulysses_degree: Optional[int] = None,
) -> nn.Module:
    """The distributed layer with the oracle's weights, cast to ``dtype`` on ``device``.

    Raises:
        ValueError: the strategy cannot run this configuration (e.g. heads not divisible by P).
    """
    layer = DistributedSpatialSelfAttention(
        oracle.embed_dim, oracle.num_heads, dropout=0.0, bias=oracle.qkv_proj.bias is not None,
        attn_backend=attn_backend, process_group=group, strategy=strategy,
        ulysses_degree=ulysses_degree,
    )
    layer.load_state_dict(oracle.state_dict())
    return layer.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------


@dataclass
class Quantity:
    """Errors of one compared tensor (reduced over ranks)."""

    name: str
    max_abs: float
    ref_max: float
    violation: float  # max over elements of error / allowed error; <= 1 passes

    @property
    def rel(self) -> float:
        return self.max_abs / self.ref_max if self.ref_max > 0 else self.max_abs

    @property
    def passed(self) -> bool:
        return self.violation <= 1.0


def compare_quantities(
    pairs: Sequence[tuple[str, Tensor, Tensor]],
    dtype_name: str,
    tolerance_scale: float,
    group: Optional[dist.ProcessGroup],
    device: torch.device = torch.device("cpu"),
) -> list[Quantity]:
    """Compare ``(name, got, ref)`` pairs; errors are reduced (MAX) over the ranks of ``group``.

    ``got`` and ``ref`` are this rank's part (a shard, or the whole tensor for parameters);
    ``max|ref|`` is reduced first so every rank applies the same tolerance.
    """
    ref_max = torch.tensor([float(ref.abs().max()) if ref.numel() else 0.0 for _, _, ref in pairs],
                           dtype=torch.float64)
    max_abs = torch.tensor([float((got.double() - ref).abs().max()) if ref.numel() else 0.0
                            for _, got, ref in pairs], dtype=torch.float64)
    ref_max = _all_reduce_max(ref_max, group, device)
    violation = torch.tensor(
        [tolerances.violation(got, ref, dtype_name, tolerance_scale, float(m))
         for (_, got, ref), m in zip(pairs, ref_max)], dtype=torch.float64)
    max_abs = _all_reduce_max(max_abs, group, device)
    violation = _all_reduce_max(violation, group, device)
    return [Quantity(name, float(a), float(m), float(v))
            for (name, _, _), a, m, v in zip(pairs, max_abs, ref_max, violation)]


def _all_reduce_max(t: Tensor, group: Optional[dist.ProcessGroup], device: torch.device) -> Tensor:
    """Elementwise MAX of the CPU tensor ``t`` over ``group`` (on the CUDA device under NCCL)."""
    info = resolve_group(group)
    if info.world_size == 1:
        return t
    t = t.to(info.comm_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.cpu()


# --------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    """One (strategy, backend, dtype) case."""

    strategy: str
    backend: str
    kernel: str
    dtype: str
    quantities: list[Quantity] = field(default_factory=list)
    skipped: Optional[str] = None
    #: set when the case failed and the same case, run again in this process, passed
    #: (Note [float64 reproducibility]); the case still fails.
    unreproducible: Optional[str] = None
    #: what ran: ``auto`` resolved (``"ulysses"``, ``"hybrid:U2"`` ...), hybrid's degenerate
    #: degrees named (U = 1 is a ring, U = P a Ulysses); None for a skipped case.
    executed: Optional[str] = None
    #: the sampled check's measurements of the layer's forward + backward, one entry per rank:
    #: ``time_s``, ``peak_allocated_bytes`` (Note [allocated peak]), ``peak_rss_bytes``
    #: (Note [peak memory]); None for the full-field check.
    measured: Optional[dict] = None

    @property
    def passed(self) -> bool:
        return self.skipped is not None or all(q.passed for q in self.quantities)

    def as_dict(self) -> dict:
        d = {k: getattr(self, k)
             for k in ("strategy", "executed", "backend", "kernel", "dtype", "skipped", "unreproducible",
                       "measured")}
        d["passed"] = self.passed
        d["quantities"] = [
            {"name": q.name, "max_abs": q.max_abs, "rel": q.rel, "ref_max": q.ref_max,
             "violation": q.violation, "passed": q.passed}
            for q in self.quantities
        ]
        return d


def load_field(cfg: VerifyConfig, dtype: torch.dtype = torch.float64) -> Tensor:
    """The field ``[B, N, E]`` in NESTED order: from ``cfg.field`` or random (seeded)."""
    if cfg.field is None:
        gen = torch.Generator().manual_seed(cfg.seed)
        npix = nside2npix(cfg.nside)
        return torch.randn(cfg.batch, npix, cfg.embed_dim, generator=gen, dtype=dtype)
    x = _read_field(Path(cfg.field)).to(dtype)
    if cfg.field_ordering.upper() == "RING":
        x = reorder(x, src="RING", dst="NESTED", dim=1)
    return x.contiguous()


def _store_shape(store: str, name: str, time: int) -> dict[str, int]:
    """``nside``, ``batch``, ``embed_dim`` of a store's ``(time, [B,] E, cell)`` variable (metadata only).

    Raises:
        ValueError: what :func:`hpattn_dist.io.read_shard` refuses, or another layout.
    """
    from hpattn_dist.io.read import open_store, resolve_variable

    array, grid = resolve_variable(open_store(store), name, time=time)
    if len(array.shape) not in (3, 4):
        raise ValueError(f"data {store}: {name!r} must be (time, E, cell) or (time, B, E, cell), got shape "
                         f"{tuple(array.shape)}")
    batch = array.shape[1] if len(array.shape) == 4 else 1
    return {"nside": grid.nside, "batch": batch, "embed_dim": array.shape[-2]}


def _read_field(path: Path) -> Tensor:
    """The field stored at ``path`` (``.npy`` or a torch file) as ``[B, N, E]``.

    Raises:
        ValueError: unreadable, not ``[N, E]`` / ``[B, N, E]``, or N not ``12 * nside**2``.
    """
    try:
        if path.suffix == ".npy":
            import numpy as np  # optional dependency, only for .npy fields

            x = torch.from_numpy(np.load(path))
        else:
            x = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"field {path}: cannot read it: {err}") from None
    if not isinstance(x, Tensor) or x.dim() not in (2, 3) or not x.is_floating_point():
        raise ValueError(f"field {path}: expected a float tensor [N, E] or [B, N, E], got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    x = x[None] if x.dim() == 2 else x
    try:
        npix2nside(x.shape[1])
    except ValueError as err:
        raise ValueError(f"field {path}: {err}") from None
    return x


def oracle_reference(oracle: SpatialSelfAttention, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    """Oracle output, input gradient and parameter gradients for loss ``sum(oracle(x) * g)``."""
    x = x.detach().clone().requires_grad_(True)
    oracle.zero_grad(set_to_none=True)
    y = oracle(x)
    (y * g).sum().backward()
    ref = {"out": y.detach(), "dx": x.grad.detach()}
    for name, p in oracle.named_parameters():
        ref["d" + name] = p.grad.detach().clone()
    return ref


def run_case(
    cfg: VerifyConfig,
    oracle: SpatialSelfAttention,
    x: Tensor,
    g: Tensor,
    ref: dict[str, Tensor],
    *,
    strategy: str,
    backend: str,
    dtype_name: str,
    group: Optional[dist.ProcessGroup],
    device: torch.device,
    ulysses_degree: Optional[int] = None,
    label: Optional[str] = None,
) -> CaseResult:
    """Run one case on every rank of ``group`` and compare with the oracle (see module doc)."""
    dtype = DTYPES[dtype_name]
    probe = torch.empty(1, oracle.num_heads, 1, oracle.head_dim, dtype=dtype, device=device)
    kernel = select_kernel(backend, probe).name
    result = CaseResult(label or strategy, backend, kernel, dtype_name)
    info = resolve_group(group)
    rank, world = info.rank, info.world_size
    start, stop = shard_bounds(x.shape[1], world)[rank]
    x_local = x[:, start:stop].to(device=device, dtype=dtype).clone().requires_grad_(True)
    g_local = g[:, start:stop].to(device=device, dtype=dtype)
    try:
        layer = make_distributed_layer(oracle, strategy=strategy, attn_backend=backend,
                                       group=group, dtype=dtype, device=device,
                                       ulysses_degree=ulysses_degree)
        y_local = layer(x_local)
    except ValueError as err:  # raised on every rank by the library's agreement checks
        result.skipped = str(err)
        return result
    (y_local * g_local).sum().backward()
    result.executed = executed_strategy(result.strategy, world, oracle.num_heads, dtype)

    sync_gradients(layer, group)  # parameter gradients: partial sums over each rank's pixels
    out = y_local.detach() + cfg.inject_error
    pairs = [("out", out.cpu(), ref["out"][:, start:stop]),
             ("dx", x_local.grad.cpu(), ref["dx"][:, start:stop])]
    pairs += [("d" + name, p.grad.cpu(), ref["d" + name]) for name, p in layer.named_parameters()]
    result.quantities = compare_quantities(pairs, dtype_name, cfg.tolerance_scale, group, device)
    return result


def run_verify(
    cfg: VerifyConfig,
    *,
    group: Optional[dist.ProcessGroup] = None,
    device: torch.device = torch.device("cpu"),
    progress: Optional[Callable[[str], None]] = None,
) -> list[CaseResult]:
    """Every (strategy, backend, dtype) case of ``cfg`` on the ranks of ``group`` (collective)."""
    if cfg.sample_queries:  # no full field: Note [sampled verification]
        from hpattn_dist.tools.verify_sampled import run_sampled_cases

        return run_sampled_cases(cfg, group=group, device=device, progress=progress)
    torch.manual_seed(cfg.seed)
    x = load_field(cfg)
    batch, npix, embed_dim = x.shape
    oracle = SpatialSelfAttention(embed_dim, cfg.num_heads, attn_backend="manual").double()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    g = torch.randn(batch, npix, embed_dim, generator=gen, dtype=torch.float64)
    ref = oracle_reference(oracle, x, g)
    world = resolve_group(group).world_size
    variants = [(s, label, u) for s in cfg.strategy_names()
                for label, u in strategy_variants(s, world, cfg.num_heads)]
    cases = [(v, b, d) for v in variants for b in cfg.backends for d in cfg.dtypes]
    results = []
    for i, ((strategy, label, degree), backend, dtype_name) in enumerate(cases):
        if progress is not None:
            progress(f"[{i + 1}/{len(cases)}] {label} / {backend} / {dtype_name}")
        def case(reference: dict[str, Tensor]) -> CaseResult:
            return run_case(cfg, oracle, x, g, reference, strategy=strategy, backend=backend,
                            dtype_name=dtype_name, group=group, device=device,
                            ulysses_degree=degree, label=label)

        result = case(ref)
        if not result.passed and dtype_name == "float64":
            # Note [float64 reproducibility]: recompute the oracle too (its first call may be the
            # odd one) and rerun. The verdict was reduced over ranks, so every rank reruns.
            ref_again = oracle_reference(oracle, x, g)
            moved = max(float((ref_again[k] - ref[k]).abs().max()) for k in ref)
            again = case(ref_again)
            if again.passed or moved > 0:
                result.unreproducible = _unreproducible_message(result, again, moved)
            ref = ref_again
        results.append(result)
    if cfg.local_windows:
        from hpattn_dist.tools.verify_local import run_local_cases  # it builds on this module

        results += run_local_cases(cfg, x, g, group=group, device=device, progress=progress)
    if cfg.cross_nsides:
        from hpattn_dist.tools.verify_cross import run_cross_cases  # it builds on this module

        results += run_cross_cases(cfg, x, g, group=group, device=device, progress=progress)
    return results


def _worst_rel(result: CaseResult) -> float:
    return max(q.rel for q in result.quantities)


def _unreproducible_message(first: CaseResult, again: CaseResult, oracle_moved: float) -> str:
    here = ", ".join(f"{k}={os.environ.get(k, 'unset')}" for k in PINNED_MATH_ENV)
    pin = ", ".join(f"{k}={v}" for k, v in PINNED_MATH_ENV.items())
    return (
        f"not reproducible: run again in this process, the case "
        f"{'passed' if again.passed else 'failed'} (worst rel {_worst_rel(again):.1e}, first run "
        f"{_worst_rel(first):.1e}) and the float64 oracle moved by {oracle_moved:.1e}. Same "
        f"inputs, different float64 results: the platform's math library took another code path "
        f"(seen with MKL on the first multi-threaded call of a process). Here {here}; set {pin} "
        f"before starting Python (README, Troubleshooting)."
    )


def platform_info() -> dict[str, Any]:
    """What decides float64 reproducibility on CPU: threads, MKL and its ``MKL_CBWR`` mode."""
    info: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                            "mkl": torch.backends.mkl.is_available()}
    info.update({k: os.environ.get(k) for k in PINNED_MATH_ENV})
    info["mkl_cbwr_in_force"] = mkl_cbwr_in_force()
    return info


# MKL_CBWR_* branch codes of mkl_cbwr.h that mkl_serv_cbwr_get can return.
_CBWR_NAMES = {1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1",
               8: "SSE4_2", 9: "AVX", 10: "AVX2", 12: "AVX512"}


def mkl_cbwr_in_force() -> Optional[str]:
    """The CNR branch MKL itself reports (``"COMPATIBLE"`` when pinned, ``"OFF"`` by default), or
    None where torch has no MKL or does not export MKL's service symbol.

    Asking MKL initialises it, so call this only after the pin (it reads ``MKL_CBWR`` then).
    """
    if not torch.backends.mkl.is_available():
        return None
    import ctypes

    lib_dir = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        if (lib_dir / name).is_file():
            try:
                get = ctypes.CDLL(str(lib_dir / name)).mkl_serv_cbwr_get
            except (OSError, AttributeError):
                return None
            get.restype, get.argtypes = ctypes.c_int, [ctypes.c_int]
            code = get(1)  # MKL_CBWR_BRANCH
            return _CBWR_NAMES.get(code, f"branch {code}")
    return None


def format_table(results: Sequence[CaseResult], cfg: VerifyConfig, world_size: int) -> str:
    """A fixed-width table: one row per case; ``params`` is the worst parameter gradient."""
    source = f" ({cfg.field})" if cfg.field is not None else f" ({cfg.data}:{cfg.data_variable})" if cfg.data else ""
    reference = ("float64 SpatialSelfAttention(attn_backend='manual') on the full field" if not cfg.sample_queries
                 else f"float64, streamed over every rank's keys, on {cfg.sample_queries} sampled query pixels "
                      "(out: those rows; dx: every pixel; parameter gradients of the sampled loss)")
    head = (f"hpattn-dist verify: nside {cfg.nside}{source}, "
            f"P={world_size}, B={cfg.batch}, E={cfg.embed_dim}, H={cfg.num_heads}; reference: {reference}\n"
            f"allowed error (x{cfg.tolerance_scale:g}): {tolerances.describe_tolerances()}\n"
            "err/tol: the worst error over its allowed value among out, dx and every parameter "
            "gradient: the column that decides (<= 1 passes); "
            f"{torch.get_num_threads()} threads, "
            + ", ".join(f"{k}={os.environ.get(k, 'unset')}" for k in PINNED_MATH_ENV))
    cols = f"{'strategy':<17} {'backend':<7} {'kernel':<15} {'dtype':<8} " \
           f"{'out abs':>8} {'out rel':>8} {'dx abs':>8} {'dx rel':>8} " \
           f"{'param abs':>9} {'param rel':>9} {'err/tol':>8}  result"
    lines = [head, cols, "-" * len(cols)]
    for i, r in enumerate(results):
        lead = f"{_shown_strategy(r):<17} {r.backend:<7} {r.kernel:<15} {r.dtype:<8} "
        if r.skipped is not None:  # one line per strategy and reason
            prev = results[i - 1] if i else None
            if prev is None or (prev.strategy, prev.skipped) != (r.strategy, r.skipped):
                lines.append(f"{r.strategy:<17} skipped: {r.skipped}")
            continue
        by = {q.name: q for q in r.quantities}
        params = [q for q in r.quantities if q.name not in ("out", "dx")]
        worst = max(params, key=lambda q: q.violation)
        cells = [by["out"].max_abs, by["out"].rel, by["dx"].max_abs, by["dx"].rel]
        decides = max(q.violation for q in r.quantities)
        failed = [q.name for q in r.quantities if not q.passed]
        verdict = "PASS" if not failed else "FAIL (" + ", ".join(failed) + ")"
        lines.append(lead + " ".join(f"{c:8.1e}" for c in cells)
                     + f" {max(q.max_abs for q in params):9.2e} {worst.rel:9.2e} {decides:8.1e}  " + verdict)
        if r.unreproducible is not None:
            lines.append(f"{'':<10} ^ {r.unreproducible}")
        if r.measured is not None:
            m = r.measured
            lines.append(f"{'':<10} ^ forward+backward {max(m['time_s']):.1f} s; peak per rank (GiB): allocated "
                         + ", ".join(f"{b / 2**30:.3f}" for b in m["peak_allocated_bytes"]) + "; resident "
                         + ", ".join(f"{b / 2**30:.3f}" for b in m["peak_rss_bytes"]))
    n_fail = sum(not r.passed for r in results)
    n_skip = sum(r.skipped is not None for r in results)
    lines.append(f"{len(results) - n_fail - n_skip} passed, {n_fail} failed, {n_skip} skipped")
    return "\n".join(lines)


def as_json(results: Sequence[CaseResult], cfg: VerifyConfig, world_size: int) -> dict:
    return {
        "schema": "hpattn_dist.verify/1",
        "world_size": world_size,
        "config": dataclasses.asdict(cfg),
        "passed": all(r.passed for r in results),
        "platform": platform_info(),
        "cases": [r.as_dict() for r in results],
    }


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cli_verify(cfg: VerifyConfig, args: Any, device: torch.device) -> int:
    """``hpattn-dist verify`` on this rank (process group initialised); returns the exit code."""
    info = resolve_group(None)
    world, rank = info.world_size, info.rank
    progress = _stderr if rank == 0 else None
    results = run_verify(cfg, device=device, progress=progress)
    if rank == 0:
        print(format_table(results, cfg, world), flush=True)
        if args.json_path is not None:
            import json

            Path(args.json_path).write_text(json.dumps(as_json(results, cfg, world), indent=1))
    return 0 if all(r.passed for r in results) else 1
