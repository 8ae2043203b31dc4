"""Float64 dense local attention built from healpy: the reference of the local-attention tests.

Independent of :mod:`hpattn_dist.local`: the window of a cell comes from healpy's
``get_all_neighbours(nest=True)``, the attention is one masked ``[B, H, N, N]`` softmax, the
dropout mask is ``tests/reference.py``'s own implementation of its definition. Legend:
B batch, H heads, N pixels (NESTED), D head dim, c pixels per window cell.
"""

from __future__ import annotations

from typing import Optional

import healpy as hp
import numpy as np
import torch
from torch import Tensor

from hpattn_dist.kernels import DropoutSpec
from tests.reference import reference_attention


def healpy_window_cells(window_nside: int, mode: str) -> list[set[int]]:
    """Each cell's window as a set of cells (own cell, plus healpy's neighbours)."""
    n_cells = 12 * window_nside**2
    if mode == "cell":
        return [{u} for u in range(n_cells)]
    nb = hp.get_all_neighbours(window_nside, np.arange(n_cells), nest=True).T
    return [{u, *(int(w) for w in nb[u] if w >= 0)} for u in range(n_cells)]


def healpy_window_mask(nside: int, window_nside: int, mode: str) -> Tensor:
    """Bool ``[N, N]``: key pixel j is in query pixel i's window."""
    c = (nside // window_nside) ** 2
    cells = healpy_window_cells(window_nside, mode)
    cell_mask = np.zeros((len(cells), len(cells)), dtype=bool)
    for u, window in enumerate(cells):
        cell_mask[u, sorted(window)] = True
    cell_of = np.arange(12 * nside * nside) // c
    return torch.from_numpy(cell_mask[cell_of][:, cell_of])


def healpy_cross_window_mask(nside_q: int, nside_k: int, window_nside: int, mode: str) -> Tensor:
    """Bool ``[Nq, Nk]``: key pixel j (grid nside_k) lies in the window of query pixel i's cell
    (grid nside_q); each pixel's cell is its NESTED index integer-divided by its grid's cell size."""
    cells = healpy_window_cells(window_nside, mode)
    cell_mask = np.zeros((len(cells), len(cells)), dtype=bool)
    for u, window in enumerate(cells):
        cell_mask[u, sorted(window)] = True
    q_cell = np.arange(12 * nside_q**2) // (nside_q // window_nside) ** 2
    k_cell = np.arange(12 * nside_k**2) // (nside_k // window_nside) ** 2
    return torch.from_numpy(cell_mask[q_cell][:, k_cell])


def halo_pixels(nside: int, window_nside: int, mode: str, start: int, stop: int) -> set[int]:
    """Pixels outside ``[start, stop)`` in the window of some query pixel of ``[start, stop)``."""
    c = (nside // window_nside) ** 2
    cells = healpy_window_cells(window_nside, mode)
    need: set[int] = set()
    for u in range(start // c, (stop - 1) // c + 1) if stop > start else ():
        for w in cells[u]:
            need.update(range(w * c, (w + 1) * c))
    return {p for p in need if not start <= p < stop}


def reference_local_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor,
                              key_bias: Optional[Tensor] = None,
                              dropout: Optional[DropoutSpec] = None, scale: Optional[float] = None) -> Tensor:
    """``softmax(q k^T * scale + key_bias)`` over the allowed keys, times v, in float64 (``scale``
    default ``D ** -0.5``): :func:`tests.reference.reference_attention` with the window as its
    ``allowed`` keys.

    ``key_bias``: ``[B, N]`` or ``[B, H, N]`` (``-inf`` masks); a query with no allowed unmasked
    key gets zeros; keys outside a query's window take no part in its row (Note [non-finite
    inputs] in ``hpattn_dist/masks.py``). ``dropout``: spec of the whole matrix (normalise, then
    drop).
    """
    return reference_attention(q, k, v, scale=scale, key_bias=key_bias, dropout=dropout, allowed=allowed)
