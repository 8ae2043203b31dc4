"""How ``hpattn-dist bench`` measures: peak memory (Note [peak memory]), time over repeats on the
slowest rank, the layer's forward and forward+backward times and the 1-process baseline.

Note [peak memory]
    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory
    allocated before the measured call. CPU: the Linux resident-set high-water mark: we reset it
    (``/proc/self/clear_refs`` <- ``5``), run, and report ``VmHWM - VmRSS(before)``. This counts
    every byte the process touched, torch or not; the local launcher sets
    ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors return to the OS and the mark tracks live
    tensors. Where ``clear_refs`` is unavailable it falls back to the ``ru_maxrss`` growth (a lower
    bound, marked ``"method": "ru_maxrss"``).
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from hpattn_dist.comm.counters import count_communication
from hpattn_dist.comm.groups import resolve_group
from hpattn_dist.tools.allocations import AllocatedPeak
from hpattn_dist.tools.bench_config import BenchConfig


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
        if self.device.type == "cuda":  # the allocator's peak (Note [allocated peak])
            self._cuda = AllocatedPeak(self.device).__enter__()
            self.method = self._cuda.method
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
            self._cuda.__exit__(*exc)
            self.bytes = self._cuda.peak
            return
        if self.method == "VmHWM":
            peak = _proc_status_kib("VmHWM")["VmHWM"] * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.bytes = max(0, peak - self._base)


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def barrier(group: Optional[dist.ProcessGroup] = None) -> None:
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
            barrier()
        sync_device(device)
        t0 = time.perf_counter()
        fn()
        sync_device(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    info = resolve_group(None)
    if collective and slowest and info.world_size > 1:
        t = torch.tensor(times, dtype=torch.float64, device=info.comm_device(device))
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times = t.tolist()
    return times


def gather_objects(obj: Any) -> list[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def payload_bytes(bytes_sent: dict[str, int]) -> int:
    """Bytes of attention traffic in a ``CommStats.bytes_sent`` dict, without ``*.meta`` labels."""
    return int(sum(n for label, n in bytes_sent.items() if not label.endswith(".meta")))


def layer_times(layer: nn.Module, x: Tensor | tuple[Tensor, ...], g: Tensor, cfg: BenchConfig,
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


def gather_per_rank(record: dict[str, Any]) -> dict[str, Any]:
    """Gather the per-rank parts (memory, communication) of a measurement onto every rank."""
    rows = gather_objects({"peak_mem": record.pop("peak_mem"), "comm": record.pop("comm")})
    record["peak_mem_bytes_per_rank"] = [r["peak_mem"]["bytes"] for r in rows]
    record["peak_mem_method"] = rows[0]["peak_mem"]["method"]
    record["comm_per_rank"] = [r["comm"] for r in rows]
    record["bytes_per_rank"] = [sum(r["comm"]["bytes_sent"].values()) for r in rows]
    record["payload_bytes_per_rank"] = [payload_bytes(r["comm"]["bytes_sent"]) for r in rows]
    return record


def single_process_times(layer: nn.Module, x: Tensor | tuple[Tensor, ...], g: Tensor, cfg: BenchConfig,
                          device: torch.device, threads: int) -> dict[str, Any]:
    """:func:`layer_times` of a 1-process baseline on this rank alone with ``threads`` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return layer_times(layer, x, g, cfg, device, collective=False)
    finally:
        torch.set_num_threads(before)


def ratio_or_none(value: float, base: float) -> Optional[float]:
    return value / base if base else None
