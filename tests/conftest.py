"""Shared pytest configuration.

- Hypothesis: no per-example deadline (the CI machine has 2 shared cores, and timing noise is not
  a bug); under ``CI`` the examples are derandomised so a CI run is reproducible.
- Multi-rank tests use :func:`tests.harness.run_ranks`; they need no fixture from here.
- The differential fuzzer (``tests/distributed/test_fuzz.py``) reads ``--fuzz-cases N``,
  ``--fuzz-seed S`` and ``--fuzz-case I`` (or ``HPATTN_FUZZ_CASES`` / ``HPATTN_FUZZ_SEED``).
- MKL is pinned to one code path in this process (``MKL_CBWR``, unless already set) before any
  test runs a tensor operation: float64 results are compared at 1e-10, and MKL's first
  multi-threaded call has been seen to miss that (Note [float64 reproducibility] in
  :mod:`hpattn_dist.tools.verify`). The harness ranks and the CLI's ranks pin it themselves.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

from hpattn_dist.tools.platform import pin_math_library

pin_math_library()

settings.register_profile("dev", deadline=None)
settings.register_profile(
    "ci", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_addoption(parser) -> None:
    from tests.fuzz.runner import DEFAULT_CASES, DEFAULT_SEED

    group = parser.getgroup("fuzz", "differential fuzzer (tests/distributed/test_fuzz.py)")
    group.addoption("--fuzz-cases", type=int, default=int(os.environ.get("HPATTN_FUZZ_CASES", DEFAULT_CASES)),
                    help=f"cases per run (default {DEFAULT_CASES}, or HPATTN_FUZZ_CASES)")
    group.addoption("--fuzz-seed", type=int, default=int(os.environ.get("HPATTN_FUZZ_SEED", DEFAULT_SEED)),
                    help=f"seed of the draw (default {DEFAULT_SEED}, or HPATTN_FUZZ_SEED)")
    group.addoption("--fuzz-case", type=int, default=None, help="run only this case index of the seed")


def pytest_configure(config) -> None:
    config.fuzz_cases = config.getoption("--fuzz-cases")
    config.fuzz_seed = config.getoption("--fuzz-seed")
    config.fuzz_case = config.getoption("--fuzz-case")
