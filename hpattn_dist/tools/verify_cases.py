"""What the three oracle checks share: the config, the layer under test, the comparison, one case.

``hpattn-dist verify`` checks the global layer (:mod:`hpattn_dist.tools.verify`), local windows
(:mod:`hpattn_dist.tools.verify_local`) and cross-grid attention
(:mod:`hpattn_dist.tools.verify_cross`) the same way: every rank runs the float64 oracle on the
FULL inputs, then the distributed layer on its shards (the plan of
:func:`hpattn_dist.healpix.shard_bounds`) with the same weights in the tested dtype, and compares
its shard of the output and input gradients, and the group-summed parameter gradients, under
Note [verify tolerances] (:func:`run_layer_case`). The three modules build on this one and not on
each other.

Legend: B batch, N = 12 * nside**2 pixels, N_r pixels on rank r, E embed dim, H heads, P ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from hpattn_dist.comm.groups import resolve_group
from hpattn_dist.grad_sync import sync_gradients
from hpattn_dist.healpix import check_nside, npix2nside, nside2npix, reorder, shard_bounds
from hpattn_dist.kernels import select_kernel
from hpattn_dist.local.windows import parse_window
from hpattn_dist.modules import DistributedSpatialSelfAttention
from hpattn_dist.oracle import ATTN_BACKENDS, SpatialSelfAttention
from hpattn_dist.precision import DTYPES
from hpattn_dist.strategies import STRATEGIES, choose_strategy
from hpattn_dist.tools import tolerances
from hpattn_dist.tools.config import load_section

__all__ = ["CaseResult", "OracleCase", "Quantity", "VerifyConfig", "compare_quantities", "executed_strategy",
           "load_field", "make_distributed_layer", "oracle_reference", "run_layer_case", "run_oracle_cases",
           "strategy_variants", "window_label"]


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


def oracle_reference(oracle: nn.Module, x: Tensor, g: Tensor, **more: Tensor) -> dict[str, Tensor]:
    """Oracle output and gradients for loss ``sum(oracle(x, *more.values()) * g)``: ``"out"``,
    ``"dx"``, ``"d" + name`` of each further input (cross-attention's ``x_kv``) and of each
    parameter."""
    inputs = {"x": x, **more}
    inputs = {name: t.detach().clone().requires_grad_(True) for name, t in inputs.items()}
    oracle.zero_grad(set_to_none=True)
    y = oracle(*inputs.values())
    (y * g).sum().backward()
    ref = {"out": y.detach()}
    ref.update({"d" + name: t.grad.detach() for name, t in inputs.items()})
    for name, p in oracle.named_parameters():
        ref["d" + name] = p.grad.detach().clone()
    return ref


def run_layer_case(
    cfg: VerifyConfig,
    build: Callable[[], nn.Module],
    inputs: Sequence[tuple[str, Tensor]],
    g: Tensor,
    ref: dict[str, Tensor],
    *,
    label: str,
    backend: str,
    dtype_name: str,
    group: Optional[dist.ProcessGroup],
    device: torch.device,
    skip_refusals: bool = False,
) -> CaseResult:
    """One case on every rank of ``group``: the layer ``build()`` returns (the oracle's weights, in
    dtype ``dtype_name`` on ``device``) on this rank's shards of ``inputs``, against ``ref``.

    Args:
        inputs: ``(name, full input)`` pairs ``[B, N, E]`` in the layer's call order (float64,
            NESTED); each is split by ``shard_bounds`` of its own N; ``ref["d" + name]`` is the
            oracle's gradient of it.
        g: the upstream gradient ``[B, N, E]`` of the output (on the grid of the first input).
        ref: :func:`oracle_reference`'s tensors for ``g``.
        skip_refusals: a ``ValueError`` from ``build`` or the forward (raised on every rank by the
            library's agreement) marks the case skipped instead of propagating.

    Returns:
        The case with ``out``, every input gradient and every parameter gradient compared (errors
        reduced over the group, ``cfg.inject_error`` added to the output).
    """
    dtype = DTYPES[dtype_name]
    probe = torch.empty(1, cfg.num_heads, 1, inputs[0][1].shape[-1] // cfg.num_heads, dtype=dtype, device=device)
    result = CaseResult(label, backend, select_kernel(backend, probe).name, dtype_name)
    info = resolve_group(group)
    bounds = [shard_bounds(full.shape[1], info.world_size)[info.rank] for _, full in inputs]
    local = [full[:, start:stop].to(device=device, dtype=dtype).clone().requires_grad_(True)
             for (_, full), (start, stop) in zip(inputs, bounds)]
    start, stop = bounds[0]
    try:
        layer = build()
        y_local = layer(*local)
    except ValueError as err:
        if not skip_refusals:
            raise
        result.skipped = str(err)
        return result
    (y_local * g[:, start:stop].to(device=device, dtype=dtype)).sum().backward()
    sync_gradients(layer, group)  # parameter gradients: partial sums over each rank's pixels
    pairs = [("out", (y_local.detach() + cfg.inject_error).cpu(), ref["out"][:, start:stop])]
    pairs += [("d" + name, x_local.grad.cpu(), ref["d" + name][:, a:b])
              for (name, _), x_local, (a, b) in zip(inputs, local, bounds)]
    pairs += [("d" + name, p.grad.cpu(), ref["d" + name]) for name, p in layer.named_parameters()]
    result.quantities = compare_quantities(pairs, dtype_name, cfg.tolerance_scale, group, device)
    return result


class OracleCase(NamedTuple):
    """One layer checked against its float64 ``oracle``: ``make_layer(attn_backend=...)`` builds
    the distributed layer; ``inputs`` are the oracle's named full inputs (the first is ``x``)."""

    label: str
    oracle: nn.Module
    make_layer: Callable[..., nn.Module]
    inputs: Sequence[tuple[str, Tensor]]


def run_oracle_cases(
    cfg: VerifyConfig,
    cases: Iterable[OracleCase],
    g: Tensor,
    *,
    group: Optional[dist.ProcessGroup] = None,
    device: torch.device = torch.device("cpu"),
    progress: Optional[Callable[[str], None]] = None,
) -> list[CaseResult]:
    """Every (backend, dtype) case of ``cfg`` for each of ``cases`` against its float64 oracle
    (reference computed once per case): the distributed layer gets the oracle's weights in each
    dtype (:func:`run_layer_case`; ``g`` as there)."""
    results = []
    for label, oracle, make_layer, inputs in cases:
        ref = oracle_reference(oracle, inputs[0][1], g, **dict(inputs[1:]))
        for backend in cfg.backends:
            for dtype_name in cfg.dtypes:
                if progress is not None:
                    progress(f"{label} / {backend} / {dtype_name}")

                def build() -> nn.Module:
                    layer = make_layer(attn_backend=backend)
                    layer.load_state_dict(oracle.state_dict())
                    return layer.to(device=device, dtype=DTYPES[dtype_name])

                results.append(run_layer_case(cfg, build, inputs, g, ref, label=label, backend=backend,
                                              dtype_name=dtype_name, group=group, device=device))
    return results


def window_label(mode: str, window_nside: int) -> str:
    """A window's row label: ``nbhd:W`` (neighbourhood) or ``cell:W``."""
    return f"{'nbhd' if mode == 'neighbourhood' else 'cell'}:{window_nside}"
