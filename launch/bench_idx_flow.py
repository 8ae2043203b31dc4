#!/usr/bin/env python
"""A converted idx-flow ``SpatialViT`` on P CPU ranks against the single-process model (same threads).

    python launch/bench_idx_flow.py                         # nside 32 -> 16, P = 2, E = 128, depth 2
    python launch/bench_idx_flow.py --world 2 --embed-dim 64 --depth 4 --repeats 5 --json out.json
    python launch/bench_idx_flow.py --model medium --nside 32 --embed-dim 64 --depth 2 --heads 4 \
        --batch 2 --warmup 2 --repeats 11 --rounds 5        # issue 25's medium model, alternated

Run it on a quiet machine: every number is a wall time or a resident-set size. ``--rounds K``
alternates the single-process and P-rank runs K times and prints each round's efficiency and
their median, so that load which changes during a run hits both.

What runs (each in its own fresh process, started by this script):

1. ``single``: ``idx_flow.SpatialViT`` unconverted, the full field ``[B, 12 * nside^2, C_in]``,
   ``torch.set_num_threads(P * threads_per_rank)`` (``OMP_NUM_THREADS`` likewise);
2. ``P`` ranks (gloo, ``OMP_NUM_THREADS=threads_per_rank``, FileStore rendezvous): the same model
   (same seed) after ``hpattn_dist.integrations.idx_flow.convert_model``, each rank on its
   ``shard_bounds`` range of the same input.

Measured per process (``hpattn_dist.tools.bench`` helpers):

- ``fwd_bwd_s``: median wall time of forward + ``backward`` of ``(out * w).sum()`` (grads set to
  None first) over ``--repeats`` after ``--warmup``; on the ranks each repeat starts after a
  barrier and counts the SLOWEST rank (``hpattn_dist.tools.bench.time_call``);
- ``sync_s`` (ranks): median time of ``sync_gradients`` afterwards (a training step needs it);
- ``peak_mem_bytes``: growth of the process's resident-set high-water mark over one forward +
  backward (``hpattn_dist.tools.bench.PeakMemory``, Note [peak memory] there: ``VmHWM`` after resetting
  it, minus ``VmRSS`` before; ``MALLOC_MMAP_THRESHOLD_=65536`` is set so freed tensors leave the
  resident set). It counts every byte the process touched (torch's tensors, gloo buffers,
  allocator slack), not the model and input allocated before;
- ``saved_bytes``: bytes of the tensors autograd keeps for backward during one forward (a
  ``saved_tensors_hooks`` count of distinct storages, parameters excluded): the activation
  memory, a torch-level figure independent of the allocator;
- ``bytes_sent`` (ranks): payload bytes this rank sends in one forward + backward
  (``hpattn_dist.count_communication``).

Ratios printed: ``efficiency = single fwd_bwd_s / ranks fwd_bwd_s`` (1.0: the P ranks with P x
fewer threads each are as fast as one process with all of them; the issue's goal is >= 0.9) and
per-rank memory over the single process's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

_MARK = "BENCH_IDX_FLOW_RESULT "


def _args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("vit", "medium"), default="vit",
                   help="vit: idx-flow's SpatialViT; medium: issue 25's encoder-processor-decoder "
                        "(5 gather layers, --depth transformer blocks at nside / 4)")
    p.add_argument("--nside", type=int, default=32, help="input grid nside (default 32)")
    p.add_argument("--nside-out", type=int, default=None,
                   help="token grid nside (default nside / 2: patches of 4 pixels)")
    p.add_argument("--k", type=int, default=4, help="input pixels per patch (default 4)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--in-channels", type=int, default=4)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp-ratio", type=float, default=4.0)
    p.add_argument("--strategy", default="auto", help="attention strategy of the converted model")
    p.add_argument("--world", type=int, default=2, help="ranks P (default 2)")
    p.add_argument("--threads-per-rank", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1,
                   help="single-process and P-rank runs, alternated this many times (load that "
                        "changes during a run then hits both); the efficiency of each round and "
                        "their median are printed")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds for each stage")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    # Internal: the role of a child process.
    p.add_argument("--role", choices=("main", "single", "rank"), default="main", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--init", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.nside_out is None:
        args.nside_out = max(1, args.nside // 2)
    for name in ("world", "threads_per_rank", "repeats", "rounds", "batch", "depth", "heads", "embed_dim"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


# --------------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------------


def _medium(args: argparse.Namespace):
    """Issue 25's medium model: 5 gather layers around ``depth`` transformer blocks at nside / 4.

    ``[B, 12 nside^2, C_in] -> [B, 12 nside^2, C_in]``: a same-grid SpatialConv (k = 9), two
    SpatialConv downsamplings (k = 4), the blocks (E = ``embed_dim``), two SpatialTransposeConv
    upsamplings (k = 4, distance weights).
    """
    import idx_flow
    import torch.nn as nn
    from idx_flow.utils import compute_connection_indices

    n0, n1, n2 = args.nside, max(1, args.nside // 2), max(1, args.nside // 4)
    e = args.embed_dim
    same, _ = compute_connection_indices(n0, n0, 9)
    down1, _ = compute_connection_indices(n0, n1, 4)
    down2, _ = compute_connection_indices(n1, n2, 4)
    up1, _, w1 = compute_connection_indices(n2, n1, 4, return_weights=True)
    up2, _, w2 = compute_connection_indices(n1, n0, 4, return_weights=True)
    blocks = [idx_flow.SpatialTransformerBlock(e, args.heads, mlp_ratio=args.mlp_ratio)
              for _ in range(args.depth)]
    return nn.Sequential(
        idx_flow.SpatialConv(12 * n0**2, same, filters=e // 4), nn.GELU(),
        idx_flow.SpatialConv(12 * n1**2, down1, filters=e // 2), nn.GELU(),
        idx_flow.SpatialConv(12 * n2**2, down2, filters=e),
        *blocks,
        idx_flow.SpatialTransposeConv(12 * n1**2, up1, w1, filters=e // 2), nn.GELU(),
        idx_flow.SpatialTransposeConv(12 * n0**2, up2, w2, filters=args.in_channels),
    ), 12 * n0**2, args.in_channels


def _model_and_data(args: argparse.Namespace):
    import idx_flow
    import torch
    from idx_flow.utils import compute_connection_indices

    n_in = 12 * args.nside**2
    torch.manual_seed(0)
    if args.model == "medium":
        model, n_out, c_out = _medium(args)
    else:
        table, _ = compute_connection_indices(args.nside, args.nside_out, args.k)
        n_out, c_out = 12 * args.nside_out**2, args.embed_dim
        model = idx_flow.SpatialViT(n_out, table, embed_dim=args.embed_dim, depth=args.depth,
                                    num_heads=args.heads, mlp_ratio=args.mlp_ratio)
    with torch.no_grad():
        model.eval()(torch.zeros(1, n_in, args.in_channels))  # idx-flow's lazy parameters
    model.train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, n_in, args.in_channels, generator=gen)
    w = torch.randn(args.batch, n_out, c_out, generator=gen)
    return model, x, w


def _saved_bytes(model, run_forward) -> int:
    """Bytes of distinct non-parameter storages autograd saves during ``run_forward()``."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run_forward()
    del out
    return sum(seen.values())


