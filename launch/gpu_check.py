#!/usr/bin/env python
"""One prepared GPU check (one CUDA device, one command, one JSON, under 5 minutes).

    python launch/gpu_check.py --out gpu_check.json [--budget-s 270]
    torchrun --nproc_per_node=2 launch/gpu_check.py --multi --out multi.json   # >= 2 GPUs
    python launch/gpu_check.py --smoke --out smoke.json     # CPU dry run of this script
    torchrun --standalone --nproc_per_node=2 launch/gpu_check.py --multi --smoke --out m.json  # CPU

Sections (each in its own try/except; a failure is recorded as ``{"error": ...}`` and the next
section runs; the JSON is rewritten after every section, so a run cut short keeps its results;
no section starts once ``--budget-s`` is spent, and every child process runs in its own session,
with a timeout capped by the budget left, and is killed with its whole process group on timeout
or when the launcher itself is interrupted):

1. ``environment``: torch / CUDA versions, device name, compute capability, flash_attn status.
2. ``kernels``: every kernel of the capability table (``hpattn_dist.kernels.dispatch.KERNEL_TABLE``:
   flash_attn, sdpa:cuda_flash, sdpa:cuda_efficient, sdpa:cpu_flash, manual) x float16, bfloat16,
   float32, float64. A kernel the table refuses for the input is recorded with its reasons (so the
   table's claims are visible next to the kernels that ran); the others run forward over all keys,
   then the block backward over two key blocks with the FINAL out (row-major, as the ring holds
   it) and lse, against a float64 softmax(QK^T)V and its autograd on the same device, with the
   tolerances of ``hpattn_dist.tools.tolerances`` (Note [verify tolerances]); peak memory per case. Also the
   kernel ``"auto"`` picks per dtype.
3. ``kernel_shapes``: every fused kernel that takes bf16 at head dims 32 to 256, odd query and key
   counts, out and dout as transposed views (``[B, N, H, D]`` memory), an empty key block (zero
   output, lse -inf) and a query row holding NaN (NaN output row, the others exact).
4. ``verify``: ``hpattn-dist verify --device cuda --nproc 1`` (every strategy, backends manual,
   sdpa and auto, float64 / float32 / bfloat16 / float16), exit code and JSON.
5. ``process_group``: in a child process, a world-1 NCCL group: every torch.distributed collective
   the library uses, ``healpix.scatter`` / ``gather`` of device and CPU tensors, the ring
   exchanger, ring / Ulysses attention forward and backward against float64 on CUDA tensors; the
   layer's time with and without an exchange timeout; a sync audit of a steady-state layer call
   (``torch.cuda.set_sync_debug_mode``: the device-to-host reads it still makes, reported).
6. ``autocast``: the layer under ``torch.autocast("cuda", bf16)`` with large logits against the
   float64 layer, next to the single-device layer under the same autocast (Note [autocast]).
7. ``compile``: in a child process, a block (LayerNorm + layer + MLP) compiled in the default and
   the ``reduce-overhead`` mode (CUDA graphs around the ``cudagraph_unsafe`` attention ops),
   forward and gradients against eager.
8. ``windowed``: ``healpix_local_attention`` at nside 256 (window nside 32, both modes, bf16),
   forward + backward time and the number of CUDA kernel launches (torch.profiler).
9. ``memory``: ``hpattn-dist bench --device cuda --nproc 1`` (fp32, H=4, E=128, nside 32 and 64,
   ring and Ulysses): time and peak memory per rank.
10. ``throughput``: fused kernel TFLOP/s at nside 64 and 128, bf16.
11. ``ring_emulation``: one process, the ring's P x P block kernel+merge path vs one fused call
    (``hpattn_dist.tools.bench.ring_emulation``) at nside 64 and 128, P = 2, 4, 8, with peak memory.

``--multi`` (under torchrun, one GPU per rank, P >= 2; rank 0 writes the JSON): real P2P ring
exchanges between neighbours, an uneven ``all_to_all``, the halo exchange of windowed attention,
ring / Ulysses / hybrid attention (its sub-groups) against float64, the overlap of a ring step's
exchange with the block computation (CUDA events), and the ring's time with and without an
exchange timeout.

``--smoke`` runs every section on the CPU at tiny sizes with gloo instead of NCCL (the CUDA
kernels then appear as refused, CUDA-only items as skipped with the reason);
``tests/unit/test_gpu_check_smoke.py`` runs it, and the ``--multi`` dry run under torchrun.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

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
                         "perf_nsides": (64, 128), "shape_n": (1001, 997), "head_dims": (32, 64, 96, 128, 192, 256),
                         "window": (256, 32), "layer_n": 3072, "multi_n": 4093, "overlap_n": 24576}
ROOT = Path(__file__).resolve().parents[1]


# --- child processes: own session, bounded by the budget, killed with their group ------------

_DEADLINE = [math.inf]  # monotonic time after which nothing new starts (main sets it)
_CHILDREN: set = set()


def _time_left() -> float:
    return _DEADLINE[0] - time.monotonic()


def _kill_children(*_: Any) -> None:
    """Kill every running child's whole process group (its ranks, compile workers...)."""
    for proc in list(_CHILDREN):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _on_signal(signum: int, _frame: Any) -> None:
    _kill_children()
    sys.exit(128 + signum)


