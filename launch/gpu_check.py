#!/usr/bin/env python
"""One prepared GPU check (one CUDA device, one command, one JSON, under 5 minutes).

    python launch/gpu_check.py --out gpu_check.json [--budget-s 270]
    python launch/gpu_check.py --smoke --out smoke.json     # CPU dry run of this script

Sections (each in its own try/except; a failure is recorded as ``{"error": ...}`` and the next
section runs; the JSON is rewritten after every section, so a run cut short keeps its results):

1. ``environment``: torch / CUDA versions, device name, compute capability, flash_attn status.
2. ``kernels``: every kernel of the capability table (``hpattn_dist.kernels.dispatch.KERNEL_TABLE``:
   flash_attn, sdpa:cuda_flash, sdpa:cuda_efficient, sdpa:cpu_flash, manual) x float16, bfloat16,
   float32, float64. A kernel the table refuses for the input is recorded with its reasons (so the
   table's claims are visible next to the kernels that ran); the others run forward over all keys,
   then the block backward over two key blocks with the FINAL out (row-major, as the ring holds
   it) and lse, against a float64 softmax(QK^T)V and its autograd on the same device, with the
   tolerances of ``hpattn_dist.tools.tolerances`` (Note [verify tolerances]); peak memory per case. Also the
   kernel ``"auto"`` picks per dtype.
3. ``verify``: ``hpattn-dist verify --device cuda --nproc 1`` (every strategy, backends manual,
   sdpa and auto, float64 / float32 / bfloat16 / float16), exit code and JSON.
4. ``process_group``: in a child process (bounded, so a hang cannot stall the check), a world-1
   NCCL group: every torch.distributed collective the library uses, ``healpix.scatter`` /
   ``gather`` of device and CPU tensors, the ring exchanger, ring / Ulysses attention forward and
   backward against float64 on CUDA tensors.
5. ``memory``: ``hpattn-dist bench --device cuda --nproc 1`` (fp32, H=4, E=128, nside 32 and 64,
   ring and Ulysses): time and peak memory per rank.
6. ``throughput``: fused kernel TFLOP/s at nside 64 and 128, bf16.
7. ``ring_emulation``: one process, the ring's P x P block kernel+merge path vs one fused call
   (``hpattn_dist.tools.bench.ring_emulation``) at nside 64 and 128, P = 2, 4, 8, with peak memory.

``--smoke`` runs every section on the CPU at tiny sizes with gloo instead of NCCL (the CUDA
kernels then appear as refused); ``tests/integration/test_gpu_check_smoke.py`` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from hpattn_dist.tools.bench import ring_emulation, time_call
from hpattn_dist.kernels import dispatch, select_kernel
from hpattn_dist.kernels.capability import KernelInput
from hpattn_dist.kernels.manual import acc_dtype
from hpattn_dist.precision import DTYPES
from hpattn_dist.tools.tolerances import violation
# Sizes; ``--smoke`` shrinks them for the CPU dry run.
SIZES: dict[str, Any] = {"n_q": 3067, "n_k": 3072, "heads": 4, "head_dim": 64, "verify_nside": 8,
                         "verify_cases": [], "pg_nside": 4, "bench_nsides": "32,64",
                         "perf_nsides": (64, 128)}
ROOT = Path(__file__).resolve().parents[1]


def _passes(got: torch.Tensor, ref: torch.Tensor, dtype_name: str) -> dict[str, Any]:
    err = float((got.double() - ref).abs().max())
    return {"max_abs": err, "rel": err / max(float(ref.abs().max()), 1e-300),
            "passed": violation(got, ref, dtype_name) <= 1.0}


def _reference(q, k, v, dout, scale):
    q, k, v = (t.double().requires_grad_(True) for t in (q, k, v))
    s = (q @ k.transpose(-2, -1)) * scale
    lse = torch.logsumexp(s, -1)
    out = torch.softmax(s, -1) @ v
    out.backward(dout.double())
    return {"out": out.detach(), "lse": lse.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> Any:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _run_kernel(kernel: dispatch.BlockKernel, base: list, ref: dict, dtype: torch.dtype,
                dname: str, scale: float, device: torch.device) -> dict[str, Any]:
    q, k, v, dout = (t.to(dtype) for t in base)
    n_k = k.shape[2]
    blocks = [(0, n_k // 3), (n_k // 3, n_k)]
    _reset_peak(device)
    t0 = time.perf_counter()
    o, lse = kernel.forward(q, k, v, scale)
    acc = acc_dtype(dtype)
    out_final = o.to(dtype).contiguous()  # row-major, as the ring's merged output
    delta = (dout.to(acc) * out_final.to(acc)).sum(-1)
    dq = torch.zeros(q.shape, dtype=acc, device=device)
    dks, dvs = [], []
    for a, b in blocks:
        dq_b, dk_b, dv_b, _ = kernel.backward(dout, q, k[:, :, a:b], v[:, :, a:b], out_final,
                                              lse.to(acc), delta, scale)
        dq += dq_b.to(acc)
        dks.append(dk_b)
        dvs.append(dv_b)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    res: dict[str, Any] = {name: _passes(got, ref[name], dname) for name, got in
                           (("out", o), ("dq", dq), ("dk", torch.cat(dks, 2)), ("dv", torch.cat(dvs, 2)))}
    res["lse"] = {"max_abs": float((lse.double() - ref["lse"]).abs().max())}
    res["passed"] = all(r["passed"] for n, r in res.items() if n != "lse")
    res["seconds"] = time.perf_counter() - t0
    res["peak_mem_bytes"] = _peak(device)
    return res


def check_kernels(device: torch.device) -> dict[str, Any]:
    heads, head_dim = SIZES["heads"], SIZES["head_dim"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    shapes = [(1, heads, SIZES["n_q"], head_dim), (1, heads, SIZES["n_k"], head_dim),
              (1, heads, SIZES["n_k"], head_dim), (1, heads, SIZES["n_q"], head_dim)]
    base = [torch.randn(s, generator=gen, dtype=torch.float64).to(device) for s in shapes]
    scale = head_dim**-0.5
    ref = _reference(*base, scale)
    out: dict[str, Any] = {"auto": {}}
    for dname, dtype in DTYPES.items():
        q = base[0].to(dtype)
        out["auto"][dname] = select_kernel("auto", q).name
        for kernel in dispatch.KERNEL_TABLE:
            key = f"{kernel.name}/{dname}"
            reasons = kernel.not_supported_reasons(KernelInput.of(q))
            if reasons:
                out[key] = {"refused": reasons}
                continue
            try:
                out[key] = _run_kernel(kernel, base, ref, dtype, dname, scale, device)
            except Exception as err:  # noqa: BLE001 - record and go on
                out[key] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    ran = [v for key, v in out.items() if key != "auto" and "refused" not in v]
    out["passed"] = bool(ran) and all(v.get("passed") for v in ran)
    return out


def _cli(args: list[str], timeout: float) -> dict[str, Any]:
    """Run ``python -m hpattn_dist args --json FILE``; exit code, JSON and the output's tail."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out.json"
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        try:
            proc = subprocess.run([sys.executable, "-m", "hpattn_dist", *args, "--json", str(path)],
                                  capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-4000:]
        except subprocess.TimeoutExpired as err:
            rc, tail = 124, f"timed out after {timeout:g} s: {str(err.output)[-2000:]}"
        result = json.loads(path.read_text()) if path.is_file() else None
    return {"command": "hpattn-dist " + " ".join(args), "rc": rc, "passed": rc == 0,
            "output_tail": tail, "json": result}