def _measure(model, x, w, repeats: int, warmup: int, sync=None) -> dict[str, Any]:
    import torch

    from hpattn_dist.tools.bench import PeakMemory, time_call
    from hpattn_dist.comm.counters import count_communication

    def step() -> None:
        model.zero_grad(set_to_none=True)
        (model(x) * w).sum().backward()

    cpu = torch.device("cpu")
    result: dict[str, Any] = {}
    times = time_call(step, warmup, repeats, cpu)
    result["fwd_bwd_s"] = statistics.median(times)
    result["fwd_bwd_all_s"] = times
    model.zero_grad(set_to_none=True)
    with count_communication() as stats, PeakMemory(cpu) as mem:
        step()
    result["peak_mem_bytes"], result["peak_mem_method"] = mem.bytes, mem.method
    result["bytes_sent"] = stats.total_bytes
    result["saved_bytes"] = _saved_bytes(model, lambda: (model(x) * w).sum())
    if sync is not None:
        result["sync_s"] = statistics.median(time_call(sync, warmup, repeats, cpu))

        def train_step() -> None:
            step()
            sync()

        times = time_call(train_step, warmup, repeats, cpu)
        result["train_step_s"], result["train_step_all_s"] = statistics.median(times), times
        with count_communication() as stats:
            train_step()
        result["calls_per_step"] = dict(stats.calls)
    return result