def run_bounded(cmd: list[str], timeout: float, env: Optional[dict] = None) -> dict[str, Any]:
    """Run ``cmd`` in its own session, at most ``timeout`` seconds and never past the budget;
    on timeout kill its process group. ``{"rc", "output_tail", "timeout_s"}``, rc 124 on timeout."""
    limit = max(1.0, min(timeout, _time_left()))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=ROOT, start_new_session=True)
    _CHILDREN.add(proc)
    try:
        out, _ = proc.communicate(timeout=limit)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        rc, out = 124, f"{out or ''}\n[gpu_check] killed after {limit:.0f} s (its process group with it)"
    finally:
        _CHILDREN.discard(proc)
    return {"rc": rc, "output_tail": (out or "")[-4000:], "timeout_s": limit}


def _child_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


class _Timer:
    """Seconds of a region: CUDA events on a CUDA device (queued work included), else wall time."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, 0.0

    def __enter__(self) -> "_Timer":
        if self.device.type == "cuda":
            self._start, self._stop = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self._stop.record()
            self._stop.synchronize()
            self.seconds = self._start.elapsed_time(self._stop) / 1e3
        else:
            self.seconds = time.perf_counter() - self._t0


def _median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        with _Timer(device) as t:
            fn()
        times.append(t.seconds)
    return sorted(times)[len(times) // 2]


def _passes(got: torch.Tensor, ref: torch.Tensor, dtype_name: str) -> dict[str, Any]:
    err = float((got.double() - ref).abs().max())
    return {"max_abs": err, "rel": err / max(float(ref.abs().max()), 1e-300),
            "passed": violation(got, ref, dtype_name) <= 1.0}


def _reference(q, k, v, dout, scale):
    q, k, v = (t.detach().double().clone().requires_grad_(True) for t in (q, k, v))
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


def _shape_case(kernel: dispatch.BlockKernel, head_dim: int, device: torch.device) -> dict[str, Any]:
    """One fused kernel at ``head_dim`` (bf16): odd lengths, transposed out / dout views, an empty
    key block and a NaN query row, against float64 (Note [fused op arguments])."""
    n_q, n_k = SIZES["shape_n"]
    gen = torch.Generator(device="cpu").manual_seed(head_dim)
    heads, scale = 2, head_dim**-0.5
    q, k, v = (torch.randn(1, heads, n, head_dim, generator=gen, dtype=torch.float64).to(device)
               for n in (n_q, n_k, n_k))
    dout = torch.randn(1, n_q, heads, head_dim, generator=gen, dtype=torch.float64).to(device).transpose(1, 2)
    ref = _reference(q, k, v, dout, scale)
    dtype = torch.bfloat16
    qb, kb, vb = (t.to(dtype) for t in (q, k, v))
    o, lse = kernel.forward(qb, kb, vb, scale)
    out_t = o.to(dtype).transpose(1, 2).contiguous().transpose(1, 2)  # [B, N, H, D] memory
    prepared = kernel.prepare_backward(dout.to(dtype), qb, out_t, lse)
    dq, dk, dv, _ = kernel.backward(prepared[0], prepared[1], kb, vb, *prepared[2:], None, scale)
    res = {name: _passes(got, ref[name], "bfloat16") for name, got in
           (("out", o), ("dq", dq), ("dk", dk), ("dv", dv))}
    empty_o, empty_lse = kernel.forward(qb, kb[:, :, :0], vb[:, :, :0], scale)
    res["empty_block"] = {"passed": bool((empty_o == 0).all() and torch.isinf(empty_lse).all())}
    q_nan = qb.clone()
    q_nan[0, 1, 3, 0] = float("nan")
    o_nan, _ = kernel.forward(q_nan, kb, vb, scale)
    others = torch.ones(n_q, dtype=torch.bool, device=device)
    others[3] = False
    res["nan_row"] = {"passed": bool(torch.isnan(o_nan[0, 1, 3]).all()
                                     and torch.equal(o_nan[0, 1, others], o[0, 1, others]))}
    res["passed"] = all(r["passed"] for r in res.values())
    return res


def check_kernel_shapes(device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kernel in dispatch.KERNEL_TABLE:
        if kernel.fused_forward is None:
            continue
        for head_dim in SIZES["head_dims"]:
            key = f"{kernel.name}/D{head_dim}"
            probe = torch.empty(1, 2, SIZES["shape_n"][0], head_dim, dtype=torch.bfloat16, device=device)
            reasons = kernel.not_supported_reasons(KernelInput.of(probe))
            if reasons:
                out[key] = {"refused": reasons}
                continue
            try:
                out[key] = _shape_case(kernel, head_dim, device)
            except Exception as err:  # noqa: BLE001 - record and go on
                out[key] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    ran = [v for v in out.values() if "refused" not in v]
    out["passed"] = bool(ran) and all(v.get("passed") for v in ran)
    return out


def check_autocast(device: torch.device) -> dict[str, Any]:
    """The layer (one process) under bf16 autocast, large logits, against float64, next to the
    single-device layer under the same autocast (Note [autocast]): output and dx errors."""
    from hpattn_dist import DistributedSpatialSelfAttention, SpatialSelfAttention

    n, embed, heads = SIZES["layer_n"], 64, 4
    gen = torch.Generator(device="cpu").manual_seed(3)
    x = torch.randn(2, n, embed, generator=gen, dtype=torch.float64).to(device)
    mask = (torch.rand(2, n, generator=gen) > 0.3).to(device)
    torch.manual_seed(0)
    oracle = SpatialSelfAttention(embed, heads, attn_backend="manual").double().to(device)
    with torch.no_grad():
        oracle.qkv_proj.weight[: 2 * embed].mul_(4.0)

    def run(layer: torch.nn.Module, dtype: torch.dtype, masked: bool, autocast: bool):
        xg = x.to(dtype).detach().requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            y = layer(xg, mask if masked else None)
            y.float().sum().backward()
        return y.detach().double(), xg.grad.double()

    out: dict[str, Any] = {}
    weights = {name: t.float() for name, t in oracle.state_dict().items()}
    for backend in ("manual", "auto"):
        for masked in (False, True):
            ref = run(oracle, torch.float64, masked, False)
            single = SpatialSelfAttention(embed, heads, attn_backend=backend).to(device)
            single.load_state_dict(weights)
            dist_layer = DistributedSpatialSelfAttention(embed, heads, attn_backend=backend,
                                                         healpix_field=False).to(device)
            dist_layer.load_state_dict(single.state_dict())
            errs = {}
            for name, layer in (("single", single), ("layer", dist_layer)):
                got = run(layer, torch.float32, masked, True)
                errs[name] = [float((g - r).abs().max() / r.abs().max()) for g, r in zip(got, ref)]
            ratio = max(a / max(b, 1e-30) for a, b in zip(errs["layer"], errs["single"]))
            out[f"{backend}{'/mask' if masked else ''}"] = {"errors_y_dx": errs, "worst_ratio": ratio,
                                                            "passed": ratio <= 1.05}
    out["passed"] = all(v["passed"] for v in out.values())
    return out


def check_windowed(device: torch.device) -> dict[str, Any]:
    """Windowed attention at nside 256 (one process): time and CUDA kernel launches per call."""
    from hpattn_dist import healpix_local_attention

    nside, window = SIZES["window"]
    npix = 12 * nside**2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(5)
    q, k, v = (torch.randn(1, 4, npix, 32, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
               for _ in range(3))
    out: dict[str, Any] = {"nside": nside, "window_nside": window}
    for mode in ("cell", "neighbourhood"):
        def step() -> None:
            healpix_local_attention(q, k, v, window_nside=window, mode=mode).float().sum().backward()

        res: dict[str, Any] = {"fwd_bwd_s": _median_seconds(step, device)}
        if device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize(device)
            res["cuda_kernels"] = sum(e.count for e in prof.key_averages()
                                      if e.device_type == torch.autograd.DeviceType.CUDA)
        out[mode] = res
    return out


def _cli(args: list[str], timeout: float) -> dict[str, Any]:
    """Run ``python -m hpattn_dist args --json FILE``; exit code, JSON and the output's tail."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out.json"
        run = run_bounded([sys.executable, "-m", "hpattn_dist", *args, "--json", str(path)], timeout,
                          _child_env())
        result = json.loads(path.read_text()) if path.is_file() else None
    return {"command": "hpattn-dist " + " ".join(args), "passed": run["rc"] == 0, **run, "json": result}


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

    def layer_steps():
        from hpattn_dist import DistributedSpatialSelfAttention

        layer = DistributedSpatialSelfAttention(64, 4, healpix_field=False).to(device)
        xl = torch.randn(1, SIZES["layer_n"], 64, device=device, requires_grad=True)
        return lambda: layer(xl).sum().backward()

    def timeout_vs_none():
        step = layer_steps()
        times = {}
        for timeout in (None, 20.0):
            set_exchange_timeout(timeout)
            times[f"timeout {timeout}"] = _median_seconds(step, device)
        set_exchange_timeout(None)
        return {"fwd_bwd_s": times, "ratio": times["timeout 20.0"] / times["timeout None"]}

    def sync_audit():
        if device.type != "cuda":
            return {"skipped": "torch.cuda.set_sync_debug_mode needs CUDA"}
        from hpattn_dist import DistributedSpatialSelfAttention

        layer = DistributedSpatialSelfAttention(64, 4, healpix_field=False).to(device)
        xl = torch.randn(1, SIZES["layer_n"], 64, device=device, requires_grad=True)

        def step():  # an update between calls, as an optimizer step (Note [fingerprint one call late])
            layer(xl).sum().backward()
            with torch.no_grad():
                for p in layer.parameters():
                    if p.grad is not None:
                        p.sub_(1e-6 * p.grad)
                    p.grad = None

        step()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
        return {"syncs_per_step": len(syncs), "first": syncs[:8], "passed": None}

    return [
        ("all_reduce", all_reduce), ("all_gather_into_tensor", all_gather_into_tensor),
        ("all_gather", all_gather_list), ("all_to_all_single", all_to_all_single),
        ("all_to_all", all_to_all_list), ("reduce_scatter_tensor", reduce_scatter_tensor),
        ("broadcast", broadcast), ("barrier", lambda: dist.barrier() or {}),
        (f"healpix.scatter+gather {device.type} tensor", scatter_gather(x)),
        ("healpix.scatter+gather cpu tensor", scatter_gather(x.cpu())),
        ("ring_attention float64 fwd+bwd", attention(ring_attention)),
        ("ulysses_attention float64 fwd+bwd", attention(ulysses_attention)),
        ("layer fwd+bwd, exchange timeout 20 s vs none", timeout_vs_none),
        ("sync audit of a steady-state layer step", sync_audit),
        ("ring_exchanger send/recv to self", ring_exchanger),  # last: the likeliest to hang
    ]


