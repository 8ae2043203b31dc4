"""The cell blocks of one local-attention call (Note [local attention plan] in
:mod:`hpattn_dist.local.plan`): a side's cells read from this rank's rows and its edge buffer
(:class:`Cells`), per-cell results and gradient accumulators (:class:`Blocks`), and the buffers a
call's window groups reuse (:class:`Scratch`).

Legend as in :mod:`hpattn_dist.local.execute`: B batch, H heads, F a row's trailing size, S0 the
rows of one side (B * H, or B * Hb for a bias), N_r this rank's rows, c pixels per cell, E edge
cells, z 1 with a zero block; A x C x Y the cells of a window group's refs.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from hpattn_dist.local.plan import CellRefs, CellStore

__all__ = ["Blocks", "Cells", "Scratch"]


class Cells:
    """One side's cell blocks for one call: own rows ``[S0, N_r, F]`` (contiguous, read in place
    through an overlapping row view) and the edge buffer ``[S0, E (+1), c, F]``; ``bh_rows [B * H]``
    maps a batch-head pair to its source row (a bias of one head serves every head)."""

    def __init__(self, store: CellStore, own: Tensor, edge: Tensor, bh_rows: Tensor) -> None:
        self.store, self.own, self.edge, self.bh_rows = store, own, edge, bh_rows
        self.c, self.f = store.cell_pixels, own.shape[-1]

    def gather(self, refs: CellRefs, scratch: Optional["Scratch"] = None) -> Tensor:
        """The blocks of ``refs [A, C, *Y]`` as ``[A, C, B * H, *Y, c, F]`` (a copy; into
        ``scratch``'s buffer for this side when given)."""
        s, r = self.store, refs.refs
        shape = (*r.shape[:2], self.bh_rows.numel(), *r.shape[2:], self.c, self.f)
        out = None if scratch is None else scratch.take(id(self), (math.prod(shape[:-2]), self.c * self.f), self.own)
        flat_edge = self.edge.reshape(-1, self.c * self.f)
        if s.n_own == 0:
            rows = self.bh_rows.view(1, 1, -1, *([1] * (r.dim() - 2))) * self.edge.shape[1] + (r.unsqueeze(2) - s.n_own)
            return _select(flat_edge, rows.reshape(-1), out).view(shape)
        bh = self.bh_rows.view(1, 1, -1, *([1] * (r.dim() - 2)))
        own_rows = torch.where(r < s.n_own, r, 0).unsqueeze(2) * self.c + (bh * s.n_local + s.lead)
        n = self.own.numel() // self.f
        view = self.own.as_strided((n - self.c + 1, self.c * self.f), (self.f, 1))  # a block at every row
        out = _select(view, own_rows.reshape(-1), out)
        if refs.edge_pos.numel():
            pos, bh_e, cells = _expanded(refs, self.bh_rows.numel())
            rows = self.bh_rows.index_select(0, bh_e) * self.edge.shape[1] + cells - s.n_own
            out.index_copy_(0, pos, flat_edge.index_select(0, rows))
        return out.view(shape)

    def view(self, first: int, count: int) -> Tensor:
        """Own cells ``first .. first + count - 1`` in place, ``[B * H, count, c, F]``."""
        start = self.store.lead + first * self.c
        return self.own.narrow(1, start, count * self.c).view(self.own.shape[0], count, self.c, self.f)


def _select(rows: Tensor, index: Tensor, out: Optional[Tensor]) -> Tensor:
    return rows.index_select(0, index) if out is None else torch.index_select(rows, 0, index, out=out)


class Scratch:
    """One call's per-group buffers (gathered blocks, one per cell store side; a square group's
    gradient grids and dq), reused by its window groups (a group's buffers are dead before the
    next group takes them): a group's blocks do not come from a fresh allocation, whose pages the
    system would zero again for every group."""

    def __init__(self) -> None:
        self.buffers: dict[object, Tensor] = {}

    def take(self, key: object, shape: tuple[int, ...], like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        """A buffer ``shape`` (uninitialised) of ``dtype`` (``like``'s by default), on ``like``'s device."""
        n, dtype = math.prod(shape), dtype or like.dtype
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self.buffers[key] = like.new_empty((n,), dtype=dtype)
        return buf[:n].view(shape)


def _expanded(refs: CellRefs, n_bh: int) -> tuple[Tensor, Tensor, Tensor]:
    """The edge entries of ``refs [A, C, *Y]`` in the ``[A, C, B * H, *Y]`` layout, for every
    batch-head pair: ``(flat positions, batch-head pairs, refs)``, each ``[n * B * H]``."""
    r = refs.refs
    y = math.prod(r.shape[2:])
    p = refs.edge_pos.view(-1, 1)
    bh = torch.arange(n_bh, device=p.device).view(1, -1)
    pos = ((p // y) * n_bh + bh) * y + p % y
    cells = r.reshape(-1).index_select(0, refs.edge_pos).view(-1, 1).expand(-1, n_bh)
    return pos.reshape(-1), bh.expand_as(pos).reshape(-1), cells.reshape(-1)


class Blocks:
    """One side's per-cell results or gradient accumulators: own cells ``[S0 * n_own + 1, c * F]``
    (aligned rows; the last row takes what belongs to edge cells) and edge cells ``[S0 * (E + z),
    c * F]``; ``bh_rows [B * H]`` maps a batch-head pair to its row (gradients of a one-head bias
    add up over the heads)."""

    def __init__(self, store: CellStore, rows: int, f: int, bh_rows: Tensor, dtype: torch.dtype,
                 device: torch.device, written_once: bool = False) -> None:
        self.store, self.s0, self.f, self.bh_rows = store, rows, f, bh_rows
        self.c = store.cell_pixels
        self.n_edge = store.n_edge + int(store.zero_cell)
        # Results every cell writes once (``put``) need no zeros; accumulators do.
        alloc = torch.empty if written_once else torch.zeros
        self.own = alloc((rows * store.n_own + 1, self.c * f), dtype=dtype, device=device)
        self.edge = torch.zeros((rows * self.n_edge, self.c * f), dtype=dtype, device=device)

    def _targets(self, refs: CellRefs, values: Tensor) -> tuple[Tensor, Tensor, Optional[tuple[Tensor, Tensor]]]:
        """``(own row of every block, the blocks [n, c * F], (positions, edge rows) of the edge blocks)``."""
        r, n_own = refs.refs, self.store.n_own
        bh = self.bh_rows.view(1, 1, -1, *([1] * (r.dim() - 2)))
        rows = values.reshape(-1, self.c * self.f).to(self.own.dtype)
        own = torch.where(r.unsqueeze(2) < n_own, bh * n_own + r.unsqueeze(2), self.own.shape[0] - 1)
        edge = None
        if refs.edge_pos.numel():
            pos, bh_e, cells = _expanded(refs, self.bh_rows.numel())
            edge = (pos, self.bh_rows.index_select(0, bh_e) * self.n_edge + cells - n_own)
        return own.expand(values.shape[:-2]).reshape(-1), rows, edge

    def add(self, refs: CellRefs, values: Tensor) -> None:
        """Add blocks ``values [A, C, B * H, *Y, c, F]`` at ``refs [A, C, *Y]``."""
        own, rows, edge = self._targets(refs, values)
        self.own.index_add_(0, own, rows)
        if edge is not None:
            self.edge.index_add_(0, edge[1], rows.index_select(0, edge[0]))

    def put(self, refs: CellRefs, values: Tensor) -> None:
        """Write blocks ``values [A, C, B * H, *Y, c, F]`` at ``refs [A, C, *Y]`` (overwriting)."""
        own, rows, edge = self._targets(refs, values)
        self.own.index_copy_(0, own, rows)
        if edge is not None:
            self.edge.index_copy_(0, edge[1], rows.index_select(0, edge[0]))

    def rows(self, n_rows: int) -> tuple[Tensor, Tensor]:
        """``(own rows [S0, N_r, F], edge rows [S0, (E + z) * c, F])``; the own rows are a view of
        the accumulator when the own cells cover the rank's rows exactly."""
        s = self.store
        own = self.own[:-1].view(self.s0, s.n_own * self.c, self.f)
        if s.lead != 0 or s.n_own * self.c != n_rows:
            full = own.new_zeros((self.s0, n_rows, self.f))
            full.narrow(1, s.lead, s.n_own * self.c).copy_(own)
            own = full
        return own, self.edge.view(self.s0, -1, self.f)
