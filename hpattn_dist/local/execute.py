"""Running one rank's local-attention plan: the halo, the cell stores, the window groups' kernel calls.

Legend: B batch, H heads, Hb key-bias heads (1 or H), D head dim, F a row's trailing size (D for
q/k/v, 1 for a bias or an lse), Nq_r / Nk_r this rank's queries / keys, c_q / c_k pixels per cell,
E edge cells, R halo rows received, S rows sent, and for a window group (Note [local attention
plan] in :mod:`hpattn_dist.local.plan`) A x C x Y windows (squares: x, square, y; a list: 1, 1, Y),
L keys per window in one call, X = A * C * B * H.

:func:`forward` and :func:`backward` are the executor; the door (the agreement, the plan) is
:mod:`hpattn_dist.local.attention`, the registered op :mod:`hpattn_dist.local.ops`.

Note [local attention memory]
    What a rank holds, in units of one ``[B, H, N_r, D]`` tensor (fp32/fp64; a bf16/fp16 run holds
    its gradient accumulators in fp32, twice its units), with g a window group's share of the
    rank's units (at most 1/4: squares are cut to fit, Note [local attention plan]), b the padded
    border of its squares (``(s + 2)**2 / s**2``: 2.25 for squares of 4 x 4 cells), m the key
    cells of a listed window, e the edge cells (the halo, the cells split with a neighbour rank,
    the zero block) and s, r the halo rows sent and received, each per ``N_r``:

    * saved for the backward: q, k, v as given (nothing is copied for saving), out, lse and the
      edge cells' K/V (2e), so the backward sends only gradients.
    * forward: the output (1) and the edge cells' K/V (2e); while a group of squares runs, its
      queries (g), its padded K/V (2gb), the kernel's output and the merge accumulator (2g):
      ``1 + 2e + g (3 + 2b)``; a list: ``1 + 2e + g (2 + 2m)``; while the halo travels, the two
      row buffers (``2s + 2r``).
    * backward: dq, dk, dv (3), the saved edge cells (2e) and their gradients (2e); while a group
      of squares runs, its gathered q, dout, out (3g), padded K/V and their gradient grids (4gb),
      dq (2g: the kernel's and the sum) and the kernel's dk, dv of one call (6g: three cells per
      window): ``3 + 4e + g (11 + 4b)``; a list: ``3 + 4e + g (4 + 4m)``; while the gradients
      travel: ``3 + 2e + 2r + 2s``. On the CPU a square group's fused kernel runs a cache-sized
      piece of the group at a time (Note [cache-sized calls]), so the kernel's dq, dk, dv are a
      piece's; the count keeps the whole call's (what a GPU kernel holds), a bound there.

    A list that reads q, k, v in place over the whole rank (``mode="cell"`` on cell-aligned shards,
    P = 1 in particular) gathers nothing and its kernel's outputs are the results: forward 1,
    backward 3. Neighbourhood windows at P = 1 on faces of 4 x 4 cells: forward 2.9, backward 8.0;
    the global ring's backward holds 6 at P = 1 and 15 to 17 at P >= 2 (Note [ring memory]).
    These sums are ONE function, ``hpattn_dist.cost_model.memory.local_attention_units`` of the
    plan's :meth:`~hpattn_dist.local.plan.LocalPlan.geometry`, which
    ``tests/distributed/test_memory.py`` holds to the live bytes (inside the registered ops too)
    and the cost model's layer schedule reads (``local_layer_memory``, held to the allocator's
    peak by ``tests/distributed/test_cost_model.py``): a change here changes it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from hpattn_dist.comm.groups import GroupInfo
from hpattn_dist.comm.halo import all_to_all_rows
from hpattn_dist.kernels import BlockKernel
from hpattn_dist.kernels.dropout import DropoutSpec, FoldedIndex
from hpattn_dist.local.cell_blocks import Blocks, Cells, Scratch
from hpattn_dist.local.plan import CellStore, LocalPlan, WindowGroup
from hpattn_dist.masks import known_finite, nonfinite_rows
from hpattn_dist.merge import merge_into
from hpattn_dist.precision import acc_dtype

__all__ = ["forward", "backward"]


# --------------------------------------------------------------------------------------------
# The halo and the edge buffers
# --------------------------------------------------------------------------------------------


Layout = list[Optional[tuple[tuple[int, ...], torch.dtype]]]


def _row_views(buf: Tensor, layout: Layout) -> list[Optional[Tensor]]:
    """Typed views ``[rows, *shape]`` of the parts of a uint8 row buffer ``[rows, W]`` (parts in
    :func:`_row_width`'s order: each at an offset its element size divides)."""
    out, col = [], 0
    for part in layout:
        if part is None:
            out.append(None)
            continue
        shape, dtype = part
        width = math.prod(shape) * dtype.itemsize
        if width:
            out.append(buf[:, col:col + width].view(dtype).view(buf.shape[0], *shape))
        else:  # rows of no bytes (B = 0): a byte view cannot be reinterpreted, nothing to read
            out.append(buf.new_empty((buf.shape[0], *shape), dtype=dtype))
        col += width
    return out


def _row_width(layout: Layout) -> int:
    """Bytes per row: the parts in descending element size, padded to a multiple of the first's."""
    parts = [p for p in layout if p is not None]
    sizes = [dtype.itemsize for _, dtype in parts]
    if sizes != sorted(sizes, reverse=True):
        raise ValueError("row parts must come in descending element size")
    return -(-sum(math.prod(shape) * dtype.itemsize for shape, dtype in parts) // sizes[0]) * sizes[0]


def _exchange(layout: Layout, fill, plan: LocalPlan, info: GroupInfo, direction: str,
              reverse: bool = False) -> list[Optional[Tensor]]:
    """ONE all_to_all of rows of several tensors (K/V and a bias: one uint8 buffer, so a bf16 K/V
    keeps its fp32 bias). ``fill(views)`` writes this rank's outgoing rows into views of the send
    buffer (``[S, ...]`` forward, ``[R, ...]`` when ``reverse``); returns views of the received
    rows (``[R, ...]``, resp. ``[S, ...]``), no copy."""
    halo = plan.halo
    counts = (halo.recv_counts, halo.send_counts) if reverse else (halo.send_counts, halo.recv_counts)
    width = _row_width(layout)
    send = torch.empty((sum(counts[0]), width), dtype=torch.uint8, device=halo.send_indices.device)
    fill(_row_views(send, layout))
    label = f"{'cross' if plan.cross else 'local'}.halo.{direction}"
    recv = all_to_all_rows(send, counts[0], counts[1], info, label)
    del send
    return _row_views(recv, layout)


def _edge_buffer(store: CellStore, own: Tensor, received: Optional[Tensor], fill: float) -> Tensor:
    """``[S0, E (+1), c, F]``: the edge cells from own rows ``[S0, N_r, F]`` and received rows
    ``[R, S0, F]``; rows no rank sends are 0, the zero block (if any) is ``fill``."""
    s0, f = own.shape[0], own.shape[-1]
    cells = store.n_edge + int(store.zero_cell)
    edge = own.new_zeros((s0, cells * store.cell_pixels, f))
    if store.zero_cell and fill != 0:
        edge[:, store.n_edge * store.cell_pixels:] = fill
    own_pos, own_rows, recv_pos, recv_rows = store.own_pos, store.own_rows, store.recv_pos, store.recv_rows
    if own_pos.numel():
        edge.index_copy_(1, own_pos, own.index_select(1, own_rows))
    if recv_pos.numel() and received is not None:
        edge.index_copy_(1, recv_pos, received.index_select(0, recv_rows).transpose(0, 1))
    return edge.view(s0, cells, store.cell_pixels, f)


def _rows3(t: Tensor) -> Tensor:
    """``[B, H, N, F]`` (or ``[B, Hb, N]``) as contiguous rows ``[B * H, N, F]``."""
    if t.dim() == 3:
        t = t.unsqueeze(-1)
    return t.reshape(t.shape[0] * t.shape[1], t.shape[2], t.shape[3]).contiguous()


def _bias_rows(batch: int, heads: int, bias_heads: int, device: torch.device) -> Tensor:
    """Source row of each batch-head pair in a ``[B * Hb, ...]`` bias."""
    bh = torch.arange(batch * heads, device=device)
    return bh if bias_heads == heads else bh // heads


# --------------------------------------------------------------------------------------------
# One window group's kernel calls
# --------------------------------------------------------------------------------------------


def _pixels(cells: Tensor, c: int) -> Tensor:
    """Global pixels ``[*, c]`` of ``cells`` (-1, a zero block: pixel 0)."""
    return cells.clamp(min=0)[..., None] * c + torch.arange(c, device=cells.device)


def _span(grid: Tensor, dx: int, group: WindowGroup) -> Tensor:
    """The keys of column ``dx`` of every window of a square group: ``grid [A + 2, C, S0, Y + 2,
    c, F]`` -> ``[A * C * S0, Y, 3 * c, F]``, three cells adjacent in y (an overlapping view)."""
    a = group.q_cells.shape[0]
    part = grid[1 + dx:1 + dx + a]
    part = part.reshape(-1, *part.shape[3:])  # [A * C * S0, Y + 2, c, F]
    y, c, f = group.q_cells.shape[2], part.shape[2], part.shape[3]
    return part.as_strided((part.shape[0], y, 3 * c, f), (part.stride(0), c * f, f, 1))


def _span_index(pixels: Tensor, dx: int, group: WindowGroup) -> Tensor:
    """:func:`_span` of the key pixels ``[A + 2, C, Y + 2, c]`` -> ``[A * C, Y, 3 * c]``."""
    a, y = group.q_cells.shape[0], group.q_cells.shape[2]
    part = pixels[1 + dx:1 + dx + a].reshape(-1, *pixels.shape[2:])
    c = part.shape[2]
    return part.as_strided((part.shape[0], y, 3 * c), (part.stride(0), c, 1))


def _dropout(dropout_p: float, seed: int, heads: int, q_index: Tensor, k_index: Tensor) -> Optional[DropoutSpec]:
    if dropout_p <= 0:
        return None
    return DropoutSpec(dropout_p, seed, folded=FoldedIndex(heads, q_index, k_index))


class _Call:
    """The tensors of one call's keys: ``(k, v, bias, dropout spec)`` per column offset."""

    def __init__(self, group: WindowGroup, kv: list[Cells], bias: Optional[Cells], plan: LocalPlan,
                 dropout_p: float, seed: int, heads: int, key_flags: Optional[Cells] = None,
                 scratch: Optional[Scratch] = None) -> None:
        self.group, self.plan, self.kv = group, plan, kv
        c_q, c_k = plan.cell_pixels, plan.key_cell_pixels
        a, cc, y = group.q_cells.shape
        q_index = _pixels(group.q_cells, c_q).reshape(a * cc, y, c_q) if dropout_p > 0 else None
        self.dropout_p, self.seed, self.heads, self.q_index = dropout_p, seed, heads, q_index
        if group.pad:
            self.k, self.v = (side.gather(group.k_refs, scratch) for side in kv)  # [A + 2, C, BH, Y + 2, c_k, D]
            self.bias = None if bias is None else bias.gather(group.k_refs, scratch)
            self.flags = None if key_flags is None else key_flags.gather(group.k_refs, scratch)
            self.k_pixels = _pixels(group.k_cells, c_k) if dropout_p > 0 else None
            self.offsets = (-1, 0, 1)
        else:
            m = group.k_cells.shape[1]
            sides = kv + ([] if key_flags is None else [key_flags])
            if group.k_view >= 0:
                read = [side.view(group.k_view, y) for side in sides]  # [BH, Y, c_k, D]
            else:
                read = [side.gather(group.k_refs, scratch).reshape(-1, y, m * c_k, side.f) for side in sides]
            self.k, self.v = read[:2]
            self.flags = None if key_flags is None else read[2].squeeze(-1)
            self.bias = None
            if bias is not None:
                self.bias = bias.gather(group.k_refs, scratch).reshape(-1, y, m * c_k)
            self.k_pixels = _pixels(group.k_cells, c_k).reshape(1, y, m * c_k) if dropout_p > 0 else None
            self.offsets = (0,)

    def key_flags(self, dx: int) -> Optional[Tensor]:
        """Bool ``[X, Y, L]``: the keys of column ``dx`` whose k or v is not finite, read like the
        keys (None: the call's inputs are known finite)."""
        if self.flags is None or not self.group.pad:
            return self.flags
        return _span(self.flags, dx, self.group).squeeze(-1)

    def keys(self, dx: int) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[DropoutSpec]]:
        group = self.group
        if not group.pad:
            spec = None if self.q_index is None else _dropout(self.dropout_p, self.seed, self.heads,
                                                              self.q_index, self.k_pixels)
            return self.k, self.v, self.bias, spec
        bias = None if self.bias is None else _span(self.bias, dx, group).squeeze(-1)
        spec = None if self.q_index is None else _dropout(
            self.dropout_p, self.seed, self.heads, self.q_index, _span_index(self.k_pixels, dx, group))
        return _span(self.k, dx, group), _span(self.v, dx, group), bias, spec


def _column_fixes(plan: LocalPlan, queries: Cells, kv: list[Cells], heads: int, kernel: BlockKernel,
                  scale: float, dropout_p: float, seed: int, flags: Optional[tuple[Cells, Cells]]
                  ) -> dict[int, tuple[Tensor, Tensor]]:
    """Per column offset, that column of every window reading a zero block there, from its two
    cells (Note [local attention plan]): ``(out [n, B * H, c_q, D], lse [n, B * H, c_q])``."""
    c_q, c_k, d = plan.cell_pixels, plan.key_cell_pixels, queries.f
    out = {}
    for fix in plan.fixes:
        n = fix.q_cells.numel()
        q_f = queries.gather(fix.q_refs).reshape(-1, 1, c_q, d)  # [B * H * n, 1, c_q, D]
        k_f, v_f = (side.gather(fix.k_refs).reshape(-1, 1, 2 * c_k, d) for side in kv)
        spec = _dropout(dropout_p, seed, heads, _pixels(fix.q_cells, c_q).view(1, n, c_q),
                        _pixels(fix.k_cells, c_k).view(1, n, 2 * c_k))
        q_bad = key_bad = None
        if flags is not None:
            q_bad = flags[0].gather(fix.q_refs).reshape(-1, 1, c_q)
            key_bad = flags[1].gather(fix.k_refs).reshape(-1, 1, 2 * c_k)
        o_f, l_f = kernel.forward(q_f, k_f, v_f, scale, None, spec, nan_rows=q_bad, key_bad=key_bad,
                                  finite=flags is None)
        out[fix.dx] = o_f.view(-1, n, c_q, d).transpose(0, 1), l_f.view(-1, n, c_q).transpose(0, 1)
    return out


def _apply_fixes(group: WindowGroup, dx: int, fixed: dict[int, tuple[Tensor, Tensor]], o: Tensor,
                 lse: Tensor) -> None:
    """Write the fixed column ``dx`` of a square group's windows into the call's ``o [X, Y, c_q, D]``
    and ``lse [X, Y, c_q]``."""
    a, cc, y = group.q_cells.shape
    for fix_dx, windows, first in group.fixes:
        if fix_dx != dx:
            continue
        o_f, l_f = (t[first:first + windows.numel()] for t in fixed[dx])
        at = (windows // (cc * y), windows // y % cc, windows % y)  # (x, square, y) of each window
        o.view(a, cc, -1, y, *o.shape[2:])[at[0], at[1], :, at[2]] = o_f.to(o.dtype)
        lse.view(a, cc, -1, y, lse.shape[2])[at[0], at[1], :, at[2]] = l_f.to(lse.dtype)


def _queries(group: WindowGroup, cells: Cells, scratch: Optional[Scratch] = None) -> Tensor:
    """``[X, Y, c_q, F]`` of a group's queries (in place for a list read in place)."""
    if group.q_view >= 0:
        return cells.view(group.q_view, group.q_cells.shape[2])
    g = cells.gather(group.q_refs, scratch)  # [A, C, BH, Y, c, F]
    return g.view(-1, *g.shape[3:])


# --------------------------------------------------------------------------------------------
# Forward and backward
# --------------------------------------------------------------------------------------------


def _in_place_only(plan: LocalPlan) -> bool:
    """One list group reads every query and key cell of the rank in place, in order: its kernel
    outputs are the results (``mode="cell"`` on cell-aligned shards, P = 1 in particular)."""
    if len(plan.groups) != 1:
        return False
    g, qs, ks = plan.groups[0], plan.queries, plan.keys
    return (not g.pad and g.q_view == 0 and g.k_view == 0 and qs.n_edge == 0 and ks.n_edge == 0
            and not ks.zero_cell and qs.lead == 0 and ks.lead == 0 and qs.n_own * qs.cell_pixels == qs.n_local
            and ks.n_own * ks.cell_pixels == ks.n_local and g.q_cells.shape[2] == qs.n_own == ks.n_own)


def _rows_from_edge(store: CellStore, own: Tensor, edge: Tensor, add: bool = False) -> None:
    """Copy (``add``: add) the edge cells' rows that are this rank's own rows into ``own [S0, N_r, F]``."""
    own_pos, own_rows = store.own_pos, store.own_rows
    if own_pos.numel():
        part = edge.index_select(1, own_pos)
        if add:
            own.index_add_(1, own_rows, part.to(own.dtype))
        else:
            own.index_copy_(1, own_rows, part.to(own.dtype))


def _bound(plan: LocalPlan, q3: Tensor, k3: Tensor, v3: Tensor, b3: Optional[Tensor], edge_k: Tensor,
           edge_v: Tensor, edge_b: Optional[Tensor], batch: int, heads: int
           ) -> tuple[Cells, list[Cells], Optional[Cells]]:
    bh = torch.arange(batch * heads, device=q3.device)
    queries = Cells(plan.queries, q3, _edge_buffer(plan.queries, q3, None, 0.0), bh)
    kv = [Cells(plan.keys, k3, edge_k, bh), Cells(plan.keys, v3, edge_v, bh)]
    bias = None
    if b3 is not None:
        bias = Cells(plan.keys, b3, edge_b, _bias_rows(batch, heads, b3.shape[0] // max(batch, 1), q3.device))
    return queries, kv, bias


def forward(plan: LocalPlan, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], info: GroupInfo,
            kernel: BlockKernel, scale: float, dropout_p: float, seed: int
            ) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Local attention of this rank's queries (Note [local attention plan]).

    Args:
        q: ``[B, H, Nq_r, D]``; k, v: ``[B, H, Nk_r, D]``; bias: ``[B, Hb, Nk_r]`` in the
            accumulation dtype (-inf = masked) or None.

    Returns:
        ``(out [B, H, Nq_r, D] q.dtype, lse [B, H, Nq_r] acc, edge_kv [2, B * H, (E + z) * c_k,
        D], edge_bias [B * Hb, (E + z) * c_k] or None)``: the edge buffers are what the backward
        reads besides the inputs (no second exchange).
    """
    batch, heads, n_q, d = q.shape
    acc = acc_dtype(q.dtype)
    if batch == 0:  # B is agreed: no rank has a row to send, nothing to compute
        edge = (plan.keys.n_edge + int(plan.keys.zero_cell)) * plan.key_cell_pixels
        return (q.new_empty(q.shape), q.new_empty((0, heads, n_q), dtype=acc), q.new_empty((2, 0, edge, d)),
                None if bias is None else bias.new_empty((0, edge)))
    q3, k3, v3 = _rows3(q), _rows3(k), _rows3(v)
    b3 = None if bias is None else _rows3(bias)
    kv_recv = b_recv = None
    if plan.halo.total_rows:
        send = plan.halo.send_indices

        # rows [S, 2, B * H, D] and [S, B * Hb, 1]; the larger element first (Note: _row_width)
        bias_first = b3 is not None and b3.dtype.itemsize > q.dtype.itemsize
        layout = [((2, batch * heads, d), q.dtype), None if b3 is None else ((b3.shape[0], 1), b3.dtype)]
        order = [1, 0] if bias_first else [0, 1]

        def fill(views: list[Optional[Tensor]]) -> None:
            kv_rows, b_rows = (views[i] for i in order)
            kv_rows[:, 0] = k3.transpose(0, 1).index_select(0, send)
            kv_rows[:, 1] = v3.transpose(0, 1).index_select(0, send)
            if b3 is not None:
                b_rows[:] = b3.transpose(0, 1).index_select(0, send)

        received = _exchange([layout[i] for i in order], fill, plan, info, "forward")
        kv_recv, b_recv = (received[i] for i in order)  # [R, 2, BH, D], [R, B * Hb, 1]
        del received
    edge_k = _edge_buffer(plan.keys, k3, None if kv_recv is None else kv_recv[:, 0], 0.0)
    edge_v = _edge_buffer(plan.keys, v3, None if kv_recv is None else kv_recv[:, 1], 0.0)
    edge_b = None if b3 is None else _edge_buffer(plan.keys, b3, b_recv, float("-inf"))
    del kv_recv, b_recv
    queries, kv, bias_cells = _bound(plan, q3, k3, v3, b3, edge_k, edge_v, edge_b, batch, heads)
    flags = _flags(plan, q3, k3, v3, b3, edge_k, edge_v, edge_b, queries.bh_rows)
    fixed = {} if bias_cells is not None else _column_fixes(plan, queries, kv, heads, kernel, scale, dropout_p,
                                                             seed, flags)
    if _in_place_only(plan):
        o, l = _group_forward(plan, plan.groups[0], queries, kv, bias_cells, heads, kernel, scale, dropout_p,
                              seed, acc, fixed, flags)
        out, lse = o.to(q.dtype).reshape(q3.shape), l.reshape(q3.shape[:2])
    else:
        out_b = Blocks(plan.queries, q3.shape[0], d, queries.bh_rows, q.dtype, q.device, written_once=True)
        lse_b = Blocks(plan.queries, q3.shape[0], 1, queries.bh_rows, acc, q.device, written_once=True)
        scratch = Scratch()
        for group in plan.groups:
            o, l = _group_forward(plan, group, queries, kv, bias_cells, heads, kernel, scale, dropout_p, seed, acc,
                                  fixed, flags, scratch)
            a, cc, y = group.q_cells.shape
            out_b.put(group.q_refs, o.to(q.dtype).view(a, cc, -1, y, plan.cell_pixels, d))
            lse_b.put(group.q_refs, l.reshape(a, cc, -1, y, plan.cell_pixels, 1))
            del o, l
        del scratch
        out, out_edge = out_b.rows(n_q)
        lse, lse_edge = lse_b.rows(n_q)
        _rows_from_edge(plan.queries, out, out_edge)
        _rows_from_edge(plan.queries, lse, lse_edge)
        lse = lse.squeeze(-1)
    edge_kv = torch.stack((edge_k, edge_v)).view(2, batch * heads, -1, d)
    edge_bias = None if edge_b is None else edge_b.reshape(edge_b.shape[0], edge_b.shape[1] * edge_b.shape[2])
    return out.view(batch, heads, n_q, d), lse.view(batch, heads, n_q), edge_kv, edge_bias


def _fold(tensors: list[Optional[Tensor]]) -> Optional[list[Optional[Tensor]]]:
    """``[X, Y, n, F]`` (a bias ``[X, Y, n]``) blocks as ``[X * Y, 1, n, F]`` views, or None when
    one of them does not fold (views of a part of the rank's rows, overlapping spans). The fused
    CPU kernels write their outputs ``[B, N, H, D]``-major: with ``H = 1`` those are contiguous."""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        try:
            out.append(t.view(t.shape[0] * t.shape[1], 1, *t.shape[2:]))
        except RuntimeError:  # X and Y do not merge in this tensor's strides
            return None
    return out


def _flags(plan: LocalPlan, q3: Tensor, k3: Tensor, v3: Tensor, b3: Optional[Tensor], edge_k: Tensor,
           edge_v: Tensor, edge_b: Optional[Tensor], bh_rows: Tensor) -> Optional[tuple[Cells, Cells]]:
    """The call's non-finite flags as cell stores ``(queries, keys)`` of bool rows ``[B * H, N, 1]``
    (a query holding a NaN or an infinity; a key whose k or v does), found ONCE per call and read
    like the queries and keys, so that no kernel call scans its (overlapping) key blocks; None
    when the inputs are known finite (Note [known finite inputs] in ``masks.py``)."""
    if known_finite(q3, k3, v3, edge_k, edge_v, biases=(b3, edge_b)):
        return None
    q_bad = nonfinite_rows(q3).unsqueeze(-1)
    k_bad = (nonfinite_rows(k3) | nonfinite_rows(v3)).unsqueeze(-1)
    edge_bad = (nonfinite_rows(edge_k) | nonfinite_rows(edge_v)).unsqueeze(-1)  # the edge cells' rows
    return (Cells(plan.queries, q_bad, _edge_buffer(plan.queries, q_bad, None, 0.0), bh_rows),
            Cells(plan.keys, k_bad, edge_bad, bh_rows))


def _group_forward(plan, group, queries, kv, bias, heads, kernel, scale, dropout_p, seed, acc, fixed, flags,
                   scratch=None):
    """``(out [X, Y, c_q, D], lse [X, Y, c_q])`` of one group: its calls, merged."""
    qg = _queries(group, queries, scratch)
    nan_rows = None if flags is None else _queries(group, flags[0], scratch).squeeze(-1)  # [X, Y, c_q]
    call = _Call(group, kv, bias, plan, dropout_p, seed, heads, None if flags is None else flags[1], scratch)
    o = l = None
    for dx in call.offsets:
        k_c, v_c, b_c, spec = call.keys(dx)
        key_bad = call.key_flags(dx)  # [X, Y, L]
        folded = _fold([qg, k_c, v_c, b_c, nan_rows, key_bad])
        if folded is None:
            o_c, l_c = kernel.forward(qg, k_c, v_c, scale, b_c, spec, nan_rows=nan_rows, key_bad=key_bad,
                                      finite=flags is None)
        else:
            o_c, l_c = kernel.forward(*folded[:3], scale, folded[3], spec, nan_rows=folded[4],
                                      key_bad=folded[5], finite=flags is None)
            o_c, l_c = o_c.view(qg.shape[:3] + o_c.shape[3:]), l_c.view(qg.shape[:3])
        if bias is None:  # with a bias the zero blocks are masked
            _apply_fixes(group, dx, fixed, o_c, l_c)
        if o is None:
            o, l = (o_c, l_c) if len(call.offsets) == 1 else (o_c.to(acc), l_c.to(acc))
        else:
            merge_into(o, l, o_c, l_c)
        del o_c, l_c
    return o, l


def backward(plan: LocalPlan, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
             out: Tensor, lse: Tensor, edge_kv: Tensor, edge_bias: Optional[Tensor], info: GroupInfo,
             kernel: BlockKernel, scale: float, dropout_p: float, seed: int, need_dbias: bool
             ) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Gradients ``(dq, dk, dv, dbias)`` from :func:`forward`'s outputs (no forward recomputed:
    each call uses the final ``out`` and ``lse``); the halo rows' gradients go home in one
    all_to_all. ``dbias`` ``[B, Hb, Nk_r]`` in the accumulation dtype when ``need_dbias``."""
    batch, heads, n_q, d = q.shape
    n_k = k.shape[2]
    acc = acc_dtype(q.dtype)
    if batch == 0:  # as in the forward: no exchange
        return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
                None if not need_dbias else bias.new_empty(bias.shape, dtype=acc))
    q3, k3, v3, do3, o3 = (_rows3(t) for t in (q, k, v, dout, out))
    b3 = None if bias is None else _rows3(bias)
    c_k = plan.key_cell_pixels
    cells_k = plan.keys.n_edge + int(plan.keys.zero_cell)
    edge_k, edge_v = (t.view(batch * heads, cells_k, c_k, d) for t in edge_kv.unbind(0))
    edge_b = None if edge_bias is None else edge_bias.view(b3.shape[0], cells_k, c_k, 1)
    queries, kv, bias_cells = _bound(plan, q3, k3, v3, b3, edge_k, edge_v, edge_b, batch, heads)
    douts = Cells(plan.queries, do3, _edge_buffer(plan.queries, do3, None, 0.0), queries.bh_rows)
    outs = Cells(plan.queries, o3, _edge_buffer(plan.queries, o3, None, 0.0), queries.bh_rows)
    l3 = lse.reshape(batch * heads, n_q, 1).contiguous()
    lses = Cells(plan.queries, l3, _edge_buffer(plan.queries, l3, None, 0.0), queries.bh_rows)
    sides = (queries, douts, outs, lses)

    if _in_place_only(plan):
        dq, dk, dv, db = _group_backward(plan, plan.groups[0], sides, kv, bias_cells, heads, kernel, scale,
                                         dropout_p, seed, need_dbias, acc)
        dq = dq.reshape(batch * heads, n_q, d)
        grads = [(t.reshape(t.shape[2], n_k, t.shape[-1]).to(acc), None) for t in (dk, dv, db) if t is not None]
        if need_dbias and b3.shape[0] != batch * heads:  # a one-head bias: its gradient adds up over heads
            grads[2] = (grads[2][0].view(batch, heads, n_k, 1).sum(1), None)
    else:
        dq_b = Blocks(plan.queries, batch * heads, d, queries.bh_rows, acc, q.device, written_once=True)
        dk_b, dv_b = (Blocks(plan.keys, batch * heads, d, queries.bh_rows, acc, q.device) for _ in range(2))
        db_b = None
        if need_dbias:
            db_b = Blocks(plan.keys, b3.shape[0], 1, bias_cells.bh_rows, acc, q.device)
        scratch = Scratch()
        for group in plan.groups:  # Note [local attention plan]: the zero blocks add nothing to dQ
            dq, dk, dv, db = _group_backward(plan, group, sides, kv, bias_cells, heads, kernel, scale, dropout_p,
                                             seed, need_dbias, acc, scratch)
            a, cc, y = group.q_cells.shape
            dq_b.put(group.q_refs, dq.view(a, cc, -1, y, plan.cell_pixels, d))
            dk_b.add(group.k_refs, dk)
            dv_b.add(group.k_refs, dv)
            if db_b is not None:
                db_b.add(group.k_refs, db)
            del dq, dk, dv, db
        del scratch
        dq, dq_edge = dq_b.rows(n_q)
        _rows_from_edge(plan.queries, dq, dq_edge)
        grads = [dk_b.rows(n_k), dv_b.rows(n_k)] + ([db_b.rows(n_k)] if db_b is not None else [])
        del dq_b, dk_b, dv_b, db_b  # the edge accumulators live on in `grads` only until they are sent
        for own, edge in grads:
            _rows_from_edge(plan.keys, own, edge, add=True)
    if plan.halo.total_rows:  # every rank takes part, also one that received nothing
        recv_pos, recv_rows = plan.keys.recv_pos, plan.keys.recv_rows
        edges = [edge for _, edge in grads]
        grads = [own for own, _ in grads]

        def fill(views: list[Optional[Tensor]]) -> None:  # the received rows' gradients, [R, ...]
            parts = [views[0][:, 0], views[0][:, 1]] + ([views[1]] if len(edges) > 2 else [])
            for part, edge in zip(parts, edges):
                part.zero_()
                if edge is not None and recv_pos.numel():
                    part.index_copy_(0, recv_rows, edge.index_select(1, recv_pos).transpose(0, 1))
            edges.clear()  # the edge cells' gradients are not needed any more

        layout = [((2, batch * heads, d), acc), ((b3.shape[0], 1), acc) if need_dbias else None]
        dkv_sent, db_sent = _exchange(layout, fill, plan, info, "backward", reverse=True)
        send = plan.halo.send_indices
        grads[0].index_add_(1, send, dkv_sent[:, 0].transpose(0, 1))
        grads[1].index_add_(1, send, dkv_sent[:, 1].transpose(0, 1))
        if db_sent is not None:
            grads[2].index_add_(1, send, db_sent.transpose(0, 1))
        del dkv_sent, db_sent
    else:
        grads = [own for own, _ in grads]
    dk, dv = (g.reshape(batch, heads, n_k, d).to(k.dtype) for g in grads[:2])
    dbias = None
    if need_dbias:
        dbias = grads[2].reshape(batch, grads[2].shape[0] // batch, n_k)
    return dq.reshape(batch, heads, n_q, d).to(q.dtype), dk, dv, dbias


def _group_backward(plan, group, sides, kv, bias, heads, kernel, scale, dropout_p, seed, need_dbias, acc,
                    scratch=None):
    """One group's ``(dq [X, Y, c_q, D] acc, dk, dv, dbias)``: a list's block gradients ``[1, 1, B * H,
    Y, m, c_k, F]``-shaped, a square group's as its padded grid ``[s + 2, C, B * H, s + 2, c_k, F]``."""
    qg, dog, og, lg = (_queries(group, side, scratch) for side in sides)
    lg = lg.squeeze(-1).contiguous()
    delta = None if kernel.fused_backward is not None else (dog.to(acc) * og.to(acc)).sum(dim=-1)
    call = _Call(group, kv, bias, plan, dropout_p, seed, heads, scratch=scratch)
    if not group.pad:
        k_c, v_c, b_c, spec = call.keys(0)
        dq, dk, dv, db = _block_backward(kernel, dog, qg, k_c, v_c, og, lg, delta, scale, b_c, spec, need_dbias)
        m = group.k_cells.shape[1]
        y = group.q_cells.shape[2]
        shape = lambda t, f: t.reshape(1, 1, -1, y, m, plan.key_cell_pixels, f)  # noqa: E731
        return dq.to(acc), shape(dk, dk.shape[-1]), shape(dv, dv.shape[-1]), None if db is None else shape(db, 1)
    a, cc, y = group.q_cells.shape
    c_k = plan.key_cell_pixels
    grids = [_buffer(scratch, name, t, acc).zero_() if t is not None and (name != "db" or need_dbias) else None
             for name, t in (("dk", call.k), ("dv", call.v), ("db", call.bias))]
    dq = _buffer(scratch, "dq", qg, acc)
    step = _piece_rows(kernel, qg, c_k)
    calls = [call.keys(dx) for dx in call.offsets]  # (k, v, bias [X, Y, 3 c_k, F], dropout spec)
    split = lambda t: None if t is None else t.split(step)  # noqa: E731
    rows = list(zip(*(split(t) for t in (dq, dog, qg, og, lg))))
    delta, keys = split(delta), [[split(t) for t in c[:3]] for c in calls]
    targets = [[split(None if grid is None else grid[1 + dx:1 + dx + a].view(-1, y + 2, c_k, grid.shape[-1]))
                for grid in grids] for dx in call.offsets]  # [X, Y + 2, c_k, F] per column offset
    for p, (dq_p, do_p, q_p, o_p, l_p) in enumerate(rows):
        for i, (k_p, v_p, b_p) in enumerate(keys):
            dq_c, dk_c, dv_c, db_c = kernel.backward(  # spans do not fold
                do_p, q_p, k_p[p], v_p[p], o_p, l_p, None if delta is None else delta[p], scale,
                None if b_p is None else b_p[p], calls[i][3], need_dbias)
            if i == 0:
                dq_p.copy_(dq_c)
            else:
                dq_p.add_(dq_c)
            for target, g in zip(targets[i], (dk_c, dv_c, db_c)):
                if target is None:
                    continue
                target = target[p]
                g = g.view(*g.shape[:2], 3, c_k, target.shape[-1])  # a view of the kernel's layout
                for t in range(3):
                    target[:, t:t + y].add_(g[:, :, t])
            del dq_c, dk_c, dv_c, db_c
    return dq, grids[0], grids[1], grids[2]


def _buffer(scratch: Optional[Scratch], key: str, like: Tensor, dtype: torch.dtype) -> Tensor:
    """An uninitialised tensor shaped like ``like`` in ``dtype``, from ``scratch`` when given."""
    if scratch is None:
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    return scratch.take(key, like.shape, like, dtype)


def _block_backward(kernel, dog, qg, k_c, v_c, og, lg, delta, scale, b_c, spec, need_dbias):
    """One kernel call's ``(dq [X, Y, c_q, D], dk, dv [X, Y, L, D], dbias [X, Y, L] or None)``
    (folded to ``[X * Y, 1, ...]`` when every tensor allows)."""
    folded = _fold([dog, qg, k_c, v_c, og, lg, delta, b_c])
    if folded is None:
        return kernel.backward(dog, qg, k_c, v_c, og, lg, delta, scale, b_c, spec, need_dbias)
    dq, dk, dv, db = kernel.backward(*folded[:7], scale, folded[7], spec, need_dbias)
    dq, dk, dv = (t.view(*ref.shape[:2], *t.shape[2:]) for t, ref in zip((dq, dk, dv), (qg, k_c, v_c)))
    return dq, dk, dv, None if db is None else db.view(b_c.shape[:2] + db.shape[2:])


#: Bytes a CPU fused kernel call of a square group's backward reads and writes, about (at least one
#: row of its windows per call; Note [cache-sized calls]).
CPU_CALL_BYTES = 1 << 21


def _piece_rows(kernel: BlockKernel, qg: Tensor, c_k: int) -> int:
    """Rows of a square group's ``X`` rows per kernel call of its backward.

    Note [cache-sized calls]
        On the CPU a square group's backward runs its fused kernel on a few windows' rows at a
        time, sized to stay in the cache, all three column offsets of a piece in turn: the kernel
        zeroes the dq, dk, dv it returns (dk and dv three cells per window) and the grids add them
        right after, so each piece's outputs are written, read and freed while cached instead of
        streamed through memory, and the piece's q, dout, out and dq serve its three calls from
        the cache. The manual kernel (a key bias, dropout: its dropout indices are per call) and
        GPU kernels run the whole group at once.
    """
    x = qg.shape[0]
    if kernel.fused_backward is None or qg.device.type != "cpu" or x == 0:
        return max(x, 1)
    y, c_q, d = qg.shape[1:]
    row = y * (6 * c_q + 8 * c_k) * d * qg.element_size()  # q, dout, out, dq; K/V spans, dk, dv
    return max(1, CPU_CALL_BYTES // row)
