"""The ``hpattn-dist`` command line: ``verify`` (oracle check), ``bench`` (time, memory, traffic) and
``plan`` (the cost model's prediction per strategy, :mod:`hpattn_dist.tools.plan`; no ranks).

Two ways to start it:

* under ``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT``): every process is one rank; the CLI initialises the process
  group itself (gloo on CPU, NCCL on CUDA) -- it is an application; the library never does;
* alone (``hpattn-dist verify``): the CLI is a small local launcher. For each world size in
  ``--nproc`` (default 2; a comma list such as ``1,2,3,4`` runs one job per size) it starts that
  many CPU ranks as child processes (``python -m hpattn_dist ...`` with the torchrun environment
  variables, ``OMP_NUM_THREADS`` = ``--threads-per-rank``, default ``cores // nproc``), waits,
  and returns the worst exit code. A rank that fails brings the others down after a short grace.

Exit codes: 0 success; 1 a verify tolerance failed; 2 usage or configuration error; 124 timeout;
any other code is the failing rank's.

Rank 0 prints the tables on stdout and progress on stderr; the other ranks print nothing unless
something goes wrong.

A ``verify`` rank pins the math library's code path before its first tensor operation
(:func:`pin_math_library`, Note [float64 reproducibility] in :mod:`hpattn_dist.tools.verify`);
``bench`` leaves it alone, since the pinned path is slower.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from hpattn_dist.tools.platform import pin_math_library

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_KILL_GRACE_S = 10.0

def _csv(kind: type):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(t) for t in text.split(",") if t.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, "
                                             f"got {text!r}") from None
    return parse


def _positive_ints(text: str) -> tuple[int, ...]:
    values = _csv(int)(text)
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


#: The strategy names (:data:`hpattn_dist.strategies.STRATEGIES`; not imported here, so that
#: ``--help`` does not import torch; a test keeps the two equal).
STRATEGY_NAMES = ("ring", "ulysses", "hybrid", "auto")

#: Built-in defaults shown in ``--help`` (the dataclasses
#: :class:`hpattn_dist.tools.verify.VerifyConfig` and :class:`hpattn_dist.tools.bench.BenchConfig`
#: and ``tools/configs/*.toml`` hold the same; a test keeps them equal). A ``--config`` file overrides them, the flags override the file.
DEFAULTS: dict[str, dict[str, object]] = {
    "verify": {"batch": 2, "embed_dim": 32, "num_heads": 4, "seed": 0, "nside": 8,
               "backends": "manual,sdpa", "dtypes": "float64,float32,bfloat16",
               "field_ordering": "NESTED", "tolerance_scale": 1.0, "inject_error": 0.0, "sample_queries": 0,
               "data_variable": "x", "data_time": 0},
    "bench": {"batch": 1, "embed_dim": 128, "num_heads": 4, "seed": 0, "mode": "scaling",
              "nsides": "16,32", "backend": "auto", "dtype": "float32", "warmup": 1, "repeats": 5,
              "blocks": "2,4", "land_fractions": "0,0.3,0.7,1", "data_nside": 64, "latent_nside": 16,
              "kv_dim": 8, "cross_cases": "encoder,decoder", "windows": "none",
              "local_modes": "cell,neighbourhood"},
}


def _add(p: argparse.ArgumentParser, defaults: dict[str, object], flag: str, text: str, **kw: object) -> None:
    """``flag`` with default None (a ``--config`` file, then the config's dataclass, fill it in),
    its help ending with the built-in default ``defaults`` shows for its dest (:data:`DEFAULTS`)."""
    dest = kw.get("dest") or flag[2:].replace("-", "_")
    p.add_argument(flag, default=None, help=f"{text} (default: {defaults[dest]})", **kw)


def _model_options(p: argparse.ArgumentParser, command: str) -> None:
    """Options shared by both commands, with each command's own defaults in the help."""
    d = DEFAULTS[command]
    _add(p, d, "--batch", "batch size B", type=int)
    _add(p, d, "--embed-dim", "embedding dim E, divisible by --heads", type=int)
    _add(p, d, "--heads", "attention heads H; ulysses needs H divisible by P", dest="num_heads", type=int)
    p.add_argument("--strategies", type=_csv(str), default=None,
                   help=f"comma list of {','.join(STRATEGY_NAMES)} (default: all"
                        f"{'; --mode cross: ring,ulysses' if command == 'bench' else ''}); hybrid runs "
                        "once per Ulysses degree U that divides P and H, auto shows what it chose")
    _add(p, d, "--seed", "seed of the weights and the random inputs", type=int)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (every option defaults to None so config files can fill it in)."""
    parser = argparse.ArgumentParser(
        prog="hpattn-dist",
        description="Exact sequence-parallel HEALPix attention: check it against the "
                    "single-device layer (verify) and measure it (bench).",
    )
    sub = parser.add_subparsers(dest="command", metavar="{verify,bench,plan}")

    common = argparse.ArgumentParser(add_help=False)
    launch = common.add_argument_group("launch (ignored under torchrun)")
    launch.add_argument("--nproc", type=_positive_ints, default=(2,),
                        help="local CPU ranks to spawn; a comma list runs one job per world size "
                             "(default: 2)")
    launch.add_argument("--threads-per-rank", type=int, default=None,
                        help="torch threads per rank (default: cores // nproc, at least 1; under "
                             "torchrun: leave torch's setting alone)")
    launch.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds before a local launch is killed (exit 124), also the process "
                             "group's timeout when longer than torch's 30 minutes (default 1800)")
    common.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                        help="cpu (gloo) or cuda (nccl, one GPU per local rank); auto = cuda if "
                             "available (default: cpu)")
    common.add_argument("--config", type=Path, default=None,
                        help="TOML file with the defaults (default: the package's "
                             "hpattn_dist/tools/configs/<command>.toml)")
    common.add_argument("--json", dest="json_path", type=Path, default=None,
                        help="also write the results as JSON to this file (default: none)")

    v = sub.add_parser("verify", parents=[common],
                       help="compare the distributed layer with the float64 oracle")
    dv = DEFAULTS["verify"]
    _model_options(v, "verify")
    _add(v, dv, "--nside", "HEALPix resolution, a power of two; N = 12 nside^2", type=int)
    _add(v, dv, "--backends", "comma list of auto,sdpa,manual", type=_csv(str))
    _add(v, dv, "--dtypes", "comma list of float64,float32,bfloat16,float16", type=_csv(str))
    v.add_argument("--field", type=str, default=None,
                   help="field [N, E] or [B, N, E] (.pt or .npy) instead of a random one "
                        "(default: random)")
    _add(v, dv, "--field-ordering", "HEALPix ordering of --field; RING is reordered to NESTED",
         choices=("NESTED", "RING"))
    _add(v, dv, "--tolerance-scale", "multiply every tolerance (self-test: 0 must fail)", type=float)
    _add(v, dv, "--inject-error", "self-test: add this to the distributed output before comparing "
         "(any value above the tolerance must fail)", type=float)
    v.add_argument("--local-windows", type=_csv(str), default=None,
                   help="also check local attention: comma list of MODE:WINDOW_NSIDE, e.g. "
                        "neighbourhood:2,cell:4 (hpattn_dist/tools/verify_local.py) (default: none)")
    v.add_argument("--cross-nsides", type=_csv(int), default=None,
                   help="also check cross-grid attention: comma list of source-grid nsides, queries on "
                        "the verify field (hpattn_dist/tools/verify_cross.py) (default: none)")
    v.add_argument("--sample-queries", type=int, default=None,
                   help="K > 0: check K random query pixels against a float64 reference streamed over "
                        "every rank's keys; no rank holds the full field (large nside; "
                        "hpattn_dist/tools/verify_sampled.py) (default: 0, the full-field check)")
    v.add_argument("--data", default=None,
                   help="with --sample-queries: a zarr store whose --data-variable (time, E, cell) is the "
                        "field, read with hpattn_dist.io.read_shard (default: a seeded random field)")
    _add(v, dv, "--data-variable", "the store's variable")
    _add(v, dv, "--data-time", "the time index read from the store", type=int)
    v.add_argument("--cross-window", default=None,
                   help="also check each --cross-nsides case with the locality option MODE:WINDOW_NSIDE, "
                        "e.g. neighbourhood:1 (default: none)")

    b = sub.add_parser("bench", parents=[common], help="time, peak memory and traffic per rank")
    db = DEFAULTS["bench"]
    _model_options(b, "bench")
    _add(b, db, "--mode", "scaling: the layer vs the oracle and DeepSpeed-Ulysses; emulation: one "
         "process, ring kernel+merge over P blocks vs one fused call; memory: peak "
         "memory per rank of the manual kernel; masks: what the ring saves when "
         "keys are masked (land) on one rank or all; local: local attention "
         "(window_nside = nside/8) vs global ring, vs itself in one process and vs "
         "FlexAttention; cross: cross-grid encoder and decoder layers vs the 1-process "
         "layer (time, memory, bytes vs closed form)",
         choices=("scaling", "emulation", "memory", "masks", "local", "cross"))
    _add(b, db, "--nsides", "comma list of HEALPix resolutions", type=_positive_ints)
    _add(b, db, "--backend", "attn_backend of the layer: auto, sdpa or manual", type=str)
    _add(b, db, "--dtype", "float32, bfloat16, float16 or float64", type=str)
    _add(b, db, "--warmup", "untimed calls before timing", type=int)
    _add(b, db, "--repeats", "timed calls; the median is reported, with a warning when it exceeds "
         "2x the minimum", type=int)
    _add(b, db, "--blocks", "emulation mode: numbers of blocks P", type=_positive_ints)
    _add(b, db, "--land-fractions", "masks mode: fractions of masked (land) pixels", type=_csv(float))
    _add(b, db, "--data-nside", "cross mode: nside of the data grid", type=int)
    _add(b, db, "--latent-nside", "cross mode: nside of the latent grid, <= --data-nside", type=int)
    _add(b, db, "--kv-dim", "cross mode: feature dim C of the data grid, the encoder's kv_dim", type=int)
    _add(b, db, "--cross-cases", "cross mode: comma list of encoder (data -> latent), decoder (latent -> "
         "data)", type=_csv(str))
    _add(b, db, "--windows", "cross mode: comma list of none (every source pixel) or locality windows "
         "MODE:WINDOW_NSIDE, e.g. none,cell:4,neighbourhood:4 (ring and auto only)", type=_csv(str))
    _add(b, db, "--local-modes", "local mode: comma list of window modes, cell and/or neighbourhood",
         type=_csv(str))
    b.add_argument("--no-local-layers", dest="local_layers", action="store_false", default=None,
                   help="local mode: skip the layer rows (local on P ranks, the global ring, local in "
                        "one process); the attention vs FlexAttention rows run either way "
                        "(default: run them)")
    b.add_argument("--no-deepspeed", dest="deepspeed", action="store_false", default=None,
                   help="skip the DeepSpeed-Ulysses peer (default: run it when deepspeed imports)")
    b.add_argument("--no-oracle", dest="oracle", action="store_false", default=None,
                   help="skip the single-process baseline (default: run it)")
    b.add_argument("--plot", type=Path, default=None,
                   help="scaling mode: write a PNG of time and efficiency over nside; needs "
                        "matplotlib (pip install 'hpattn-dist[plot]'), checked before the run "
                        "(default: no plot)")
    _plan_parser(sub)
    return parser


def _bytes(per_second: bool = False):
    def parse(text: str) -> float:
        from hpattn_dist.tools.plan import parse_bytes

        try:
            return parse_bytes(text, per_second)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return parse


def _plan_parser(sub) -> None:
    """``hpattn-dist plan``: runs in this process, no ranks (:mod:`hpattn_dist.tools.plan`)."""
    pl = sub.add_parser("plan", help="predict memory, bytes and time per strategy (cost model, no ranks)")
    pl.add_argument("--nside", type=_positive_ints, required=True,
                    help="HEALPix resolution(s), a power of two; a comma list gives one table each "
                         "(required, no default)")
    pl.add_argument("--embed", type=int, required=True, help="embedding dim E (required, no default)")
    pl.add_argument("--heads", type=int, required=True, help="attention heads H (required, no default)")
    pl.add_argument("--batch", type=int, default=1, help="batch size B (default: 1)")
    pl.add_argument("--world", type=_positive_ints, required=True,
                    help="ranks P of the sequence-parallel group; a comma list gives one table each "
                         "(required, no default)")
    pl.add_argument("--strategies", type=_csv(str), default=None,
                    help=f"comma list of {','.join(STRATEGY_NAMES)} to plan (default: all; hybrid: every "
                         "proper Ulysses degree; auto: the one strategy='auto' runs; windowed attention "
                         "comes with --window-nside)")
    pl.add_argument("--dtype", choices=("bfloat16", "float16", "float32", "float64"), default="bfloat16",
                    help="layer dtype (default: bfloat16)")
    pl.add_argument("--gpu-memory", type=_bytes(), default=80 * 2**30,
                    help="memory per device, e.g. 80GiB (default: 80GiB)")
    pl.add_argument("--link", type=_bytes(per_second=True), default=450e9,
                    help="bytes per second one rank sends, e.g. 450GB/s (NVLink 4, one direction; "
                         "across nodes use the network's, e.g. 50GB/s) (default: 450GB/s)")
    pl.add_argument("--tflops", type=float, default=None,
                    help="peak TFLOP/s of one device (default: H100 SXM dense peak for the dtype)")
    pl.add_argument("--window-nside", type=int, default=None,
                    help="also plan windowed attention with this window grid (default: none)")
    pl.add_argument("--mode", choices=("neighbourhood", "cell"), default="neighbourhood",
                    help="window mode with --window-nside (default: neighbourhood)")
    pl.add_argument("--layers", type=int, default=1,
                    help="attention layers whose saved tensors are held at once (default: 1)")
    pl.add_argument("--device", dest="plan_device", choices=("cuda", "cpu"), default="cuda",
                    help="kernels to model: cuda (fused GPU kernels) or cpu (default: cuda)")
    pl.add_argument("--json", dest="json_path", type=Path, default=None,
                    help="also write the records as a JSON list to this file (default: none)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``hpattn-dist`` and ``python -m hpattn_dist``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "plan":  # arithmetic only: no ranks, no launcher
        from hpattn_dist.tools.plan import cli_plan

        try:
            return cli_plan(args)
        except ValueError as err:
            print(f"hpattn-dist plan: {err}", file=sys.stderr)
            return 2
    try:
        cfg = load_config(args)  # fail fast, before any rank starts
        under_torchrun = all(k in os.environ for k in _TORCHRUN_ENV)
        # under torchrun, cli_bench checks --plot on rank 0 and tells every rank
        if getattr(args, "plot", None) is not None and not under_torchrun:
            from hpattn_dist.tools.bench_report import check_plot_target

            check_plot_target(args.plot, cfg.mode)  # before running, not after
        if args.json_path is not None and not Path(args.json_path).parent.is_dir():
            raise ValueError(f"--json {args.json_path}: the folder {Path(args.json_path).parent} "
                             "does not exist")
    except ValueError as err:
        print(f"hpattn-dist {args.command}: {err}", file=sys.stderr)
        return 2
    if under_torchrun:
        return _run_rank(args)
    return _launch_local(args, argv)


def load_config(args: argparse.Namespace):
    """The command's config: dataclass defaults < TOML file (``--config``, else the package's
    ``hpattn_dist/tools/configs/<command>.toml``) < command-line flags.

    Raises:
        ValueError: a bad value or an unknown key in the file.
    """
    if args.command == "verify":
        from hpattn_dist.tools.config import default_config_path
        from hpattn_dist.tools.verify import VerifyConfig

        return VerifyConfig.load(
            args.config or default_config_path("verify"),
            nside=args.nside, batch=args.batch, embed_dim=args.embed_dim,
            num_heads=args.num_heads, strategies=args.strategies, backends=args.backends,
            dtypes=args.dtypes, seed=args.seed, field=args.field,
            field_ordering=args.field_ordering, tolerance_scale=args.tolerance_scale,
            inject_error=args.inject_error, local_windows=args.local_windows,
            cross_nsides=args.cross_nsides, cross_window=args.cross_window,
            sample_queries=args.sample_queries, data=args.data, data_variable=args.data_variable,
            data_time=args.data_time,
        )
    from hpattn_dist.tools.bench import BenchConfig
    from hpattn_dist.tools.config import default_config_path

    return BenchConfig.load(
        args.config or default_config_path("bench"),
        mode=args.mode, nsides=args.nsides, batch=args.batch, embed_dim=args.embed_dim,
        num_heads=args.num_heads, strategies=args.strategies, backend=args.backend,
        dtype=args.dtype, warmup=args.warmup, repeats=args.repeats, blocks=args.blocks,
        oracle=args.oracle, deepspeed=args.deepspeed, seed=args.seed,
        land_fractions=args.land_fractions, data_nside=args.data_nside, latent_nside=args.latent_nside,
        kv_dim=args.kv_dim, cross_cases=args.cross_cases, windows=args.windows,
        local_modes=args.local_modes, local_layers=args.local_layers,
    )


# --------------------------------------------------------------------------------------------
# Local launcher
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _launch_local(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the command once per world size in ``args.nproc`` on spawned local ranks."""
    worst = 0
    merged: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="hpattn_dist_") as tmp:
        for nproc in args.nproc:
            result_file = Path(tmp) / f"world{nproc}.json"
            threads = args.threads_per_rank or max(1, _cores() // nproc)
            rc = _spawn(nproc, threads, [*argv, "--json", str(result_file),
                                         "--threads-per-rank", str(threads)], args.timeout,
                        _measures_memory(args))
            worst = worst or rc
            if result_file.is_file():
                merged.append(json.loads(result_file.read_text()))
    if args.json_path is not None or getattr(args, "plot", None) is not None:
        report = merged[0] if len(merged) == 1 else {"schema": "hpattn_dist.multi/1", "runs": merged}
        if args.json_path is not None and merged:
            args.json_path.write_text(json.dumps(report, indent=1))
        if getattr(args, "plot", None) is not None and merged:
            from hpattn_dist.tools.bench_report import plot_scaling

            try:
                plot_scaling(merged, args.plot)
            except ValueError as err:
                print(f"hpattn-dist: {err}", file=sys.stderr)
                worst = worst or 2
    return worst


def _measures_memory(args: argparse.Namespace) -> bool:
    """Whether the run reads the ranks' resident set: all but ``bench --mode local
    --no-local-layers`` (the attention alone against FlexAttention: times only)."""
    return not (getattr(args, "mode", None) == "local" and getattr(args, "local_layers", None) is False)


def _spawn(nproc: int, threads: int, child_argv: list[str], timeout: float, measures_memory: bool = True) -> int:
    """Start ``nproc`` ranks of ``python -m hpattn_dist child_argv`` and wait for all of them."""
    env = dict(os.environ)
    env.update({
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc), "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads), "HPATTN_DIST_LOCAL_LAUNCH": "1",
    })
    if measures_memory:
        # Large tensors come from mmap and go back to the OS when freed, so the peak resident set
        # that `bench` reads tracks live tensors (see hpattn_dist.tools.bench, Note [peak memory]).
        # Every fresh tensor above 64 KiB is then faulted in again, which slows a timing: a run
        # that times only keeps the allocator's default.
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    procs = []
    for rank in range(nproc):
        env_r = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, "-m", "hpattn_dist", *child_argv], env=env_r))
    deadline = time.monotonic() + timeout
    failed_at: Optional[float] = None
    rc = 0
    try:
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            bad = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if bad and failed_at is None:
                failed_at, rc = now, bad[0]
            if now > deadline or (failed_at is not None and now - failed_at > _KILL_GRACE_S):
                if now > deadline:
                    print(f"hpattn-dist: timed out after {timeout:g} s; stopping the ranks",
                          file=sys.stderr)
                    rc = 124
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
    if rc == 0:
        rc = next((p.returncode for p in procs if p.returncode != 0), 0)
    return 1 if rc < 0 and rc != 124 else rc  # a rank killed by a signal


