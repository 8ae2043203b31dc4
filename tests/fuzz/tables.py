"""idx-flow connection tables (RING order, as idx-flow builds them), computed once per process."""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=None)
def table(nside_in: int, nside_out: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    from idx_flow.utils import compute_connection_indices

    return compute_connection_indices(nside_in, nside_out, k)
