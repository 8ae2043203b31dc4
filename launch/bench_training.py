"""Training-side figures of issue 15 at world 2 (gloo, CPU): checkpointing bytes and memory,
eager vs compiled time, graph breaks.

Per strategy (ring, ulysses, hybrid with U = 2, auto) and rank, for a block LayerNorm +
DistributedSpatialSelfAttention + MLP (float64, B=2, N=768, E=32, H=4 by default):

- bytes sent in the backward: plain, ``checkpoint``, ``checkpoint`` + ``checkpoint_context_fn``;
- memory held from forward to backward and the peak (``torch.distributed._tools.mem_tracker``, a
  dispatch mode that does not see allocations inside the attention op), and the process's peak
  over forward + backward (``PeakMemory`` of ``hpattn-dist bench``: VmHWM on Linux, which sees
  everything; freed tensors return to the OS, ``MALLOC_MMAP_THRESHOLD_``);
- forward + backward time eager vs ``torch.compile(fullgraph=True)``: eager and compiled steps
  alternate in one run, and the ratio is the median of the pairs' ratios (robust to a loaded
  machine; the eager median in ms gives the scale);
- ``torch._dynamo.explain`` graph-break count of the block and of the block checkpointed with
  ``checkpoint_context_fn`` (no dynamo configuration).

Run: ``python launch/bench_training.py [--npix 768]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch._dynamo
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hpattn_dist import (  # noqa: E402
    DistributedSpatialSelfAttention, checkpoint_context_fn, choose_strategy, count_communication,
)
from hpattn_dist.shutdown import shutdown_process_group  # noqa: E402
from hpattn_dist.tools.bench import PeakMemory  # noqa: E402

B, E, H = 2, 32, 4


class Block(nn.Module):
    def __init__(self, strategy: str, **kw) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(E), nn.LayerNorm(E)
        self.attn = DistributedSpatialSelfAttention(E, H, attn_backend="manual", strategy=strategy, **kw)
        self.mlp = nn.Sequential(nn.Linear(E, 4 * E), nn.GELU(), nn.Linear(4 * E, E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _memory(block, x, mode: str) -> tuple[int, int]:
    """``(held, peak)``: bytes of tensors alive after the forward beyond those alive before it
    (what is kept for the backward), and the peak of forward + backward; from torch's MemTracker
    (a dispatch mode: allocations inside the attention op's body are not seen, its outputs are)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    cpu = torch.device("cpu")
    tracker = MemTracker()
    tracker.track_external(block)
    with tracker:
        before = tracker.get_tracker_snapshot("current")[cpu]["Total"]
        xr = x.clone().requires_grad_()
        y = _forward(block, xr, mode)
        held = tracker.get_tracker_snapshot("current")[cpu]["Total"] - before
        y.sum().backward()
        del y, xr
    return int(held), int(tracker.get_tracker_snapshot("peak")[cpu]["Total"])


def _forward(block, x, mode: str) -> torch.Tensor:
    if mode == "plain":
        return block(x)
    if mode == "checkpoint":
        return checkpoint(block, x, use_reentrant=False)
    return checkpoint(block, x, use_reentrant=False, context_fn=checkpoint_context_fn)


def _step(block, x, mode: str):
    x = x.clone().requires_grad_()
    with count_communication() as fwd:
        y = _forward(block, x, mode)
    with count_communication() as bwd:
        y.sum().backward()
    return fwd.total_bytes, bwd.total_bytes


def _timed_pairs(eager, compiled, reps: int = 7) -> tuple[float, float]:
    """``(median eager seconds, median of compiled / eager per pair)``; the two alternate so that
    both see the same load."""
    eager(), compiled()  # warm-up (the compile itself)
    t_e, ratios = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        eager()
        t1 = time.perf_counter()
        compiled()
        t2 = time.perf_counter()
        t_e.append(t1 - t0)
        ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(t_e), statistics.median(ratios)


def _rank(rank: int, world: int, store_dir: str, npix: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(store_dir, "store"), world),
                            rank=rank, world_size=world)

    n_local = npix // world
    x = torch.randn(B, n_local, E, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    strategies = {"ring": {}, "ulysses": {}, "hybrid": {"ulysses_degree": 2}, "auto": {}}
    if world % 2:
        del strategies["hybrid"]
    for strategy, kw in strategies.items():
        torch.manual_seed(0)
        block = Block(strategy, **kw).double()
        lines = []
        for mode in ("plain", "checkpoint", "policy"):
            fwd, bwd = _step(block, x, mode)
            with PeakMemory(torch.device("cpu")) as rss:  # a second step: the first one warmed up
                _step(block, x, mode)
            held, peak = _memory(block, x, mode)
            lines.append(f"{mode:10s} sent fwd {fwd:>9,d} B  bwd {bwd:>9,d} B   held for backward "
                         f"{held / 2**20:6.2f} MiB  peak {peak / 2**20:6.2f} MiB (outside the op)  "
                         f"process peak {rss.bytes / 2**20:6.2f} MiB ({rss.method})")
        torch._dynamo.reset()
        breaks = torch._dynamo.explain(block)(x).graph_break_count
        breaks_policy = torch._dynamo.explain(lambda x: _forward(block, x, "policy"))(x).graph_break_count
        compiled = torch.compile(block, fullgraph=True)
        t_eager, ratio = _timed_pairs(lambda: block(x.clone().requires_grad_()).sum().backward(),
                                      lambda: compiled(x.clone().requires_grad_()).sum().backward())
        lines.append(f"graph breaks {breaks} (block), {breaks_policy} (checkpoint_context_fn)")
        lines.append(f"fwd+bwd eager {t_eager * 1e3:.1f} ms, compiled/eager {ratio:.2f}")
        if strategy == "auto":
            choice = choose_strategy(H, world, dtype=x.dtype)
            strategy = f"auto = {choice.strategy}, U = {choice.ulysses_degree}"
        for r in range(world):
            dist.barrier()
            if r == rank:
                print(f"[{strategy} rank {rank}, N={npix}]\n  " + "\n  ".join(lines), flush=True)
    shutdown_process_group()  # Note [clean exit] in hpattn_dist/shutdown.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npix", type=int, default=768)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    # Freed tensors go back to the OS, so the process peak (VmHWM) tracks live tensors (as
    # `hpattn-dist bench`'s launcher does, Note [peak memory] in hpattn_dist/tools/bench.py).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_rank, args=(args.world, d, args.npix), nprocs=args.world)


if __name__ == "__main__":
    main()
