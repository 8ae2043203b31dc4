"""The scale demonstrations of docs/performance.md: no full field anywhere, measured against predicted.

    nice -n 10 python launch/scale_demo.py --out /tmp/hpattn_scale      # hours on 2 busy cores

1. Two ranks write the input fields to zarr stores, each its own NESTED range
   (``launch/write_store.py --random-channels``): nside 128 (196,608 pixels) and nside 256
   (786,432 pixels), E channels.
2. ``hpattn-dist verify --sample-queries K --data STORE`` reads each rank's shard with
   :func:`hpattn_dist.io.read_shard`, runs the layer's forward and backward, and checks K query
   rows, every pixel's input gradient and every parameter gradient against the float64 reference
   streamed over every rank's keys (Note [sampled verification]); it reports the time and the peak
   memory per rank (allocator and resident set). Global ring and Ulysses at nside 128 on 2 and 4
   ranks; windowed (neighbourhood) attention at nside 256 on 2 ranks.
3. ``hpattn-dist plan --device cpu`` predicts the same layers' peak per rank (the cost model), shown
   next to the measured peak.
4. ``hpattn-dist plan`` tables for nside 256 / 512 / 1024 on 8-64 H100s (predicted).

Everything goes to ``--out`` (JSON of every step) and a summary on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], log: Path) -> None:
    print("$ " + " ".join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    with open(log, "a") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        f.write(proc.stdout)
    print(proc.stdout[-4000:], flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "hpattn_dist", *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/hpattn_scale"))
    parser.add_argument("--embed", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--samples", type=int, default=32, help="K sampled query pixels")
    parser.add_argument("--window-nside", type=int, default=32)
    parser.add_argument("--skip", default="", help="comma list of steps to skip: global, local, h100")
    parser.add_argument("--timeout", type=float, default=12 * 3600.0,
                        help="seconds each verify run may take (a busy 2-core machine needs hours at nside 128)")
    parser.add_argument("--global-nside", type=int, default=128)
    parser.add_argument("--local-nside", type=int, default=256)
    args = parser.parse_args()
    out, skip = args.out, set(args.skip.split(","))
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    common = ["--heads", str(args.heads), "--backends", "sdpa", "--dtypes", "float32",
              "--sample-queries", str(args.samples), "--timeout", str(args.timeout)]
    runs = []
    if "global" not in skip:
        store = out / f"hp{args.global_nside}.zarr"
        _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "launch/write_store.py", "--store", str(store), "--nside", str(args.global_nside), "--samples", "1",
              "--random-channels", str(args.embed)], log)
        _run(_cli("verify", "--nproc", "2,4", "--data", str(store), "--strategies", "ring,ulysses", *common,
                  "--json", str(out / "verify_global.json")), log)
        _run(_cli("plan", "--nside", str(args.global_nside), "--embed", str(args.embed), "--heads", str(args.heads), "--world", "2,4",
                  "--dtype", "float32", "--device", "cpu", "--strategies", "ring,ulysses",
                  "--json", str(out / "plan_global.json")), log)
        runs.append(("verify_global.json", "plan_global.json"))
    if "local" not in skip:
        store = out / f"hp{args.local_nside}.zarr"
        _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "launch/write_store.py", "--store", str(store), "--nside", str(args.local_nside), "--samples", "1",
              "--random-channels", str(args.embed)], log)
        _run(_cli("verify", "--nproc", "2", "--data", str(store), "--strategies", "none",
                  "--local-windows", f"neighbourhood:{args.window_nside}", *common,
                  "--json", str(out / "verify_local.json")), log)
        _run(_cli("plan", "--nside", str(args.local_nside), "--embed", str(args.embed), "--heads", str(args.heads), "--world", "2",
                  "--dtype", "float32", "--device", "cpu", "--strategies", "ring",
                  "--window-nside", str(args.window_nside), "--json", str(out / "plan_local.json")), log)
        runs.append(("verify_local.json", "plan_local.json"))
    if "h100" not in skip:
        _run(_cli("plan", "--nside", "256,512,1024", "--embed", "1024", "--heads", "16", "--world", "8,16,32,64",
                  "--dtype", "bfloat16", "--gpu-memory", "80GiB", "--window-nside", "32",
                  "--json", str(out / "plan_h100.json")), log)
    print(summary(out, runs), flush=True)


def summary(out: Path, runs: list[tuple[str, str]]) -> str:
    """Measured (verify) next to predicted (plan), one row per case and world size."""
    lines = [f"{'case':<22} {'P':>2} {'exact':>5} {'time s':>8} {'alloc peak GiB (max rank)':>26} "
             f"{'predicted GiB':>13} {'pred/meas':>9} {'resident GiB':>12}"]
    for verify_name, plan_name in runs:
        verify = json.loads((out / verify_name).read_text())
        plans = json.loads((out / plan_name).read_text())
        for run in verify.get("runs", [verify]):
            world = run["world_size"]
            for case in run["cases"]:
                m = case["measured"]
                label = case["strategy"] if not case["strategy"].startswith("nbhd:") else \
                    "local:neighbourhood:" + case["strategy"].split(":")[1]
                pred = next(p["layer_peak_bytes_per_rank"] for p in plans
                            if p["world"] == world and p["strategy"] == label)
                peak = max(m["peak_allocated_bytes"])
                lines.append(f"{case['strategy']:<22} {world:>2} {'yes' if case['passed'] else 'NO':>5} "
                             f"{max(m['time_s']):>8.1f} {peak / 2**30:>26.3f} {pred / 2**30:>13.3f} "
                             f"{pred / peak:>9.3f} {max(m['peak_rss_bytes']) / 2**30:>12.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
