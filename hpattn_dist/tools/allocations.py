"""Peak bytes of the tensors a block of code allocates on this process (CPU and CUDA).

Note [allocated peak]
    What the capacity planner predicts (:mod:`hpattn_dist.cost_model.memory`) is the peak of the
    bytes held by tensors, the quantity ``torch.cuda.max_memory_allocated`` reports on a GPU.
    CUDA: that counter, reset at entry, minus what was allocated at entry. CPU: torch's profiler
    with ``profile_memory=True`` records every allocation and free of c10's CPU allocator (also
    inside registered operators and inside aten kernels, which a ``TorchDispatchMode`` does not
    see: it meets a custom op as one call); the running sum of those events in time order gives
    the peak. Memory outside the allocator (the Python heap, gloo's buffers, zarr's decoded
    chunks held as numpy arrays or bytes) is not counted: the resident-set measure of
    :class:`hpattn_dist.tools.bench.PeakMemory` sees it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator

import torch

__all__ = ["AllocatedPeak"]


class AllocatedPeak:
    """Peak bytes allocated by torch inside the ``with`` block, above what was live at entry
    (Note [allocated peak]). After the block: ``.peak`` (bytes), ``.end`` (bytes still held at
    the exit, e.g. what a forward saved for its backward), ``.method``.

    Example::

        with AllocatedPeak(x.device) as mem:
            layer(x).backward(g)
        mem.peak
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak = 0
        self.end = 0
        self.method = ""

    def __enter__(self) -> "AllocatedPeak":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda.max_memory_allocated"
            return self
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with _quiet_stderr():
            self._prof.__enter__()
        self.method = "profiler memory events"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            self.end = torch.cuda.memory_allocated(self.device) - self._base
            return
        with _quiet_stderr():
            self._prof.__exit__(*exc)
        events = sorted((e.start_ns(), e.nbytes()) for e in self._prof.profiler.kineto_results.events()
                        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        self.peak, self.end = peak, live
        del self._prof


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 for a moment: the profiler's library prints a line to it at every
    start and stop, whatever its log level."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
