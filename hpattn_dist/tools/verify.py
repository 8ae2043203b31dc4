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
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from hpattn_dist.comm.groups import resolve_group
from hpattn_dist.oracle import SpatialSelfAttention
from hpattn_dist.precision import DTYPES
from hpattn_dist.tools import tolerances
from hpattn_dist.tools.platform import PINNED_MATH_ENV
from hpattn_dist.tools.verify_cases import (  # noqa: F401  (Quantity: re-exported, callers read it here)
    CaseResult, Quantity, VerifyConfig, executed_strategy, load_field, make_distributed_layer, oracle_reference,
    run_layer_case, run_oracle_cases, strategy_variants,
)
from hpattn_dist.tools.verify_cross import cross_cases
from hpattn_dist.tools.verify_local import local_cases
from hpattn_dist.tools.verify_sampled import run_sampled_cases


def _shown_strategy(r: "CaseResult") -> str:
    if r.executed is None or r.executed == r.strategy:
        return r.strategy
    return f"{r.strategy}={r.executed}"


def run_verify(
    cfg: VerifyConfig,
    *,
    group: Optional[dist.ProcessGroup] = None,
    device: torch.device = torch.device("cpu"),
    progress: Optional[Callable[[str], None]] = None,
) -> list[CaseResult]:
    """Every (strategy, backend, dtype) case of ``cfg`` on the ranks of ``group`` (collective)."""
    if cfg.sample_queries:  # no full field: Note [sampled verification]
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
            dtype = DTYPES[dtype_name]

            def build() -> torch.nn.Module:
                return make_distributed_layer(oracle, strategy=strategy, attn_backend=backend, group=group,
                                              dtype=dtype, device=device, ulysses_degree=degree)

            result = run_layer_case(cfg, build, [("x", x)], g, reference, label=label, backend=backend,
                                    dtype_name=dtype_name, group=group, device=device, skip_refusals=True)
            if result.skipped is None:
                result.executed = executed_strategy(label, world, cfg.num_heads, dtype)
            return result

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
    for cases in (local_cases(cfg, x, group), cross_cases(cfg, x, group)):  # none unless configured
        results += run_oracle_cases(cfg, cases, g, group=group, device=device, progress=progress)
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
