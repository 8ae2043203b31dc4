"""Training-side figures of issue 15 at world 2 (gloo, CPU): checkpointing bytes and memory,
eager vs compiled time, graph breaks.

Per strategy (ring, ulysses) and rank, for a block LayerNorm + DistributedSpatialSelfAttention +
MLP (float64, B=2, N=768, E=32, H=4 by default):

- bytes sent in the backward: plain, ``checkpoint``, ``checkpoint`` + ``checkpoint_context_fn``;
- memory held from forward to backward and the peak (``torch.distributed._tools.mem_tracker``);
- forward + backward time eager vs ``torch.compile(fullgraph=True)`` (median of a few steps);
- ``torch._dynamo.explain`` graph-break count (Ulysses with and without
  ``capture_dynamic_output_shape_ops``).

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

from hpattn_dist import DistributedSpatialSelfAttention, checkpoint_context_fn, count_communication  # noqa: E402
from hpattn_dist.shutdown import shutdown_process_group  # noqa: E402

B, E, H = 2, 32, 4


class Block(nn.Module):
    def __init__(self, strategy: str) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(E), nn.LayerNorm(E)
        self.attn = DistributedSpatialSelfAttention(E, H, attn_backend="manual", strategy=strategy)
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


def _timed(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rank(rank: int, world: int, store_dir: str, npix: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(store_dir, "store"), world),
                            rank=rank, world_size=world)

    n_local = npix // world
    x = torch.randn(B, n_local, E, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    for strategy in ("ring", "ulysses"):
        torch.manual_seed(0)
        block = Block(strategy).double()
        lines = []
        for mode in ("plain", "checkpoint", "policy"):
            fwd, bwd = _step(block, x, mode)
            held, peak = _memory(block, x, mode)
            lines.append(f"{mode:10s} sent fwd {fwd:>9,d} B  bwd {bwd:>9,d} B   held for backward "
                         f"{held / 2**20:6.2f} MiB  peak {peak / 2**20:6.2f} MiB")
        torch._dynamo.reset()
        breaks_plain = torch._dynamo.explain(block)(x).graph_break_count
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            torch._dynamo.reset()
            breaks_flag = torch._dynamo.explain(block)(x).graph_break_count
            compiled = torch.compile(block, fullgraph=True)
            t_eager = _timed(lambda: block(x.clone().requires_grad_()).sum().backward())
            t_comp = _timed(lambda: compiled(x.clone().requires_grad_()).sum().backward())
        lines.append(f"graph breaks {breaks_plain} (default), {breaks_flag} (capture_dynamic_output_shape_ops)")
        lines.append(f"fwd+bwd eager {t_eager * 1e3:.1f} ms, compiled {t_comp * 1e3:.1f} ms "
                     f"(compiled/eager {t_comp / t_eager:.2f})")
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
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_rank, args=(args.world, d, args.npix), nprocs=args.world)


if __name__ == "__main__":
    main()