def check_verify(device: torch.device) -> dict[str, Any]:
    return _cli(["verify", "--device", device.type, "--nproc", "1", "--nside", str(SIZES["verify_nside"]),
                 "--backends", "manual,sdpa,auto", "--dtypes", "float64,float32,bfloat16,float16",
                 *SIZES["verify_cases"]], timeout=150)


def check_memory(device: torch.device) -> dict[str, Any]:
    extra = ["--no-deepspeed"] if device.type == "cpu" else []  # the smoke run skips the peer
    return _cli(["bench", "--device", device.type, "--nproc", "1", "--nsides", SIZES["bench_nsides"],
                 "--dtype", "float32", "--heads", "4", "--embed-dim", "128",
                 "--strategies", "ring,ulysses", "--warmup", "1", "--repeats", "2", *extra],
                timeout=120)


def check_throughput(device: torch.device) -> dict[str, Any]:
    out = {}
    for nside in SIZES["perf_nsides"]:
        npix, heads, head_dim = 12 * nside**2, 8, 64
        q, k, v, dout = (torch.randn(1, heads, npix, head_dim, device=device, dtype=torch.bfloat16)
                         for _ in range(4))
        kernel = select_kernel("auto", q)
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
    """One process: the ring's P x P block kernel + merge path vs one fused call (figure (a))."""
    out = {}
    for nside in SIZES["perf_nsides"]:
        npix, heads, head_dim = 12 * nside**2, 8, 64
        q, k, v, dout = (torch.randn(1, heads, npix, head_dim, device=device, dtype=torch.bfloat16)
                         for _ in range(4))
        for blocks in (2, 4, 8):
            try:
                _reset_peak(device)
                res = ring_emulation(q, k, v, dout, blocks, "auto", warmup=1, repeats=3)
                res["peak_mem_bytes"] = _peak(device)
                out[f"nside{nside}/P{blocks}"] = res
            except Exception as err:  # noqa: BLE001
                out[f"nside{nside}/P{blocks}"] = {"error": f"{type(err).__name__}: {err}"}
    return out