# --------------------------------------------------------------------------------------------
# One rank
# --------------------------------------------------------------------------------------------


def _run_rank(args: argparse.Namespace) -> int:
    """Body of one rank: initialise the process group, run the command, tear down."""
    if args.command == "verify":
        pin_math_library()  # before any tensor operation of this process
    import torch
    import torch.distributed as dist

    from hpattn_dist.shutdown import ending_process_group

    if args.threads_per_rank is not None:
        torch.set_num_threads(args.threads_per_rank)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    # A long local run (--timeout above torch's 30-minute default) may spend longer than that in
    # one block on a busy machine, while its ring neighbour waits: the group waits as long.
    pg_timeout = datetime.timedelta(seconds=max(1800.0, args.timeout))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=pg_timeout)
    rank = dist.get_rank()
    try:
        with ending_process_group():  # Note [clean exit] in hpattn_dist/shutdown.py
            cfg = load_config(args)
            if args.command == "verify":
                from hpattn_dist.tools.verify import cli_verify

                return cli_verify(cfg, args, device)
            from hpattn_dist.tools.bench import cli_bench

            return cli_bench(cfg, args, device)
    except ValueError as err:  # configuration errors are raised on every rank
        if rank == 0:
            print(f"hpattn-dist {args.command}: {err}", file=sys.stderr)
        return 2
