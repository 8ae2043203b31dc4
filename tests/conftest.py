"""Shared pytest configuration.

- Hypothesis: no per-example deadline (the CI machine has 2 shared cores, and timing noise is not
  a bug); under ``CI`` the examples are derandomised so a CI run is reproducible.
- Multi-rank tests use :func:`tests.harness.run_ranks`; they need no fixture from here.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("dev", deadline=None)
settings.register_profile(
    "ci", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
