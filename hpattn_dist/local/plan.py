"""One rank's plan of local attention: its cells, the windows run together, the halo (pure arithmetic).

Legend: B batch, H heads, D head dim, P ranks in the group, r this rank, Nq_r / Nk_r query / key
pixels on rank r (any contiguous NESTED split, zero included; ``Nq_r = Nk_r = N_r`` for
self-attention), c_q / c_k pixels per cell of the window grid on the query / key grid, U_r the
cells holding at least one of rank r's queries (its *units*), n = window_nside, s the side of a
square of cells, R halo rows received.

Note [local attention plan]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
The queries of one cell share their window, so windows are computed a cell at a time, and many
cells in one kernel call: the cells are folded into the batch dims of ``[X, Y, c_q, D]`` query
blocks against ``[X, Y, L, D]`` key blocks (X rows of ``B * H`` batch-head pairs), so a fused
kernel runs every window of a call at once, with no mask and no ``N x N`` score matrix.

* ``mode="cell"``: window = the unit's own cell. The units are one list; where a run of them lies
  wholly on this rank on both sides, the query and key blocks are VIEWS of q, k, v (``[B, H, N_r,
  D]`` is ``[B * H, U, c, D]``) and one call's output is the output; elsewhere the blocks are
  gathered.
* ``mode="neighbourhood"``: the window of cell ``(x, y)`` of a padded face is the 3 x 3 block
  around it (Note [padded faces] in :mod:`hpattn_dist.local.windows`). The units are cut into
  aligned squares (a whole face each at P = 1); a square's queries are laid out ``[s, C, B * H,
  s, c_q, D]`` (x, square, batch-head, y) and its keys in its padded grid ``[s + 2, C, B * H, s +
  2, c_k, D]``. For each column offset ``dx`` in (-1, 0, 1) the keys of every window are then the
  three cells ``(x + dx, y - 1 .. y + 1)``, which lie next to each other: ONE strided view
  ``[s * C * B * H, s, 3 * c_k, D]`` (overlapping windows, no copy) serves a whole call. The three
  calls' ``(out, lse)`` merge with the ring's online softmax (Note [stable merge]), so every key is
  laid out once per padded square, never once per window. Squares of side 1 or 2 (the faces at
  ``n <= 2``, the ends of a rank's range) would pad 9x or 4x: their windows run as lists of cells
  instead (each unit against its 9 (8, 7, 6) cells). Where three faces meet a window has
  only 7 other cells: the padded grid holds a zero block there; a masked call gives it bias -inf,
  and in an unmasked call the column holding it is computed again for those few windows from its
  two cells (``fixes``: ONE call per column offset for all the rank's groups), before the merge. The backward needs no such pass: a zero key block adds
  exactly zero to dQ, and its dK/dV are dropped.

Queries and keys are read through a *cell store* per side: the cells wholly on this rank are
views of this rank's rows (no copy), the others (a cell split between ranks, a halo cell) are
assembled once per call into a small buffer from the own rows and the rows received in ONE
``all_to_all`` (:func:`hpattn_dist.comm.halo.plan_halo_from_needs`: every rank computes every
rank's windows, so each knows what to send; the cells of a window are its cells, the table is
never expanded to pixels beyond the halo). A call's blocks are gathered from the stores by cell
(one ``index_select`` of ``c * D`` element rows), except the views above. The windows are run
in groups of at most ``U_r / 4`` cells (:data:`_GROUPS`), which bounds what one group gathers
(Note [local attention memory]): a square above that is cut into its four aligned quarters, and
those again, down to side 4 (a rank holding a face or a few: one group was a whole face, up to 2/3
of its units). Only a rank whose squares of side 4 are themselves above ``U_r / 4`` (fewer than
64 cells) runs a group above it.

Two grids (cross-attention, ``ring_cross_attention(..., window_nside=W)``): the query cells and
their padding come from the query split and ``c_q``, the key store and the halo from the key split
and ``c_k``; nothing else changes. Self-attention is the case ``key_sizes=None`` (one split).
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from hpattn_dist.comm.groups import offsets
from hpattn_dist.comm.halo import HaloPlan, plan_halo_from_needs
from hpattn_dist.cost_model.memory import WindowGeometry, WindowGroupShape
from hpattn_dist.healpix import npix2nside
from hpattn_dist.local.windows import (
    cell_squares, check_window, check_window_fits, face_cell, padded_face_cells, window_cells,
)

__all__ = ["CellRefs", "CellStore", "ColumnFix", "LocalPlan", "WindowGroup", "cached_plan", "plan_local_attention"]

#: The windows of a rank run in at least this many groups (a group gathers its blocks at once).
_GROUPS = 4
#: Squares of cells smaller than this run their windows as lists (Note [local attention plan]).
_MIN_SIDE = 4
_MAX_PLANS = 16


@dataclass(frozen=True)
class CellStore:
    """Where the cell blocks of one side (queries or keys) come from on one rank.

    A cell is referred to by its *ref*: ``0 .. n_own - 1`` the cells ``own_first ..`` wholly on
    this rank (rows ``lead + ref * c ..`` of the rank's rows, read in place), ``n_own + e`` the
    edge cell ``edge_cells[e]``, ``n_own + E`` a zero block (``zero_cell``).

    Attributes:
        cell_pixels: c.
        n_local: this rank's rows ``N_r``.
        own_first, n_own, lead: the cells wholly on this rank and the rows before the first.
        edge_cells: int64 ``[E]``, the other cells this rank reads, ascending.
        edge_rows: int64 ``[E, c]``, each edge cell's rows in ``[own N_r | received R]``; -1 for a
            row no rank sends (a query of another rank: the block is padded with zeros).
        zero_cell: a zero block follows the edge cells (neighbourhood windows, missing cells).
        own_pos, own_rows: the flat positions in ``edge_rows`` that are this rank's rows, and those rows.
        recv_pos, recv_rows: the positions that are received rows, and their rows in the received buffer.
    """

    cell_pixels: int
    n_local: int
    own_first: int
    n_own: int
    lead: int
    edge_cells: Tensor
    edge_rows: Tensor
    zero_cell: bool
    own_pos: Tensor
    own_rows: Tensor
    recv_pos: Tensor
    recv_rows: Tensor

    @property
    def n_edge(self) -> int:
        return int(self.edge_cells.numel())

    def refs(self, cells: Tensor) -> Tensor:
        """Refs of global ``cells`` (any shape; -1 = the zero block)."""
        own = (cells >= self.own_first) & (cells < self.own_first + self.n_own)
        edge = self.n_own + torch.searchsorted(self.edge_cells, cells.clamp(min=0))
        out = torch.where(own, cells - self.own_first, edge)
        return torch.where(cells < 0, torch.full_like(cells, self.n_own + self.n_edge), out)

    def to(self, device: torch.device) -> "CellStore":
        return replace(self, edge_cells=self.edge_cells.to(device), edge_rows=self.edge_rows.to(device),
                       own_pos=self.own_pos.to(device), own_rows=self.own_rows.to(device),
                       recv_pos=self.recv_pos.to(device), recv_rows=self.recv_rows.to(device))


@dataclass(frozen=True)
class CellRefs:
    """Refs of a :class:`CellStore` laid out ``[A, C, *Y]``, with the positions of those that are
    not own cells planned on the host, so that a call reads no device data to route them (Note
    [agreement off the device] in ``comm/agreement.py``).

    Attributes:
        refs: int64 ``[A, C, *Y]``.
        edge_pos: int64 ``[n]``, flat positions (in ``refs``) of refs at or above the store's ``n_own``.
    """

    refs: Tensor
    edge_pos: Tensor

    @staticmethod
    def of(refs: Tensor, store: CellStore) -> "CellRefs":
        return CellRefs(refs, (refs.reshape(-1) >= store.n_own).nonzero().squeeze(1))

    def to(self, device: torch.device) -> "CellRefs":
        return CellRefs(self.refs.to(device), self.edge_pos.to(device))


@dataclass(frozen=True)
class WindowGroup:
    """Windows run by the same kernel calls (Note [local attention plan]).

    Attributes:
        pad: 1 for squares of padded faces (three calls, one per column offset), 0 for a list
            (one call: each unit against its listed key cells, side by side).
        q_cells: int64 ``[A, C, Y]`` global query cells: squares ``[s, C, s]`` (x, square, y), or
            a list ``[1, 1, Y]``.
        k_cells: int64, squares: ``[s + 2, C, s + 2]`` the padded grids; list: ``[Y, m]`` each
            unit's key cells. -1: no cell (a zero block).
        q_refs, k_refs: the same as :class:`CellRefs` of the query and key :class:`CellStore`
            (``k_refs`` of a list ``[1, 1, Y, m]``).
        q_view, k_view: for a list whose refs are ``q_view ..`` (``k_view ..``, one key cell each)
            in order and own: read in place; else -1.
        fixes: for squares, per column offset dx with a zero block in some window's column:
            ``(dx, windows, first)``: the windows (flat ``(x, square, y)`` indices into ``[A, C, Y]``)
            whose column dx is computed again from its two cells when no key bias masks the zero
            block, in the plan's :class:`ColumnFix` of dx from window ``first`` on.
    """

    pad: int
    q_cells: Tensor
    k_cells: Tensor
    q_refs: CellRefs
    k_refs: CellRefs
    q_view: int = -1
    k_view: int = -1
    fixes: tuple[tuple[int, Tensor, int], ...] = ()

    def to(self, device: torch.device) -> "WindowGroup":
        return replace(self, q_cells=self.q_cells.to(device), k_cells=self.k_cells.to(device),
                       q_refs=self.q_refs.to(device), k_refs=self.k_refs.to(device),
                       fixes=tuple((dx, w.to(device), first) for dx, w, first in self.fixes))


@dataclass(frozen=True)
class ColumnFix:
    """One call for every window of the rank whose column dx reads a zero block: their queries
    against the column's two other cells (Note [local attention plan]).

    Attributes:
        dx: the column offset.
        q_cells: int64 ``[n]``, the windows' query cells; q_refs their :class:`CellRefs` ``[1, 1, n]``.
        k_cells: int64 ``[n, 2]``, the column's cells; k_refs their :class:`CellRefs` ``[1, 1, n, 2]``.
    """

    dx: int
    q_cells: Tensor
    q_refs: CellRefs
    k_cells: Tensor
    k_refs: CellRefs

    def to(self, device: torch.device) -> "ColumnFix":
        return ColumnFix(self.dx, self.q_cells.to(device), self.q_refs.to(device), self.k_cells.to(device),
                         self.k_refs.to(device))


@dataclass(frozen=True)
class LocalPlan:
    """Everything rank r needs to run local attention on one split (Note [local attention plan]).

    Attributes:
        nside, window_nside, mode: the query grid's and the window grid's resolution, the window mode.
        cell_pixels: ``c_q``, query pixels per cell.
        n_local: ``Nq_r``, this rank's queries; ``q_start`` the global index of the first.
        units: int64 ``[U_r]``, the cells holding this rank's queries.
        window_sizes: int64 ``[U_r]``, the cells of each unit's window (1, or 9, 8, 7).
        queries, keys: the :class:`CellStore` of each side.
        groups: the windows, in the order they run.
        halo: the key-row exchange (:class:`~hpattn_dist.comm.halo.HaloPlan`; input = key split).
        key_nside, key_cell_pixels, n_local_keys, k_start: the key grid's ``nside``, ``c_k``, this
            rank's keys ``Nk_r`` and the global index of the first (the query side's for
            self-attention).
        cross: queries and keys on two grids (their exchange is counted as ``cross.halo.*``,
            else ``local.halo.*``).
        fixes: the :class:`ColumnFix` calls of the groups' ``fixes``, one per column offset.
    """

    nside: int
    window_nside: int
    mode: str
    cell_pixels: int
    n_local: int
    q_start: int
    units: Tensor
    window_sizes: Tensor
    queries: CellStore
    keys: CellStore
    groups: tuple[WindowGroup, ...]
    halo: HaloPlan
    key_nside: int
    key_cell_pixels: int
    n_local_keys: int
    k_start: int
    cross: bool = False
    fixes: tuple[ColumnFix, ...] = ()

    @property
    def n_units(self) -> int:
        return int(self.units.numel())

    def geometry(self) -> WindowGeometry:
        """The shapes Note [local attention memory] counts (``hpattn_dist.cost_model.memory``)."""
        groups = tuple(WindowGroupShape(bool(g.pad), int(g.q_cells.numel()), int(g.k_cells.numel()),
                                        3 if g.pad else int(g.k_cells.shape[1])) for g in self.groups)
        in_place = (self.mode == "cell" and len(self.groups) == 1 and self.groups[0].q_view == 0
                    and not self.halo.total_rows)
        return WindowGeometry(self.cell_pixels, self.key_cell_pixels, self.n_units, self.n_local_keys,
                              (self.keys.n_edge + int(self.keys.zero_cell)) * self.key_cell_pixels,
                              self.halo.rows_sent, self.halo.rows_received, groups, in_place)

    def to(self, device: torch.device) -> "LocalPlan":
        if self.halo.send_indices.device == device:
            return self
        return replace(self, halo=self.halo.to(device), queries=self.queries.to(device),
                       keys=self.keys.to(device), groups=tuple(g.to(device) for g in self.groups),
                       fixes=tuple(f.to(device) for f in self.fixes))


def _unit_cells(start: int, stop: int, c: int) -> Tensor:
    if stop <= start:
        return torch.zeros(0, dtype=torch.int64)
    return torch.arange(start // c, (stop - 1) // c + 1, dtype=torch.int64)


def _own_cells(start: int, stop: int, c: int) -> tuple[int, int]:
    """``(first, count)`` of the cells wholly inside ``[start, stop)``."""
    first, last = -(-start // c), stop // c
    return first, max(0, last - first)


def _nested_nside(n: int, what: str) -> int:
    if n == 0:
        raise ValueError(f"the {what} has no pixels on any rank (N = 0)")
    try:
        nside = npix2nside(n)
    except ValueError as err:
        raise ValueError(f"the {what}: {err}") from None
    if nside & (nside - 1):
        raise ValueError(f"local attention needs NESTED order, so a power-of-two nside; the {what} has "
                         f"N = {n} (nside {nside})")
    return nside


def _cell_pixels(nside: int, window_nside: int, what: str) -> int:
    try:
        return check_window_fits(nside, window_nside)
    except ValueError as err:
        raise ValueError(f"the {what}: {err}" if what else str(err)) from None


def _read_cells(units: Tensor, windows: Tensor) -> Tensor:
    """The distinct cells (ascending) in the windows of ``units``."""
    cells = windows[units].reshape(-1)
    return torch.unique(cells[cells >= 0])


def _store(start: int, stop: int, c: int, edge_cells: Tensor, recv_pixels: Optional[Tensor],
           zero_cell: bool) -> CellStore:
    """The cell store of rows ``[start, stop)``; ``recv_pixels``: the rows received (ascending
    global pixels), None for queries (rows of other ranks are padding)."""
    own_first, n_own = _own_cells(start, stop, c)
    pixels = edge_cells[:, None] * c + torch.arange(c, dtype=torch.int64)  # [E, c]
    own = (pixels >= start) & (pixels < stop)
    if recv_pixels is None:
        other = torch.full_like(pixels, -1)
    else:
        other = (stop - start) + torch.searchsorted(recv_pixels, pixels)
    rows = torch.where(own, pixels - start, other)
    flat = rows.reshape(-1)
    own_pos = ((flat >= 0) & (flat < stop - start)).nonzero().squeeze(1)
    recv_pos = (flat >= stop - start).nonzero().squeeze(1)
    return CellStore(c, stop - start, own_first, n_own, own_first * c - start if n_own else 0,
                     edge_cells, rows, zero_cell, own_pos, flat[own_pos], recv_pos, flat[recv_pos] - (stop - start))


def _not_own(cells: Tensor, start: int, stop: int, c: int) -> Tensor:
    first, count = _own_cells(start, stop, c)
    return cells[(cells < first) | (cells >= first + count)]


def _chunks(items: list, sizes: list[int], budget: int) -> list[list]:
    """``items`` in order, cut into runs whose ``sizes`` add up to at most ``budget`` (at least one item)."""
    out, run, total = [], [], 0
    for item, size in zip(items, sizes):
        if run and total + size > budget:
            out.append(run)
            run, total = [], 0
        run.append(item)
        total += size
    return out + ([run] if run else [])


def _split_square(square: tuple[int, int, int, int], budget: int) -> list[tuple[int, int, int, int]]:
    """``square`` ``(face, x0, y0, side)`` cut into its four aligned quarters (in NESTED order),
    and those again, while a square holds more than ``budget`` cells and its quarters are no
    smaller than :data:`_MIN_SIDE` (Note [local attention memory]: a group's share of the rank)."""
    face, x0, y0, side = square
    half = side // 2
    if side * side <= budget or half < _MIN_SIDE:
        return [square]
    return [part for dx, dy in ((0, 0), (half, 0), (0, half), (half, half))
            for part in _split_square((face, x0 + dx, y0 + dy, half), budget)]


def _list_group(units: Tensor, key_cells: Tensor, queries: CellStore, keys: CellStore) -> WindowGroup:
    q_refs, k_refs = queries.refs(units), keys.refs(key_cells)
    q_view = k_view = -1
    y, m = units.numel(), key_cells.shape[1]
    if int(q_refs.max()) < queries.n_own and torch.equal(q_refs, q_refs[0] + torch.arange(y)):
        q_view = int(q_refs[0])
    if m == 1 and int(k_refs.max()) < keys.n_own and torch.equal(k_refs[:, 0], k_refs[0, 0] + torch.arange(y)):
        k_view = int(k_refs[0, 0])
    return WindowGroup(0, units.view(1, 1, y), key_cells, CellRefs.of(q_refs.view(1, 1, y), queries),
                       CellRefs.of(k_refs.view(1, 1, y, m), keys), q_view, k_view)


def _square_group(squares: list[tuple[int, int, int, int]], n: int, queries: CellStore,
                  keys: CellStore, fix_columns: dict[int, list]) -> WindowGroup:
    s = squares[0][3]
    padded = padded_face_cells(n)
    ar, ar2 = torch.arange(s), torch.arange(s + 2)
    q_cells = torch.stack([face_cell(n, torch.tensor(f), x0 + ar[:, None], y0 + ar[None, :])
                           for f, x0, y0, _ in squares], dim=1)  # [s, C, s]
    k_cells = torch.stack([padded[f, x0 + ar2[:, None], y0 + ar2[None, :]]
                           for f, x0, y0, _ in squares], dim=1)  # [s + 2, C, s + 2]
    fixes = []
    for dx in (-1, 0, 1):
        # column dx of window (x, c, y): cells (x + dx, c, y - 1 .. y + 1) of the padded grid
        column = torch.stack([k_cells[1 + dx:1 + dx + s, :, t:t + s] for t in range(3)], dim=-1)
        hit = (column < 0).any(dim=-1).reshape(-1)  # [A * C * Y]
        if bool(hit.any()):
            cells = column.reshape(-1, 3)[hit]
            cells = cells[cells >= 0].view(-1, 2)  # one cell is missing where three faces meet
            first = len(fix_columns[dx])
            fix_columns[dx] += [(q, tuple(k)) for q, k in zip(q_cells.reshape(-1)[hit].tolist(), cells.tolist())]
            fixes.append((dx, hit.nonzero().squeeze(1), first))
    return WindowGroup(1, q_cells, k_cells, CellRefs.of(queries.refs(q_cells), queries),
                       CellRefs.of(keys.refs(k_cells), keys), fixes=tuple(fixes))


def plan_local_attention(sizes: tuple[int, ...], window_nside: int, mode: str, rank: int,
                         key_sizes: Optional[tuple[int, ...]] = None) -> LocalPlan:
    """Plan rank ``rank``'s local attention (pure arithmetic; Note [local attention plan]).

    Args:
        sizes: every rank's query pixel count, in group-rank order (contiguous NESTED ranges).
        window_nside, mode: the window (:mod:`hpattn_dist.local.windows`).
        rank: the rank to plan for.
        key_sizes: every rank's key pixel count when keys live on another grid (cross-attention);
            None: the keys are the queries' field.

    Raises:
        ValueError: a total that is not a NESTED HEALPix size, or ``window_nside`` finer than
            either grid.
    """
    cross = key_sizes is not None
    key_sizes = tuple(key_sizes) if cross else tuple(sizes)
    if len(key_sizes) != len(sizes):
        raise ValueError(f"{len(sizes)} query shard sizes but {len(key_sizes)} key shard sizes")
    nside = _nested_nside(sum(sizes), "query field" if cross else "field")
    key_nside = _nested_nside(sum(key_sizes), "key field") if cross else nside
    n = check_window(window_nside, mode)
    c_q = _cell_pixels(nside, n, "query field" if cross else "")
    c_k = _cell_pixels(key_nside, n, "key field") if cross else c_q
    windows = window_cells(n, mode)  # [N_c, K]
    q_bounds = [(a, a + m) for a, m in zip(offsets(sizes), sizes)]
    k_bounds = [(a, a + m) for a, m in zip(offsets(key_sizes), key_sizes)]

    # What every rank reads beyond its own key cells: the halo, planned from every rank's windows.
    key_in_cell = torch.arange(c_k, dtype=torch.int64)
    needs, edges = [], []
    for (qa, qb), (ka, kb) in zip(q_bounds, k_bounds):
        edge = _not_own(_read_cells(_unit_cells(qa, qb, c_q), windows), ka, kb, c_k)
        pixels = (edge[:, None] * c_k + key_in_cell).reshape(-1)
        needs.append(pixels[(pixels < ka) | (pixels >= kb)])
        edges.append(edge)
    halo = plan_halo_from_needs(needs, k_bounds, rank)

    units = _unit_cells(*q_bounds[rank], c_q)
    window = windows[units]  # [U_r, K]
    missing = bool((window < 0).any())
    keys = _store(*k_bounds[rank], c_k, edges[rank], halo.recv_pixels, missing)
    q_first, q_own = _own_cells(*q_bounds[rank], c_q)
    q_edge = units[(units < q_first) | (units >= q_first + q_own)]
    queries = _store(*q_bounds[rank], c_q, q_edge, None, False)

    budget = max(1, math.ceil(units.numel() / _GROUPS))
    groups: list[WindowGroup] = []
    fix_columns: dict[int, list] = {-1: [], 0: [], 1: []}
    if mode == "cell":
        # The run of units wholly on this rank on both sides reads q, k, v in place (one call).
        k_first, k_own = keys.own_first, keys.n_own
        a, b = max(q_first, k_first), min(q_first + q_own, k_first + k_own)
        in_place = (units >= a) & (units < b)
        if b > a:
            groups.append(_list_group(units[in_place], units[in_place, None], queries, keys))
        rest = units[~in_place]
        for part in rest.split(budget) if rest.numel() else ():
            groups.append(_list_group(part, part[:, None], queries, keys))
    elif units.numel():
        squares = cell_squares(int(units[0]), int(units[-1]) + 1, n)
        by_side = collections.defaultdict(list)
        listed = torch.zeros(units.numel(), dtype=torch.bool)  # windows run as lists
        for square in squares:  # Note [local attention memory]: no square above the group budget
            for part in _split_square(square, budget):
                by_side[part[3]].append(part)
        for side, same in sorted(by_side.items(), reverse=True):
            if side < _MIN_SIDE:  # a padded border of 4x or 9x: list these windows instead
                for f, x0, y0, _ in same:
                    first = int(face_cell(n, torch.tensor(f), torch.tensor(x0), torch.tensor(y0)))
                    listed[first - int(units[0]):first - int(units[0]) + side * side] = True
                continue
            for run in _chunks(same, [side * side] * len(same), budget):
                groups.append(_square_group(run, n, queries, keys, fix_columns))
        # Listed windows, grouped by their number of cells m.
        sizes_m = (window >= 0).sum(dim=1)
        for m in sorted(set(sizes_m[listed].tolist())):
            sel = (sizes_m == m) & listed
            cells = window[sel][window[sel] >= 0].view(-1, m)
            step = max(8, budget // 2)  # about twice the key cells a group of squares lays out
            for a in range(0, cells.shape[0], step):
                groups.append(_list_group(units[sel][a:a + step], cells[a:a + step], queries, keys))
    fixes = []
    for dx, rows in fix_columns.items():
        if rows:
            q_fix = torch.tensor([q for q, _ in rows], dtype=torch.int64)
            k_fix = torch.tensor([k for _, k in rows], dtype=torch.int64)
            fixes.append(ColumnFix(dx, q_fix, CellRefs.of(queries.refs(q_fix).view(1, 1, -1), queries), k_fix,
                                   CellRefs.of(keys.refs(k_fix).view(1, 1, -1, 2), keys)))
    return LocalPlan(
        nside, n, mode, c_q, sizes[rank], q_bounds[rank][0], units, (window >= 0).sum(dim=1), queries, keys,
        tuple(groups), halo, key_nside, c_k, key_sizes[rank], k_bounds[rank][0], cross, tuple(fixes),
    )


_plans: "collections.OrderedDict[tuple, LocalPlan]" = collections.OrderedDict()


def cached_plan(sizes: tuple[int, ...], key_sizes: Optional[tuple[int, ...]], window_nside: int, mode: str,
                rank: int, device: torch.device) -> LocalPlan:
    """:func:`plan_local_attention` on ``device``, cached per split (the last :data:`_MAX_PLANS`)."""
    key = (sizes, key_sizes, window_nside, mode, rank, str(device))
    plan = _plans.get(key)
    if plan is None:
        plan = plan_local_attention(sizes, window_nside, mode, rank, key_sizes).to(device)
        if len(_plans) >= _MAX_PLANS:
            _plans.popitem(last=False)
        _plans[key] = plan
    _plans.move_to_end(key)
    return plan
