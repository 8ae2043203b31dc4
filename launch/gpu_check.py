#!/usr/bin/env python
"""One prepared GPU check (one CUDA device, under 5 minutes): correctness, throughput, ring emulation.

    python launch/gpu_check.py --out gpu_check.json [--budget-s 270]

Sections (each in its own try/except; a failure is recorded as ``{"error": ...}`` and the next
section runs):

1. ``environment``: torch / CUDA versions, device name, capability, flash_attn availability.
2. ``kernels``: every CUDA block kernel (``sdpa:cuda_flash``, ``sdpa:cuda_efficient``,
   ``flash_attn`` when installed, ``manual``) x dtype (bf16, fp16, fp32), forward (out, lse) and
   backward (dq, dk, dv) at nside 16 against a float64 explicit softmax(QK^T)V on the same GPU;
   tolerances of ``hpattn_dist.verify`` (Note [verify tolerances]).
3. ``layer``: ``DistributedSpatialSelfAttention`` (one process, no process group) vs the float64
   oracle ``SpatialSelfAttention(attn_backend="manual")``, forward and backward, bf16/fp16/fp32.
4. ``throughput``: fused kernel TFLOP/s (forward 4 B H N^2 D flops, backward 2.5x that) at
   nside 64 and 128, bf16, B=1, H=8, D=64.
5. ``ring_emulation``: one process, the ring's P x P block kernel+merge path vs one fused call
   (``hpattn_dist.bench.ring_emulation``) at nside 64 and 128, P = 2, 4, 8; the efficiency is
   ``t_fused / t_blocks``; peak memory of the fused call.

The JSON is rewritten after every section, so a run cut short still leaves its results. Sections
that would start after ``--budget-s`` seconds are skipped (recorded as such). Not imported by the
tests (it needs a GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from hpattn_dist.bench import ring_emulation, time_call
from hpattn_dist.kernels import dispatch
from hpattn_dist.kernels.manual import acc_dtype
from hpattn_dist.modules import DistributedSpatialSelfAttention
from hpattn_dist.oracle import SpatialSelfAttention
from hpattn_dist.verify import TOLERANCES

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Resolutions: correctness checks, throughput / emulation (``--smoke`` shrinks them for a CPU dry run).
SIZES = {"check_nside": 16, "layer_nside": 8, "perf_nsides": (64, 128)}


def _passes(got: torch.Tensor, ref: torch.Tensor, dtype_name: str) -> dict[str, Any]:
    err = (got.double() - ref).abs()
    ref_max = float(ref.abs().max())
    scale = max(1.0, ref_max)
    kind, tol = TOLERANCES[dtype_name]
    if kind == "abs":
        ok = float(err.max()) <= tol * scale
    elif kind == "rel":
        ok = float(err.max()) <= tol * ref_max
    else:
        ok = bool((err <= tol * (scale + ref.abs())).all())
    return {"max_abs": float(err.max()), "rel": float(err.max()) / max(ref_max, 1e-300), "passed": ok}


def _reference(q, k, v, dout, scale):
    q, k, v = (t.double().requires_grad_(True) for t in (q, k, v))
    s = (q @ k.transpose(-2, -1)) * scale
    lse = torch.logsumexp(s, -1)
    out = torch.softmax(s, -1) @ v
    out.backward(dout.double())
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def check_kernels(device: torch.device) -> dict[str, Any]:
    from hpattn_dist.kernels import flash_attn as fa

    kernels = {"sdpa:cuda_flash": dispatch._CUDA_FLASH, "sdpa:cuda_efficient": dispatch._CUDA_EFFICIENT,
               "manual": dispatch.MANUAL}
    if fa.available() is None:
        kernels["flash_attn"] = dispatch._FLASH_ATTN
    npix, heads, head_dim = 12 * SIZES["check_nside"] ** 2, 4, 64
    gen = torch.Generator(device="cpu").manual_seed(0)
    base = [torch.randn(1, heads, npix, head_dim, generator=gen, dtype=torch.float64).to(device)
            for _ in range(4)]
    scale = head_dim**-0.5
    ref = _reference(*base, scale)
    out: dict[str, Any] = {}
    for kname, kernel in kernels.items():
        for dname, dtype in DTYPES.items():
            key = f"{kname}/{dname}"
            try:
                q, k, v, dout = (t.to(dtype) for t in base)
                if kname in ("sdpa:cuda_flash", "flash_attn") and dtype == torch.float32:
                    out[key] = {"skipped": "fp16/bf16 only"}
                    continue
                o, lse = kernel.forward(q, k, v, scale)
                o = o.to(dtype)
                acc = acc_dtype(dtype)
                delta = (dout.to(acc) * o.to(acc)).sum(-1)
                dq, dk, dv, _ = kernel.backward(dout, q, k, v, o, lse.to(acc), delta, scale)
                res = {n: _passes(g, r, dname) for n, g, r in
                       (("out", o, ref[0]), ("dq", dq, ref[2]), ("dk", dk, ref[3]), ("dv", dv, ref[4]))}
                res["lse"] = {"max_abs": float((lse.double() - ref[1]).abs().max())}
                res["passed"] = all(r["passed"] for n, r in res.items() if n != "lse")
                out[key] = res
            except Exception as err:  # noqa: BLE001 - record and go on
                out[key] = {"error": f"{type(err).__name__}: {err}"}
    return out


def check_layer(device: torch.device) -> dict[str, Any]:
    npix, embed, heads = 12 * SIZES["layer_nside"] ** 2, 64, 4
    torch.manual_seed(0)
    oracle = SpatialSelfAttention(embed, heads, attn_backend="manual").double().to(device)
    x = torch.randn(2, npix, embed, dtype=torch.float64, device=device)
    g = torch.randn_like(x)
    xr = x.clone().requires_grad_(True)
    (oracle(xr) * g).sum().backward()
    ref = {"out": oracle(x).detach(), "dx": xr.grad}
    ref.update({"d" + n: p.grad for n, p in oracle.named_parameters()})
    out = {}
    for backend in ("sdpa", "manual", "auto"):
        for dname, dtype in DTYPES.items():
            key = f"{backend}/{dname}"
            try:
                layer = DistributedSpatialSelfAttention(embed, heads, attn_backend=backend, strategy="ring")
                layer.load_state_dict(oracle.state_dict())
                layer = layer.to(device=device, dtype=dtype)
                xl = x.to(dtype).requires_grad_(True)
                y = layer(xl)
                (y * g.to(dtype)).sum().backward()
                res = {"out": _passes(y.detach(), ref["out"], dname), "dx": _passes(xl.grad, ref["dx"], dname)}
                for n, p in layer.named_parameters():
                    res["d" + n] = _passes(p.grad, ref["d" + n], dname)
                res["passed"] = all(r["passed"] for r in res.values())
                out[key] = res
            except Exception as err:  # noqa: BLE001
                out[key] = {"error": f"{type(err).__name__}: {err}"}
    return out


def check_throughput(device: torch.device) -> dict[str, Any]:
    out = {}
    for nside in SIZES["perf_nsides"]:
        npix, heads, head_dim = 12 * nside**2, 8, 64
        q, k, v, dout = (torch.randn(1, heads, npix, head_dim, device=device, dtype=torch.bfloat16)
                         for _ in range(4))
        kernel = dispatch.select_kernel("auto", q)
        scale = head_dim**-0.5
        flops_fwd = 4 * heads * npix**2 * head_dim

        def fwd():
            return kernel.forward(q, k, v, scale)

        def fwd_bwd():
            o, lse = kernel.forward(q, k, v, scale)
            delta = (dout.float() * o.float()).sum(-1)
            kernel.backward(dout, q, k, v, o.to(q.dtype), lse, delta, scale)

        t_f = sorted(time_call(fwd, 1, 3, device, collective=False))[1]
        t_fb = sorted(time_call(fwd_bwd, 1, 3, device, collective=False))[1]
        out[f"nside{nside}"] = {"kernel": kernel.name, "npix": npix, "fwd_s": t_f, "fwd_bwd_s": t_fb,
                                "tflops_fwd": flops_fwd / t_f / 1e12,
                                "tflops_fwd_bwd": 3.5 * flops_fwd / t_fb / 1e12}
    return out


def check_ring_emulation(device: torch.device) -> dict[str, Any]:
    out = {}
    for nside in SIZES["perf_nsides"]:
        npix, heads, head_dim = 12 * nside**2, 8, 64
        q, k, v, dout = (torch.randn(1, heads, npix, head_dim, device=device, dtype=torch.bfloat16)
                         for _ in range(4))
        for blocks in (2, 4, 8):
            try:
                res = ring_emulation(q, k, v, dout, blocks, "auto", warmup=1, repeats=3)
                if device.type == "cuda":
                    res["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
                out[f"nside{nside}/P{blocks}"] = res
            except Exception as err:  # noqa: BLE001
                out[f"nside{nside}/P{blocks}"] = {"error": f"{type(err).__name__}: {err}"}
    return out


def environment() -> dict[str, Any]:
    from hpattn_dist.kernels import flash_attn as fa

    env: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                           "cuda_available": torch.cuda.is_available(),
                           "flash_attn": fa.available() or "available"}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["capability"] = list(torch.cuda.get_device_capability(0))
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="do not start a section after this many seconds (default 270)")
    parser.add_argument("--smoke", action="store_true",
                        help="dry run on CPU at tiny sizes (checks this script, not a GPU)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    results: dict[str, Any] = {"sections": {}, "smoke": args.smoke}
    device = torch.device("cpu") if args.smoke else torch.device("cuda", 0)
    if args.smoke:
        SIZES.update(check_nside=4, layer_nside=2, perf_nsides=(4, 8))
    sections: list[tuple[str, Callable[[], Any]]] = [
        ("environment", environment),
        ("kernels", lambda: check_kernels(device)),
        ("layer", lambda: check_layer(device)),
        ("throughput", lambda: check_throughput(device)),
        ("ring_emulation", lambda: check_ring_emulation(device)),
    ]
    for name, fn in sections:
        elapsed = time.monotonic() - start
        if elapsed > args.budget_s:
            results["sections"][name] = {"skipped": f"budget of {args.budget_s:g} s spent"}
            continue
        t0 = time.monotonic()
        try:
            if name != "environment" and device.type == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("CUDA is not available")
            results["sections"][name] = fn()
        except Exception as err:  # noqa: BLE001 - every section is independent
            results["sections"][name] = {"error": f"{type(err).__name__}: {err}",
                                         "traceback": traceback.format_exc()}
        results["sections"][name + "_s"] = time.monotonic() - t0
        results["elapsed_s"] = time.monotonic() - start
        args.out.write_text(json.dumps(results, indent=1, default=str))
        print(f"[gpu_check] {name}: {results['sections'][name + '_s']:.1f} s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
