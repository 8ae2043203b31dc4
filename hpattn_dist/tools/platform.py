"""Pinning the math library's code path before the first tensor operation (no torch import).

Note [float64 reproducibility] in :mod:`hpattn_dist.tools.verify` says why; the ``verify`` ranks,
``tests/harness.py`` ranks and the pytest process call :func:`pin_math_library` first thing.
"""

from __future__ import annotations

import os
from typing import Optional

#: Environment that pins MKL to one code path (Note [float64 reproducibility] in
#: :mod:`hpattn_dist.tools.verify`). MKL reads it once, at its first call in the process.
PINNED_MATH_ENV: dict[str, str] = {"MKL_CBWR": "COMPATIBLE"}


def pin_math_library(environ: Optional[dict] = None) -> dict[str, str]:
    """Set each variable of :data:`PINNED_MATH_ENV` in ``environ`` (default ``os.environ``)
    unless it is already set, and return the values in force.

    Call it before the process's first MKL call (any float64 matmul or ``exp`` on CPU); importing
    torch is fine. A value the user set is kept, so ``MKL_CBWR=AUTO`` (say) still overrides.
    """
    environ = os.environ if environ is None else environ
    for key, value in PINNED_MATH_ENV.items():
        environ.setdefault(key, value)
    return {key: environ[key] for key in PINNED_MATH_ENV}