def _child_single(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.world * args.threads_per_rank)
    model, x, w = _model_and_data(args)
    out = _measure(model, x, w, args.repeats, args.warmup)
    out["threads"] = torch.get_num_threads()
    out["train_step_s"] = out["fwd_bwd_s"]  # one process: nothing to synchronise
    return out


def _child_rank(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from hpattn_dist.grad_sync import sync_gradients
    from hpattn_dist.healpix import shard_bounds
    from hpattn_dist.integrations.idx_flow import convert_model
    from hpattn_dist.shutdown import ending_process_group

    torch.set_num_threads(args.threads_per_rank)
    dist.init_process_group("gloo", init_method=args.init, rank=args.rank, world_size=args.world)
    with ending_process_group():  # Note [clean exit] in hpattn_dist/shutdown.py
        model, x, w = _model_and_data(args)
        convert_model(model, strategy=args.strategy)
        a, b = shard_bounds(x.shape[1], args.world)[args.rank]
        c, d = shard_bounds(w.shape[1], args.world)[args.rank]
        out = _measure(model, x[:, a:b].contiguous(), w[:, c:d].contiguous(), args.repeats,
                       args.warmup, sync=lambda: sync_gradients(model))
        out.update(threads=torch.get_num_threads(), rank=args.rank, n_in_local=b - a, n_out_local=d - c)
    return out


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _child_argv(argv: list[str], role: str, **extra: Any) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--role", role]
    for key, value in extra.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH", "")]))
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               MALLOC_MMAP_THRESHOLD_="65536")
    return env


def _result(stdout: str, who: str) -> dict[str, Any]:
    for line in stdout.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    raise RuntimeError(f"bench_idx_flow: {who} printed no result")


def _run_children(cmds: list[list[str]], threads: int, timeout: float, who: str) -> list[dict]:
    procs = [subprocess.Popen(cmd, env=_env(threads), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for cmd in cmds]
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for i, proc in enumerate(procs):
            stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            if proc.returncode != 0:
                raise RuntimeError(f"bench_idx_flow: {who} {i} exited {proc.returncode}:\n{stderr[-4000:]}")
            outputs.append(_result(stdout, f"{who} {i}"))
    finally:
        for proc in procs:  # only the processes this script started
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outputs


def _mib(n: float) -> str:
    return f"{n / 2**20:9.1f}"


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.3f}" if base > 0 else "n/a (no growth measured)"


