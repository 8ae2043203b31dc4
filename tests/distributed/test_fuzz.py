"""The differential fuzzer in CI (Note [differential fuzzer] in ``tests/fuzz/__init__.py``).

One run of :data:`~tests.fuzz.runner.DEFAULT_CASES` drawn cases (seed
:data:`~tests.fuzz.runner.DEFAULT_SEED`) on real gloo ranks, one process group per world size:
every case must equal its float64 single-device reference or raise a clear error on every rank
within the exchange timeout. Cases of an open known defect (``KNOWN_DEFECTS`` in
``tests/fuzz/space.py``) are strict xfails, one test per defect: when a fix lands, its test
XPASSes and fails until the entry is removed.

Options (conftest): ``--fuzz-cases N`` (or ``HPATTN_FUZZ_CASES``), ``--fuzz-seed S`` (or
``HPATTN_FUZZ_SEED``), ``--fuzz-case I`` (run case I of seed S alone, as a failure's message
says). Run with ``-s`` to see the summary.
"""

from __future__ import annotations

import collections
import time

import pytest

from tests.fuzz.runner import Result, draw_cases, rerun_command, run_cases, summary
from tests.fuzz.space import FAMILIES, KNOWN_DEFECTS, WITNESSES, describe

_RUNS: dict[tuple, tuple[list[Result], float]] = {}

# The run (shared by the tests below) takes about a minute on two idle cores; each case has its own
# watchdog, so a longer limit than the suite's 300 s only matters on a loaded machine.
pytestmark = pytest.mark.timeout(900)


def _results(config: pytest.Config) -> list[Result]:
    seed, count, only = config.fuzz_seed, config.fuzz_cases, config.fuzz_case
    key = (seed, count, only)
    if key not in _RUNS:
        start = time.monotonic()
        results = run_cases(draw_cases(seed, count, only), log=lambda line: print(line, flush=True))
        _RUNS[key] = (results, time.monotonic() - start)
        print("\n" + summary(results, _RUNS[key][1], seed))
    return _RUNS[key][0]


def test_every_case_is_exact_or_raises_on_every_rank(pytestconfig):
    results = _results(pytestconfig)
    failures = [r for r in results if not r.verdict.ok and not r.case["known_defect"]]
    assert not failures, f"{len(failures)} of {len(results)} fuzz cases failed:\n" + "\n".join(
        f"{describe(r.case)}\n  -> {r.verdict.reason[:3000]}\n  rerun: {rerun_command(r.case)}" for r in failures)


@pytest.mark.parametrize("defect", [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=f"known defect {name}: {what}"))
    for name, (what, _) in KNOWN_DEFECTS.items()])
def test_known_defect_cases(pytestconfig, defect):
    """XFAIL while the defect is open; XPASS (a failure, strict) once every case of it passes:
    then remove its entry from ``KNOWN_DEFECTS``."""
    cases = [r for r in _results(pytestconfig) if r.case["known_defect"] == defect]
    if not cases:
        pytest.skip(f"no case of {defect} was drawn in this run")
    bad = [r for r in cases if not r.verdict.ok]
    assert not bad, f"{len(bad)} of {len(cases)} cases fail, e.g. {describe(bad[0].case)}: {bad[0].verdict.reason[:500]}"


def test_the_draws_cover_the_space(pytestconfig):
    """The CI draw reaches the corners issue 23 names (drawing only; no ranks)."""
    cases = draw_cases(pytestconfig.fuzz_seed, max(pytestconfig.fuzz_cases, len(WITNESSES)))
    assert len(cases) >= 300 or pytestconfig.fuzz_cases < 300
    assert {c["family"] for c in cases} == set(FAMILIES)
    assert {c["world"] for c in cases} == {1, 2, 3, 4}
    layouts = collections.Counter(v for c in cases if "layout" in c for v in c["layout"].values())
    assert all(layouts[k] for k in ("strided", "transposed", "heads_last", "expanded", "alias_qk", "alias_qkv",
                                    "packed")), layouts
    shapes = [c for c in cases if "sizes" in c]
    assert any(0 in c["sizes"] for c in shapes if c["world"] > 1)  # empty shards
    assert any(c["n"] < c["world"] for c in shapes)  # N < P
    assert any(c.get("b") == 0 for c in shapes)  # B = 0
    perturbed = {c["perturb"]["kind"] for c in cases if c.get("perturb")}
    assert {"dtype", "meta", "scale", "strategy", "window", "mode", "weights", "weights_permuted", "frozen",
            "train_eval", "bn_train_eval"} <= perturbed, perturbed
    assert {c["expect"] for c in cases} == {"exact", "raise", "exact_or_raise"}
    assert any(c.get("hook") for c in cases) and any(c.get("no_grad") for c in cases)
    assert {c["compiler"] for c in cases if c["family"] == "compile"} == {"aot_eager", "inductor"}
    assert draw_cases(7, 40) == draw_cases(7, 40)  # a case is a function of (seed, index)
    assert draw_cases(7, 40)[33] == draw_cases(7, 0, only=33)[0]
