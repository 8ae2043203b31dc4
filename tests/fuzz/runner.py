"""Parent side: run drawn cases in as few process groups as possible, and judge each one.

Cases are grouped by world size; each group runs :func:`tests.fuzz.execute.fuzz_rank` over its
cases in ONE ``run_ranks`` job. When a job ends early (a case broke the group, a rank hung past
the watchdog or crashed), the rank records say which case it was; that case is judged from what
the ranks reported, and a fresh group runs the cases after it. ``isolated`` cases (they replace
the default process group) get a group each.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Optional

from tests.fuzz.execute import CASE_LIMIT_S, fuzz_rank
from tests.fuzz.judge import Verdict, judge
from tests.fuzz.space import describe, draw_case
from tests.harness import RankFailure, run_ranks

DEFAULT_SEED = 23
DEFAULT_CASES = 320


@dataclass
class Result:
    case: dict
    verdict: Verdict
    seconds: float = 0.0  # the slowest rank's time in the case


def draw_cases(seed: int, count: int, only: Optional[int] = None) -> list[dict]:
    """Cases ``0 .. count - 1`` of ``seed`` (or case ``only`` alone)."""
    return [draw_case(seed, only)] if only is not None else [draw_case(seed, i) for i in range(count)]


def rerun_command(case: dict) -> str:
    return (f"python -m pytest -q -s tests/distributed/test_fuzz.py --fuzz-seed {case['seed']} "
            f"--fuzz-case {case['index']}")


def run_cases(cases: list[dict], log: Callable[[str], None] = print) -> list[Result]:
    """Run and judge every case; results in the order of ``cases``."""
    verdicts: dict[int, tuple[Verdict, float]] = {}
    batches: list[list[dict]] = []
    by_world: dict[int, list[dict]] = defaultdict(list)
    for case in cases:
        if case.get("isolated"):
            batches.append([case])
        else:
            by_world[case["world"]].append(case)
    batches = [by_world[w] for w in sorted(by_world)] + batches
    for batch in batches:
        _run_batch(batch, verdicts, log)
    return [Result(c, *verdicts[c["index"]]) for c in cases]


def _run_batch(cases: list[dict], verdicts: dict[int, tuple[Verdict, float]], log: Callable[[str], None]) -> None:
    world = cases[0]["world"]
    remaining = list(cases)
    attempt = 0
    while remaining:
        workdir = tempfile.mkdtemp(prefix="hpattn_fuzz_")
        start = time.monotonic()
        failure: Optional[RankFailure] = None
        try:
            run_ranks(fuzz_rank, world, remaining, workdir, attempt,
                      timeout=120.0 + CASE_LIMIT_S * len(remaining))
        except RankFailure as err:
            failure = err
        records = [_read(os.path.join(workdir, f"rank{r}.records")) for r in range(world)]
        shutil.rmtree(workdir, ignore_errors=True)
        by_index = {c["index"]: c for c in remaining}
        started = [i for i in (rec_index for rec in records for kind, rec_index, *_ in rec if kind == "start")]
        last = max((remaining.index(by_index[i]) for i in started), default=-1)
        ran = time.monotonic() - start
        for case in remaining[:last + 1]:
            outcomes = [_outcome(records[r], case["index"], r, failure) for r in range(world)]
            verdicts[case["index"]] = (judge(case, outcomes), max(o.get("seconds", 0.0) for o in outcomes))
        log(f"world {world}: {last + 1} of {len(remaining)} cases in {ran:.1f} s, judged in "
            f"{time.monotonic() - start - ran:.1f} s"
            + ("" if failure is None else f" (group ended after case {remaining[last]['id']})"))
        if failure is not None and last < 0:
            raise failure  # the group never reached a case: a harness problem, not a finding
        remaining = remaining[last + 1:]
        attempt += 1


def _read(path: str) -> list[tuple]:
    out = []
    try:
        with open(path, "rb") as f:
            while True:
                try:
                    out.append(pickle.load(f))
                except EOFError:
                    break
    except FileNotFoundError:
        pass
    return out


def _outcome(records: list[tuple], index: int, rank: int, failure: Optional[RankFailure]) -> dict:
    done = [r for r in records if r[1] == index and r[0] in ("done", "hung")]
    if done and done[-1][0] == "done":
        return done[-1][2]
    if done:
        return {"status": "hung", "message": done[-1][2]}
    text = "" if failure is None else failure.failures.get(rank, str(failure))
    return {"status": "crashed", "message": f"no outcome reported (killed, crashed or stopped): {text[-3000:]}"}


def summary(results: list[Result], seconds: float, seed: int) -> str:
    """Counts per family and expectation, failures, known defects, worst error ratio."""
    fams: dict[str, int] = defaultdict(int)
    for r in results:
        fams[r.case["family"]] += 1
    raised = sum(1 for r in results if r.verdict.ok and r.verdict.reason.startswith("raised"))
    failing = [r for r in results if not r.verdict.ok and not r.case["known_defect"]]
    known = defaultdict(lambda: [0, 0])
    for r in results:
        if r.case["known_defect"]:
            known[r.case["known_defect"]][0] += 1
            known[r.case["known_defect"]][1] += not r.verdict.ok
    worst = max((r.verdict.worst for r in results if r.verdict.ok), default=0.0)
    spent: dict[str, float] = defaultdict(float)
    for r in results:
        spent[r.case["family"]] += r.seconds
    lines = [f"fuzz seed {seed}: {len(results)} cases in {seconds:.1f} s; "
             + ", ".join(f"{k} {v}" for k, v in sorted(fams.items())),
             f"  {len(results) - len(failing) - sum(k[0] for k in known.values())} passed "
             f"({raised} of them by raising on every rank), worst error / tolerance {worst:.2g}; "
             f"{len(failing)} failed",
             "  known defects (cases, failing): " + ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in sorted(known.items())),
             "  seconds inside the cases per family: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(spent.items()))]
    for r in failing:
        lines.append(f"  FAIL {describe(r.case)}\n    {r.verdict.reason[:2000]}\n    rerun: {rerun_command(r.case)}")
    return "\n".join(lines)
