"""Torch-only reproducer of issue 19 item 8: a float64 attention whose FIRST call in a fresh
process was reported ~1e-10 off (relative) on an x86 machine with MKL and 2 threads, every later
call exact (Note [float64 reproducibility] in ``hpattn_dist/tools/verify.py``; README, Troubleshooting,
has what this script measured).

Nothing from ``hpattn_dist`` is imported. One child process does, in this order:

1. seed, ``Linear(E, 3E)`` in float64 (E = 16, H = 4, D = 4) and a field ``x`` ``[1, 48, 16]``
   (nside 2), ``q, k, v = Linear(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)``, made
   contiguous: the projection of ``hpattn-dist verify --nside 2 --batch 1 --embed-dim 16
   --heads 4`` as the ring strategy hands it to the kernel;
2. the op sequence of ``kernels/manual.py``'s forward (matmul, ``mul_``, ``amax``, ``exp``,
   ``sum``, ``log``, divide, matmul into a preallocated output) -- call 1, then again -- call 2;
3. a reference that uses neither MKL nor float64 rounding of partial sums: the same maths in
   numpy ``longdouble`` (x87 80-bit) with ``einsum``, no BLAS.

It prints one JSON line: the max abs error of call 1 and call 2 against the reference, and,
when call 1 differs from call 2, which op first differs (each op of call 1 re-run on call 1's own
inputs) and how far that op's result is from the same op computed in float32 and in longdouble.

The driver (default mode) runs ``--runs`` fresh child processes under a given environment and
counts the children whose call 1 is off by more than 1e-13 (float64 rounding noise of these
sums is ~1e-16)::

    python launch/repro_mkl_first_call.py --runs 60                      # default environment
    python launch/repro_mkl_first_call.py --runs 60 --env MKL_CBWR=COMPATIBLE
    python launch/repro_mkl_first_call.py --runs 60 --threads 1

``--threads`` sets ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` of the children (default 2, as
``hpattn-dist verify --nproc 1`` gives a one-rank job on a 2-core machine).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time

E, H, N, B = 16, 4, 48, 1
D = E // H
BAD = 1e-13


def _child() -> None:
    import numpy as np
    import torch

    torch.manual_seed(0)
    lin = torch.nn.Linear(E, 3 * E).double()
    x = torch.randn(B, N, E, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = lin(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, D]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # as the ring hands them over
    scale = D**-0.5

    def forward(q, k, v):
        """manual.py's forward op by op; returns the intermediates."""
        r = {}
        k_t = k.transpose(-2, -1)
        out = torch.empty(q.shape, dtype=q.dtype)
        r["s"] = s = torch.matmul(q, k_t).mul_(scale)
        r["max"] = m = s.amax(dim=-1, keepdim=True)
        r["exp"] = p = torch.exp(s - m)
        r["sum"] = den = p.sum(dim=-1, keepdim=True)
        r["log"] = m + torch.log(den)
        r["div"] = p = p / den
        out[:] = torch.matmul(p, v)
        r["out"] = out
        return r

    first = forward(q, k, v)
    second = forward(q, k, v)

    def ld(t):
        return t.detach().numpy().astype(np.longdouble)

    qn, kn, vn = ld(q), ld(k), ld(v)
    s = np.einsum("bhnd,bhmd->bhnm", qn, kn) * np.longdouble(scale)
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("bhnm,bhmd->bhnd", p / p.sum(-1, keepdims=True), vn)

    def err(t):
        return float(np.abs(ld(t) - ref).max())

    rec = {"call1": err(first["out"]), "call2": err(second["out"]),
           "call1_vs_call2": float((first["out"] - second["out"]).abs().max()),
           "threads": torch.get_num_threads()}
    if rec["call1_vs_call2"] > 0:
        # Re-run each op on call 1's own inputs: the first op whose call-1 result differs from
        # its re-run is the culprit (later ops only inherit its error).
        f = first
        redo = {
            "s": lambda: torch.matmul(q, k.transpose(-2, -1)).mul_(scale),
            "exp": lambda: torch.exp(f["s"] - f["max"]),
            "sum": lambda: f["exp"].sum(dim=-1, keepdim=True),
            "div": lambda: f["exp"] / f["sum"],
            "out": lambda: torch.matmul(f["div"], v),
        }
        f32 = {
            "s": lambda: torch.matmul(q.float(), k.float().transpose(-2, -1)).double() * scale,
            "exp": lambda: torch.exp((f["s"] - f["max"]).float()).double(),
            "out": lambda: torch.matmul(f["div"].float(), v.float()).double(),
        }
        ops = {}
        for name, fn in redo.items():
            again = fn()
            ops[name] = {"vs_rerun": float((f[name] - again).abs().max())}
            if name in f32:
                ops[name]["vs_float32_path"] = float((f[name] - f32[name]()).abs().max())
                ops[name]["rerun_vs_float32_path"] = float((again - f32[name]()).abs().max())
        rec["ops"] = ops
    print(json.dumps(rec))


# float64 ops torch hands to MKL's vector math library (VML) on x86, from every OpenMP thread at
# once for tensors above the parallel grain (checked with gdb for exp: both threads enter vmdExp).
VML_OPS = ("exp", "log", "log10", "log1p", "expm1", "sin", "cos", "tan", "tanh", "erf", "erfc",
           "asin", "acos", "atan", "sqrt")


def _child_vml() -> None:
    """Mechanism probe: the first call of each VML-backed op in this process against its second
    call, on a float64 tensor large enough to be split over the threads."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.rand(B * H * N * N * 4, generator=g, dtype=torch.float64) * 0.98 + 0.01  # (0, 1)
    diffs = {}
    for op in VML_OPS:
        f = getattr(torch, op)
        first, second = f(x), f(x)
        diffs[op] = float(((first - second).abs() / second.abs().clamp_min(1e-300)).max())
    print(json.dumps({"call1": max(diffs.values()), "call2": 0.0, "ops": diffs,
                      "threads": torch.get_num_threads()}))


def _driver(args: argparse.Namespace) -> int:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    for kv in args.env:
        key, _, value = kv.partition("=")
        env[key] = value
    counts: collections.Counter = collections.Counter()
    examples = []
    t0 = time.monotonic()
    for _ in range(args.runs):
        child = "--child-vml" if args.vml else "--child"
        out = subprocess.run([sys.executable, __file__, child], env=env, capture_output=True,
                             text=True, check=True).stdout
        rec = json.loads(out.strip().splitlines()[-1])
        bad = rec["call1"] > BAD
        counts["bad" if bad else "exact"] += 1
        if bad and len(examples) < 3:
            examples.append(rec)
    load = os.getloadavg()[0]
    print(json.dumps({"env": args.env, "threads": args.threads, "vml": args.vml,
                      "runs": args.runs, **counts,
                      "seconds": round(time.monotonic() - t0, 1), "loadavg_1min": load,
                      "examples": examples}))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-vml", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--vml", action="store_true",
                        help="children run the mechanism probe instead: first vs second call of "
                             "each float64 op torch computes with MKL's vector math library")
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.child or args.child_vml:
        _child_vml() if args.child_vml else _child()
        return 0
    return _driver(args)


if __name__ == "__main__":
    sys.exit(main())