def _table(args: argparse.Namespace, single: dict, ranks: list[dict]) -> str:
    slow = ranks[0]  # time_call reports the slowest rank's time on every rank
    if args.model == "medium":
        tokens = 12 * max(1, args.nside // 4) ** 2
        what = (f"issue 25's medium model: nside {args.nside} -> {args.nside} (5 gather layers, "
                f"{tokens} tokens in the blocks), B={args.batch}, C_in={args.in_channels}, ")
    else:
        what = (f"SpatialViT: nside {args.nside} -> {args.nside_out} ({12 * args.nside**2} -> "
                f"{12 * args.nside_out**2} tokens), k={args.k}, B={args.batch}, C_in={args.in_channels}, ")
    lines = [
        "idx-flow " + what +
        f"E={args.embed_dim}, depth={args.depth}, heads={args.heads}, mlp_ratio={args.mlp_ratio}, "
        f"float32, strategy={args.strategy}",
        f"median of {args.repeats} after {args.warmup} warm-up; memory = resident-set growth "
        f"({single['peak_mem_method']}) over one fwd+bwd; saved = autograd's saved activations",
        "",
        f"{'':<22}{'threads':>8}{'fwd+bwd s':>11}{'sync s':>9}{'peak MiB':>10}{'saved MiB':>10}"
        f"{'sent MiB':>10}",
        f"{'single process':<22}{single['threads']:>8}{single['fwd_bwd_s']:>11.3f}{'-':>9}"
        f"{_mib(single['peak_mem_bytes']):>10}{_mib(single['saved_bytes']):>10}{'-':>10}",
    ]
    for r in ranks:
        label = f"converted rank {r['rank']}/{args.world}"
        lines.append(
            f"{label:<22}{r['threads']:>8}{r['fwd_bwd_s']:>11.3f}"
            f"{r['sync_s']:>9.3f}{_mib(r['peak_mem_bytes']):>10}{_mib(r['saved_bytes']):>10}"
            f"{_mib(r['bytes_sent']):>10}"
        )
    peak = max(r["peak_mem_bytes"] for r in ranks)
    saved = max(r["saved_bytes"] for r in ranks)
    lines += [
        "",
        f"efficiency (single fwd+bwd / converted fwd+bwd, slowest rank): "
        f"{single['fwd_bwd_s'] / slow['fwd_bwd_s']:.3f}   (goal >= 0.9)",
        f"training step (fwd + bwd + sync_gradients, timed together): single "
        f"{single['train_step_s']:.3f} s, converted {slow['train_step_s']:.3f} s, efficiency "
        f"{single['train_step_s'] / slow['train_step_s']:.3f}",
        "collectives per training step on rank 0: " + ", ".join(
            f"{label} {n}" for label, n in sorted(slow["calls_per_step"].items())),
        f"largest rank / single: peak memory {_ratio(peak, single['peak_mem_bytes'])}, "
        f"saved activations {_ratio(saved, single['saved_bytes'])}   (1/P = {1 / args.world:.3f})",
    ]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _args(argv)
    if args.role == "single":
        print(_MARK + json.dumps(_child_single(args)), flush=True)
        return 0
    if args.role == "rank":
        print(_MARK + json.dumps(_child_rank(args)), flush=True)
        return 0

    rounds = []
    for i in range(args.rounds):
        single = _run_children([_child_argv(argv, "single")], args.world * args.threads_per_rank,
                               args.timeout, "single process")[0]
        with tempfile.TemporaryDirectory() as tmp:
            init = "file://" + os.path.join(tmp, "rendezvous")
            cmds = [_child_argv(argv, "rank", rank=r, init=init) for r in range(args.world)]
            ranks = _run_children(cmds, args.threads_per_rank, args.timeout, "rank")
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        rounds.append({"single": single, "ranks": ranks, "load_1min": load})
        if args.rounds > 1:
            print(f"--- round {i + 1} of {args.rounds} (1-minute load average {load:.1f})")
        print(_table(args, single, ranks))
    if args.rounds > 1:
        effs = [r["single"]["train_step_s"] / r["ranks"][0]["train_step_s"] for r in rounds]
        print(f"training-step efficiency per round: {', '.join(f'{e:.3f}' for e in effs)}; median "
              f"{statistics.median(effs):.3f}   (goal >= 0.9)")
    if args.json is not None:
        config = {k: v for k, v in vars(args).items() if k not in ("role", "rank", "init", "json")}
        last = rounds[-1]
        args.json.write_text(json.dumps({"config": config, "single": last["single"], "ranks": last["ranks"],
                                         "rounds": rounds}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
