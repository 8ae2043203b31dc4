"""Attention windows on the HEALPix hierarchy: cells of a coarser NESTED grid and their neighbours.

Legend: ``nside`` the field's resolution (``N = 12 * nside**2`` pixels), ``window_nside`` the
resolution of the window grid (a power of two dividing ``nside``), ``N_c = 12 * window_nside**2``
cells, ``c = (nside // window_nside)**2`` pixels per cell, ``K`` cells per window (1 or 9).

In NESTED order the pixels of one cell of the coarser grid are contiguous: pixel ``p`` lies in
cell ``p // c`` and cell ``u`` holds pixels ``[u * c, (u + 1) * c)``. A window is a SET of cells:

* ``"cell"``: the query's own cell (``K = 1``);
* ``"neighbourhood"``: its own cell and the cells adjacent to it, edges and corners (``K = 9``
  slots): 8 neighbours, 7 where the cell touches a corner shared by only three of the 12 base
  faces, and 6 when ``window_nside == 1`` (each base face). Missing slots are ``-1``, as in
  healpy's ``get_all_neighbours``.

Note [face neighbours]
~~~~~~~~~~~~~~~~~~~~~~
A cell is ``(face, ix, iy)`` with its NESTED index ``face * n**2 + morton(ix, iy)`` (``n`` the
grid's nside). Its neighbour in direction ``(dx, dy)`` is ``(ix + dx, iy + dy)`` on the same face
when that lies inside; otherwise it lies on an adjacent face, found as in HEALPix's C++
``Healpix_Base::neighbors``: the step leaves the face through one of 8 sides/corners
(``nbnum = 4 + sx + 3 * sy`` with ``sx, sy`` in ``{-1, 0, 1}``), the coordinates wrap modulo
``n``, ``_NB_FACE[nbnum][face]`` is the face entered (``-1``: that corner has no face, only three
faces meet there) and ``_NB_SWAP[nbnum][face // 4]`` says how the entered face's axes are
oriented relative to ours (bit 1 flips x, bit 2 flips y, bit 4 swaps x and y). The directions are
in healpy's order SW, W, NW, N, NE, E, SE, S. The tests compare every cell up to nside 64 (and
samples above) with healpy.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from hpattn_dist.healpix import _compress_bits, _spread_bits, check_nside

__all__ = ["WINDOW_MODES", "cell_neighbours", "check_window", "parse_window", "window_cells"]

WINDOW_MODES: tuple[str, ...] = ("cell", "neighbourhood")

_NB_DX = (-1, -1, 0, 1, 1, 1, 0, -1)
_NB_DY = (0, 1, 1, 1, 0, -1, -1, -1)
_NB_FACE = (
    (8, 9, 10, 11, -1, -1, -1, -1, 10, 11, 8, 9),  # S   (x < 0, y < 0)
    (5, 6, 7, 4, 8, 9, 10, 11, 9, 10, 11, 8),  # SE  (y < 0)
    (-1, -1, -1, -1, 5, 6, 7, 4, -1, -1, -1, -1),  # E   (x >= n, y < 0)
    (4, 5, 6, 7, 11, 8, 9, 10, 11, 8, 9, 10),  # SW  (x < 0)
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11),  # own face
    (1, 2, 3, 0, 0, 1, 2, 3, 5, 6, 7, 4),  # NE  (x >= n)
    (-1, -1, -1, -1, 7, 4, 5, 6, -1, -1, -1, -1),  # W   (x < 0, y >= n)
    (3, 0, 1, 2, 3, 0, 1, 2, 4, 5, 6, 7),  # NW  (y >= n)
    (2, 3, 0, 1, -1, -1, -1, -1, 0, 1, 2, 3),  # N   (x >= n, y >= n)
)
_NB_SWAP = ((0, 0, 3), (0, 0, 6), (0, 0, 0), (0, 0, 5), (0, 0, 0), (5, 0, 0), (0, 0, 0),
            (6, 0, 0), (3, 0, 0))


def check_window(window_nside: int, mode: str) -> int:
    """Validate the window arguments (not yet against a field's nside).

    Raises:
        ValueError: ``window_nside`` not a positive power of two, or ``mode`` not in
            :data:`WINDOW_MODES`.
    """
    if mode not in WINDOW_MODES:
        raise ValueError(f"mode must be one of {WINDOW_MODES}, got {mode!r}")
    try:
        return check_nside(window_nside)
    except ValueError as err:
        raise ValueError(f"window_nside: {err}") from None


def check_window_fits(nside: int, window_nside: int) -> int:
    """Pixels per cell ``c = (nside // window_nside)**2``.

    Raises:
        ValueError: ``window_nside`` does not divide ``nside`` (both powers of two).
    """
    if window_nside > nside:
        raise ValueError(
            f"window_nside={window_nside} must divide the field's nside={nside} (a window cell "
            "cannot be finer than a pixel)"
        )
    return (nside // window_nside) ** 2


def cell_neighbours(window_nside: int, cells: Optional[Tensor] = None) -> Tensor:
    """The 8 neighbouring cells of cells of the ``window_nside`` grid (NESTED).

    Args:
        window_nside: resolution of the cell grid, a power of two.
        cells: int64 ``[M]`` cells to look up (default: all ``N_c``, on the CPU); the result is
            on their device.

    Returns:
        int64 ``[M, 8]`` in healpy's order (SW, W, NW, N, NE, E, SE, S), ``-1`` where there is
        no neighbour; equal to ``healpy.get_all_neighbours(window_nside, cells, nest=True).T``
        (Note [face neighbours]).
    """
    n = check_nside(window_nside)
    order = n.bit_length() - 1
    if cells is None:
        cells = torch.arange(12 * n * n, dtype=torch.int64)
    device = cells.device
    face = cells >> (2 * order)
    morton = cells & (n * n - 1)
    ix = _compress_bits(morton, max(order, 1))
    iy = _compress_bits(morton >> 1, max(order, 1))
    face_table = torch.tensor(_NB_FACE, dtype=torch.int64, device=device)
    swap_table = torch.tensor(_NB_SWAP, dtype=torch.int64, device=device)
    out = []
    for dx, dy in zip(_NB_DX, _NB_DY):
        x, y = ix + dx, iy + dy
        sx = (x >= n).long() - (x < 0).long()
        sy = (y >= n).long() - (y < 0).long()
        x, y = x - sx * n, y - sy * n
        nbnum = 4 + sx + 3 * sy
        f = face_table[nbnum, face]
        bits = swap_table[nbnum, face >> 2]
        x = torch.where(bits & 1 != 0, n - x - 1, x)
        y = torch.where(bits & 2 != 0, n - y - 1, y)
        x, y = torch.where(bits & 4 != 0, y, x), torch.where(bits & 4 != 0, x, y)
        nest = f * (n * n) + (_spread_bits(x, max(order, 1)) | (_spread_bits(y, max(order, 1)) << 1))
        out.append(torch.where(f >= 0, nest, torch.full_like(nest, -1)))
    return torch.stack(out, dim=1)


@functools.lru_cache(maxsize=16)
def _window_cells_cpu(window_nside: int, mode: str) -> Tensor:
    own = torch.arange(12 * window_nside**2, dtype=torch.int64)[:, None]
    if mode == "cell":
        return own
    return torch.cat([own, cell_neighbours(window_nside)], dim=1)


def window_cells(window_nside: int, mode: str) -> Tensor:
    """The cells of every cell's window.

    Returns:
        int64 ``[N_c, K]`` (CPU): column 0 is the cell itself; for ``"neighbourhood"`` columns
        1..8 are :func:`cell_neighbours` (``-1`` = no such neighbour). Cached; do not modify.
    """
    check_window(window_nside, mode)
    return _window_cells_cpu(int(window_nside), mode)


def parse_window(spec: str, nside: Optional[int] = None) -> tuple[str, int]:
    """``"neighbourhood:2"`` -> ``("neighbourhood", 2)`` (configs and command lines).

    Raises:
        ValueError: not ``MODE:WINDOW_NSIDE`` with a mode of :data:`WINDOW_MODES` and a power of
            two ``WINDOW_NSIDE`` dividing ``nside`` (when given).
    """
    mode, _, text = str(spec).partition(":")
    window_nside = int(text) if text.isdigit() else 0
    if mode not in WINDOW_MODES or window_nside < 1 or window_nside & (window_nside - 1) or (
            nside is not None and nside % window_nside):
        raise ValueError(
            f"{spec!r} is not MODE:WINDOW_NSIDE with MODE in {WINDOW_MODES} and WINDOW_NSIDE a power "
            f"of two dividing nside{'' if nside is None else f'={nside}'} (e.g. 'neighbourhood:2')"
        )
    return mode, window_nside