# --- process group (runs in a child: ``--child-process-group FILE``) -------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_items(device: torch.device) -> list[tuple[str, Callable[[], Any]]]:
    import torch.distributed as dist

    from hpattn_dist import healpix, ring_attention, ulysses_attention
    from hpattn_dist.comm import set_exchange_timeout
    from hpattn_dist.comm.groups import resolve_group
    from hpattn_dist.comm.ring import RingExchanger

    x = torch.randn(2, 12 * SIZES["pg_nside"] ** 2, 8, device=device)

    def same(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
        if not torch.equal(a.cpu(), b.cpu()):
            raise AssertionError(f"max diff {(a.double().cpu() - b.double().cpu()).abs().max().item()}")
        return {}

    def all_reduce():
        y = x.clone()
        dist.all_reduce(y)
        return same(y, x)

    def all_gather_into_tensor():
        y = torch.empty_like(x)
        dist.all_gather_into_tensor(y, x)
        return same(y, x)

    def all_gather_list():
        ys = [torch.empty_like(x)]
        dist.all_gather(ys, x)
        return same(ys[0], x)

    def all_to_all_single():
        y = torch.empty_like(x)
        dist.all_to_all_single(y, x)
        return same(y, x)

    def all_to_all_list():
        ys = [torch.empty_like(x)]
        dist.all_to_all(ys, [x.clone()])
        return same(ys[0], x)

    def reduce_scatter_tensor():
        y = torch.empty_like(x)
        dist.reduce_scatter_tensor(y, x)
        return same(y, x)

    def broadcast():
        y = x.clone()
        dist.broadcast(y, 0)
        return same(y, x)

    def scatter_gather(src: torch.Tensor):
        def run():
            shard = healpix.scatter(src)
            return same(healpix.gather(shard), src)
        return run

    def ring_exchanger():
        if not dist.get_backend().startswith("nccl"):
            return {"skipped": "gloo cannot send to its own rank (world 1)"}
        set_exchange_timeout(20.0)
        recv = torch.empty_like(x)
        RingExchanger(resolve_group(None)).post([x], [recv], "gpu_check").wait()
        return same(recv, x)

    def attention(fn):
        def run():
            gen = torch.Generator(device="cpu").manual_seed(1)
            q, k, v, g = (torch.randn(2, 4, x.shape[1], 16, generator=gen, dtype=torch.float64)
                          for _ in range(4))
            leaves = [t.to(device).detach().requires_grad_(True) for t in (q, k, v)]
            (fn(*leaves) * g.to(device)).sum().backward()
            refs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
            (torch.softmax(refs[0] @ refs[1].transpose(-2, -1) / 4.0, -1) @ refs[2] * g).sum().backward()
            errs = {n: float((a.grad.cpu() - b.grad).abs().max()) for n, a, b in zip("qkv", leaves, refs)}
            if max(errs.values()) > 1e-10:
                raise AssertionError(f"float64 gradients off: {errs}")
            return {"max_abs_grad_err": errs}
        return run

    return [
        ("all_reduce", all_reduce), ("all_gather_into_tensor", all_gather_into_tensor),
        ("all_gather", all_gather_list), ("all_to_all_single", all_to_all_single),
        ("all_to_all", all_to_all_list), ("reduce_scatter_tensor", reduce_scatter_tensor),
        ("broadcast", broadcast), ("barrier", lambda: dist.barrier() or {}),
        (f"healpix.scatter+gather {device.type} tensor", scatter_gather(x)),
        ("healpix.scatter+gather cpu tensor", scatter_gather(x.cpu())),
        ("ring_attention float64 fwd+bwd", attention(ring_attention)),
        ("ulysses_attention float64 fwd+bwd", attention(ulysses_attention)),
        ("ring_exchanger send/recv to self", ring_exchanger),  # last: the likeliest to hang
    ]


def child_process_group(path: Path, smoke: bool) -> int:
    import torch.distributed as dist

    from hpattn_dist.shutdown import ending_process_group

    device = torch.device("cpu") if smoke else torch.device("cuda", 0)
    backend = "gloo" if smoke else "nccl"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1)
    results: dict[str, Any] = {"backend": backend, "device": str(device)}
    with ending_process_group():  # Note [clean exit] in hpattn_dist/shutdown.py
        for name, fn in _pg_items(device):
            try:
                res = fn() or {}
                results[name] = {"passed": None if "skipped" in res else True, **res}
            except Exception as err:  # noqa: BLE001
                results[name] = {"passed": False, "error": f"{type(err).__name__}: {err}"}
            path.write_text(json.dumps(results, indent=1))
    return 0


