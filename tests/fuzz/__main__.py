"""``python -m tests.fuzz [--seed S] [--cases N | --case I] [--quiet]``: run the fuzzer and print
its summary (every failure with the command that reruns it). Exit status 1 when a case failed
that is not a known defect."""

from __future__ import annotations

import argparse
import sys
import time

from tests.fuzz.runner import DEFAULT_CASES, DEFAULT_SEED, draw_cases, run_cases, summary
from tests.fuzz.space import describe


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--cases", type=int, default=DEFAULT_CASES)
    parser.add_argument("--case", type=int, default=None, help="run only this case index")
    parser.add_argument("--quiet", action="store_true", help="no per-group progress lines")
    parser.add_argument("--verbose", action="store_true", help="every case's draws and verdict")
    args = parser.parse_args()
    cases = draw_cases(args.seed, args.cases, args.case)
    if args.case is not None:
        print(describe(cases[0]))
    start = time.monotonic()
    results = run_cases(cases, log=(lambda s: None) if args.quiet else print)
    if args.verbose:
        for r in results:
            print(f"{'ok  ' if r.verdict.ok else 'FAIL'} {describe(r.case)}\n     {r.verdict.reason[:800]}")
    print(summary(results, time.monotonic() - start, args.seed))
    if args.case is not None:
        print(f"verdict: {results[0].verdict}")
    return int(any(not r.verdict.ok and not r.case["known_defect"] for r in results))


if __name__ == "__main__":
    sys.exit(main())
