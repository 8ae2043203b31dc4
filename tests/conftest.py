"""Shared pytest configuration.

- Hypothesis: no per-example deadline (the CI machine has 2 shared cores, and timing noise is not
  a bug); under ``CI`` the examples are derandomised so a CI run is reproducible.
- Multi-rank tests use :func:`tests.harness.run_ranks`; they need no fixture from here.
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