def check_process_group(smoke: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pg.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-process-group", str(path)]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        try:
            proc = subprocess.run(cmd + (["--smoke"] if smoke else []), capture_output=True,
                                  text=True, timeout=60, env=env)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired:
            rc, tail = 124, "timed out after 60 s (the first item missing below hung)"
        items = json.loads(path.read_text()) if path.is_file() else {}
    passed = rc == 0 and all(v.get("passed") is not False for v in items.values() if isinstance(v, dict))
    return {"rc": rc, "passed": passed, "items": items, "output_tail": tail}


def environment() -> dict[str, Any]:
    from hpattn_dist.kernels import flash_attn as fa

    env: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                           "cuda_available": torch.cuda.is_available(),
                           "flash_attn": fa.library_problem() or "available"}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["capability"] = list(torch.cuda.get_device_capability(0))
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="JSON file to write")
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="do not start a section after this many seconds (default 270)")
    parser.add_argument("--smoke", action="store_true",
                        help="dry run on CPU at tiny sizes (checks this script, not a GPU)")
    parser.add_argument("--child-process-group", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        SIZES.update(n_q=45, n_k=48, heads=2, head_dim=16, verify_nside=2, pg_nside=1,
                     verify_cases=["--strategies", "ring", "--backends", "auto", "--dtypes", "float64"],
                     bench_nsides="1", perf_nsides=(2,))
    if args.child_process_group is not None:
        return child_process_group(args.child_process_group, args.smoke)
    if args.out is None:
        parser.error("--out is required")
    start = time.monotonic()
    results: dict[str, Any] = {"sections": {}, "smoke": args.smoke}
    device = torch.device("cpu") if args.smoke else torch.device("cuda", 0)
    sections: list[tuple[str, Callable[[], Any]]] = [
        ("environment", environment),
        ("kernels", lambda: check_kernels(device)),
        ("verify", lambda: check_verify(device)),
        ("process_group", lambda: check_process_group(args.smoke)),
        ("memory", lambda: check_memory(device)),
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
    checked = [results["sections"][n] for n in ("kernels", "verify", "process_group")]
    results["passed"] = all(isinstance(s, dict) and s.get("passed") for s in checked)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