def child_process_group(path: Path, smoke: bool) -> int:
    import torch.distributed as dist

    from hpattn_dist.shutdown import ending_process_group

    device = _init_world_one(smoke)
    results: dict[str, Any] = {"backend": dist.get_backend(), "device": str(device)}
    with ending_process_group():  # Note [clean exit] in hpattn_dist/shutdown.py
        for name, fn in _pg_items(device):
            try:
                res = fn() or {}
                results[name] = {"passed": None if "skipped" in res else True, **res}
                if res.get("passed", True) is None:
                    results[name]["passed"] = None
            except Exception as err:  # noqa: BLE001
                results[name] = {"passed": False, "error": f"{type(err).__name__}: {err}"}
            path.write_text(json.dumps(results, indent=1))
    return 0


def _check_child(flag: str, smoke: bool, timeout: float) -> dict[str, Any]:
    """Run this script with ``flag FILE`` in a bounded child; its items from FILE (the first item
    missing after a timeout is the one that hung)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "items.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), flag, str(path)] + (["--smoke"] if smoke else [])
        run = run_bounded(cmd, timeout, _child_env())
        items = json.loads(path.read_text()) if path.is_file() else {}
    passed = run["rc"] == 0 and all(v.get("passed") is not False for v in items.values() if isinstance(v, dict))
    return {"passed": passed, "items": items, **run}


def check_process_group(smoke: bool) -> dict[str, Any]:
    return _check_child("--child-process-group", smoke, 75)


def check_compile(smoke: bool) -> dict[str, Any]:
    return _check_child("--child-compile", smoke, 150)


def _init_world_one(smoke: bool) -> torch.device:
    import torch.distributed as dist

    device = torch.device("cpu") if smoke else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("gloo" if smoke else "nccl", init_method=f"tcp://127.0.0.1:{_free_port()}",
                            rank=0, world_size=1)
    return device


def child_compile(path: Path, smoke: bool) -> int:
    """A block (LayerNorm + layer + MLP) compiled in each mode, forward and input gradient
    against eager, on a world-1 group."""
    from hpattn_dist import DistributedSpatialSelfAttention
    from hpattn_dist.shutdown import ending_process_group

    device = _init_world_one(smoke)
    embed, n = 64, SIZES["layer_n"]
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.LayerNorm(embed), DistributedSpatialSelfAttention(embed, 4, healpix_field=False),
                                torch.nn.Linear(embed, embed)).to(device)
    x = torch.randn(1, n, embed, device=device)

    def step(model):
        xg = x.detach().requires_grad_(True)
        y = model(xg)
        y.square().sum().backward()
        return y.detach(), xg.grad

    y_ref, dx_ref = step(block)
    results: dict[str, Any] = {"device": str(device)}
    modes = ("default",) if smoke else ("default", "reduce-overhead")
    with ending_process_group():
        for mode in modes:
            try:
                t0 = time.monotonic()
                compiled = torch.compile(block, mode=mode)
                for _ in range(3):  # reduce-overhead records its graphs on a later call
                    y, dx = step(compiled)
                err = max(float((y - y_ref).abs().max()), float((dx - dx_ref).abs().max()))
                results[mode] = {"max_abs_vs_eager": err, "seconds": time.monotonic() - t0,
                                 "passed": err <= 1e-3 * float(y_ref.abs().max())}
            except Exception as err:  # noqa: BLE001
                results[mode] = {"passed": False, "error": f"{type(err).__name__}: {err}"}
            path.write_text(json.dumps(results, indent=1))
        if smoke:
            results["reduce-overhead"] = {"passed": None, "skipped": "CUDA graphs need CUDA"}
            path.write_text(json.dumps(results, indent=1))
    return 0


# --- --multi: under torchrun, one device per rank ---------------------------------------------


def _multi_items(device: torch.device, rank: int, world: int) -> list[tuple[str, Callable[[], Any]]]:
    import torch.distributed as dist

    from hpattn_dist import healpix, healpix_local_attention
    from hpattn_dist.comm import set_exchange_timeout
    from hpattn_dist.comm.all_to_all import all_to_all_flat
    from hpattn_dist.comm.groups import resolve_group
    from hpattn_dist.comm.ring import RingExchanger
    from hpattn_dist.local import dense_local_attention
    from hpattn_dist.strategies import sharded_attention

    info = resolve_group(None)
    set_exchange_timeout(20.0)

    def p2p_ring():
        send = torch.full((1000 + 7 * rank,), float(rank), device=device)
        prev = (rank - 1) % world
        recv = torch.empty(1000 + 7 * prev, device=device)
        RingExchanger(info).post([send], [recv], "gpu_check.p2p").wait()
        if not torch.equal(recv.cpu(), torch.full_like(recv.cpu(), float(prev))):
            raise AssertionError(f"received {recv[:4].tolist()}..., expected {prev}")
        return {}

    def uneven_all_to_all():
        in_splits = [rank + j + 1 for j in range(world)]
        send = torch.cat([torch.full((n,), 100.0 * rank + j) for j, n in enumerate(in_splits)]).to(device)
        out_splits = [i + rank + 1 for i in range(world)]
        got = all_to_all_flat(send, in_splits, out_splits, info, "gpu_check.all_to_all").cpu()
        expected = torch.cat([torch.full((n,), 100.0 * i + rank) for i, n in enumerate(out_splits)])
        if not torch.equal(got, expected):
            raise AssertionError("wrong pieces")
        return {}

    def field(n: int, seed: int, d: int = 16) -> list[torch.Tensor]:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return [torch.randn(2, 4, n, d, generator=gen, dtype=torch.float64) for _ in range(4)]

    def compare(fn_local, fn_full, n: int) -> dict[str, Any]:
        q, k, v, g = field(n, 11)
        lo, hi = healpix.shard_bounds(n, world)[rank]
        leaves = [t[:, :, lo:hi].to(device).requires_grad_(True) for t in (q, k, v)]
        (fn_local(*leaves) * g[:, :, lo:hi].to(device)).sum().backward()
        refs = [t.clone().requires_grad_(True) for t in (q, k, v)]
        (fn_full(*refs) * g).sum().backward()
        errs = {n_: float((a.grad.cpu() - b.grad[:, :, lo:hi]).abs().max()) for n_, a, b in zip("qkv", leaves, refs)}
        if max(errs.values()) > 1e-10:
            raise AssertionError(f"float64 gradients off: {errs}")
        return {"max_abs_grad_err": errs}

    def dense(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) / 4.0, -1) @ v

    def strategy(name: str, **kw):
        return lambda: compare(lambda *a: sharded_attention(name, *a, **kw), dense, SIZES["multi_n"])

    def halo():
        nside, window = (4, 1) if SIZES["multi_n"] < 1000 else (16, 4)
        n = 12 * nside**2
        local = lambda *a: healpix_local_attention(*a, window_nside=window, mode="neighbourhood")  # noqa: E731
        full = lambda *a: dense_local_attention(*a, window_nside=window, mode="neighbourhood")  # noqa: E731
        return compare(local, full, n)

    def overlap():
        """A ring forward vs its parts: the P block computations alone and the P - 1 exchanges
        alone (CUDA events); overlap 1 = the exchanges hid entirely behind the blocks."""
        from hpattn_dist import ring_attention
        from hpattn_dist.kernels import select_kernel
        from hpattn_dist.merge import merge_into

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        n_r = SIZES["overlap_n"] // world
        q, k, v = (torch.randn(1, 8, n_r, 64, device=device, dtype=dtype) for _ in range(3))
        kernel = select_kernel("auto", q)

        def blocks():
            out, lse = kernel.forward(q, k, v, 0.125)
            out = out.float()
            for _ in range(world - 1):
                merge_into(out, lse, *kernel.forward(q, k, v, 0.125))

        kv = torch.stack((k, v))
        exchanger = RingExchanger(info)

        def exchanges():
            recv = torch.empty_like(kv)
            for _ in range(world - 1):
                exchanger.post([kv], [recv], "gpu_check.overlap").wait()

        t = {name: _median_seconds(fn, device) for name, fn in
             (("ring_s", lambda: ring_attention(q, k, v)), ("blocks_s", blocks), ("exchanges_s", exchanges))}
        hidden = t["blocks_s"] + t["exchanges_s"] - t["ring_s"]
        return {**t, "kernel": kernel.name, "overlap": hidden / max(min(t["blocks_s"], t["exchanges_s"]), 1e-12)}

    def timeout_vs_none():
        from hpattn_dist import ring_attention

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        q, k, v = (torch.randn(1, 8, SIZES["overlap_n"] // world, 64, device=device, dtype=dtype,
                               requires_grad=True) for _ in range(3))
        times = {}
        for timeout in (None, 20.0):
            set_exchange_timeout(timeout)
            times[f"timeout {timeout}"] = _median_seconds(lambda: ring_attention(q, k, v).sum().backward(), device)
        set_exchange_timeout(20.0)
        return {"fwd_bwd_s": times, "ratio": times["timeout 20.0"] / times["timeout None"]}

    items = [("p2p ring exchange", p2p_ring), ("uneven all_to_all", uneven_all_to_all),
             ("ring float64 fwd+bwd", strategy("ring"))]
    if 4 % world == 0:
        items.append(("ulysses float64 fwd+bwd", strategy("ulysses")))
    if world % 2 == 0:
        items.append(("hybrid U=2 (sub-groups) float64 fwd+bwd", strategy("hybrid", ulysses_degree=2)))
    items += [("auto float64 fwd+bwd", strategy("auto")), ("halo exchange (windowed, float64)", halo),
              ("ring step overlap", overlap), ("ring fwd+bwd, exchange timeout 20 s vs none", timeout_vs_none)]
    return items


def run_multi(out: Path, smoke: bool, budget_s: float) -> int:
    """``--multi``: every rank runs the items in order; each writes ``out.rank<r>.json`` as it
    goes (a hang leaves the last one written), rank 0 merges them into ``out``."""
    import datetime

    import torch.distributed as dist

    from hpattn_dist.shutdown import ending_process_group

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cpu") if smoke else torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("gloo" if smoke else "nccl", timeout=datetime.timedelta(seconds=120),
                            device_id=device if device.type == "cuda" else None)
    start = time.monotonic()
    mine = out.with_name(f"{out.stem}.rank{rank}.json")
    results: dict[str, Any] = {"rank": rank, "world": world, "device": str(device), "backend": dist.get_backend()}
    with ending_process_group():
        for name, fn in _multi_items(device, rank, world):
            if time.monotonic() - start > budget_s:
                results[name] = {"skipped": f"budget of {budget_s:g} s spent"}
                continue
            try:
                res = fn() or {}
                results[name] = {"passed": None if "overlap" in res or "ratio" in res else True, **res}
            except Exception as err:  # noqa: BLE001
                results[name] = {"passed": False, "error": f"{type(err).__name__}: {err}",
                                 "traceback": traceback.format_exc()}
            mine.write_text(json.dumps(results, indent=1, default=str))
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, results)
    if rank == 0:
        passed = all(v.get("passed") is not False for r in gathered for v in r.values() if isinstance(v, dict))
        out.write_text(json.dumps({"multi": True, "smoke": smoke, "ranks": gathered, "passed": passed},
                                  indent=1, default=str))
        return 0 if passed else 1
    return 0


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
                        help="do not start a section (or a child) after this many seconds (default 270)")
    parser.add_argument("--smoke", action="store_true",
                        help="dry run on CPU at tiny sizes (checks this script, not a GPU)")
    parser.add_argument("--multi", action="store_true", help="the multi-GPU items, under torchrun")
    parser.add_argument("--child-process-group", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-compile", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        SIZES.update(n_q=45, n_k=48, heads=2, head_dim=16, verify_nside=2, pg_nside=1,
                     verify_cases=["--strategies", "ring", "--backends", "auto", "--dtypes", "float64"],
                     bench_nsides="1", perf_nsides=(2,), shape_n=(45, 43), head_dims=(32, 96),
                     window=(8, 2), layer_n=96, multi_n=29, overlap_n=512)
    if args.child_process_group is not None:
        return child_process_group(args.child_process_group, args.smoke)
    if args.child_compile is not None:
        return child_compile(args.child_compile, args.smoke)
    if args.out is None:
        parser.error("--out is required")
    if args.multi:
        return run_multi(args.out, args.smoke, args.budget_s)
    start = time.monotonic()
    _DEADLINE[0] = start + args.budget_s
    atexit.register(_kill_children)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    results: dict[str, Any] = {"sections": {}, "smoke": args.smoke}
    device = torch.device("cpu") if args.smoke else torch.device("cuda", 0)
    sections: list[tuple[str, Callable[[], Any]]] = [
        ("environment", environment),
        ("kernels", lambda: check_kernels(device)),
        ("kernel_shapes", lambda: check_kernel_shapes(device)),
        ("verify", lambda: check_verify(device)),
        ("process_group", lambda: check_process_group(args.smoke)),
        ("autocast", lambda: check_autocast(device)),
        ("compile", lambda: check_compile(args.smoke)),
        ("windowed", lambda: check_windowed(device)),
        ("memory", lambda: check_memory(device)),
        ("throughput", lambda: check_throughput(device)),
        ("ring_emulation", lambda: check_ring_emulation(device)),
    ]
    for name, fn in sections:
        if _time_left() <= 0:
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
    checked = [results["sections"][n] for n in ("kernels", "kernel_shapes", "verify", "process_group",
                                                 "autocast", "compile")]
    results["passed"] = all(isinstance(s, dict) and s.get("passed") for s in checked)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
