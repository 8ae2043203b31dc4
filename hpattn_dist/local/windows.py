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

Note [padded faces]
~~~~~~~~~~~~~~~~~~~
The neighbour found above depends only on the face and the stepped-to coordinate ``(x, y)`` in
``[-1, n]**2``, not on the cell the step started from. So each face, with a border of one cell,
is an ``(n + 2) x (n + 2)`` grid of cells (:func:`padded_face_cells`; ``-1`` at the corners that
have no face) in which the neighbourhood of cell ``(x, y)`` is the 3 x 3 block around it: its
window is a rectangle of the padded grid, and the keys of column ``x + dx`` of that block are
three cells adjacent in ``y``. A run of NESTED cells ``[4**k * j, 4**k * (j + 1))`` is the aligned
square of side ``2**k`` at ``(x, y) = morton**-1(4**k * j)`` of its face, so any range of cells is a
few such squares (:func:`cell_squares`), each a block of a padded face. Local attention lays
the keys of a square out in that padded grid and reads each column of windows as views
(Note [local attention plan] in :mod:`hpattn_dist.local.plan`).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from hpattn_dist.attention_spec import WINDOW_MODES, check_window
from hpattn_dist.healpix import _compress_bits, _spread_bits, check_nside

__all__ = ["WINDOW_MODES", "cell_neighbours", "cell_squares", "check_window", "face_cell",
           "padded_face_cells", "parse_window", "window_cells"]

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


def face_cell(window_nside: int, face: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """NESTED cell index of ``(face, x, y)`` on the ``window_nside`` grid (broadcasting int64)."""
    order = max(int(window_nside).bit_length() - 1, 1)
    return face * window_nside**2 + (_spread_bits(x, order) | (_spread_bits(y, order) << 1))


@functools.lru_cache(maxsize=16)
def _padded_face_cells_cpu(window_nside: int) -> Tensor:
    n = window_nside
    cells = torch.arange(12 * n * n, dtype=torch.int64)
    order = max(n.bit_length() - 1, 1)
    face, morton = cells // (n * n), cells % (n * n)
    ix, iy = _compress_bits(morton, order), _compress_bits(morton >> 1, order)
    out = torch.full((12, n + 2, n + 2), -1, dtype=torch.int64)
    out[face, ix + 1, iy + 1] = cells
    neighbours = cell_neighbours(n)  # [N_c, 8]
    for d, (dx, dy) in enumerate(zip(_NB_DX, _NB_DY)):
        # Every step onto the same border position finds the same cell (Note [padded faces]).
        out[face, ix + dx + 1, iy + dy + 1] = neighbours[:, d]
    return out


def padded_face_cells(window_nside: int) -> Tensor:
    """Each face of the ``window_nside`` grid with a one-cell border (Note [padded faces]).

    Returns:
        int64 ``[12, n + 2, n + 2]`` (CPU, ``n = window_nside``): entry ``[f, x + 1, y + 1]`` is
        the cell at ``(x, y)`` of face ``f`` for ``0 <= x, y < n``, and the cell a step from the
        face onto the border position ``(x, y)`` reaches, ``-1`` where none (three faces meet).
        Cached; do not modify.
    """
    return _padded_face_cells_cpu(check_nside(window_nside))


def cell_squares(first: int, stop: int, window_nside: int) -> list[tuple[int, int, int, int]]:
    """The NESTED cells ``[first, stop)`` as aligned squares of their faces, in NESTED order.

    Returns:
        ``(face, x0, y0, side)`` per square: the square holds the cells ``(face, x0 + i, y0 + j)``
        for ``0 <= i, j < side``, which are the NESTED cells ``[start, start + side**2)`` of one
        run (Note [padded faces]).
    """
    n = check_nside(window_nside)
    order = n.bit_length() - 1
    out, a = [], int(first)
    while a < stop:
        k = order
        while k > 0 and (a % 4**k or a + 4**k > stop):
            k -= 1
        face, morton = divmod(a, n * n)
        m = torch.tensor([morton], dtype=torch.int64)
        x0 = int(_compress_bits(m, max(order, 1)))
        y0 = int(_compress_bits(m >> 1, max(order, 1)))
        out.append((face, x0, y0, 2**k))
        a += 4**k
    return out


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
