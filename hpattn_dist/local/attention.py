"""Local (windowed) attention over a sharded HEALPix field: cells of the NESTED hierarchy + halo.

Legend: B batch, H heads, D head dim, P ranks in the group, r this rank, N_r pixels on rank r
(any contiguous NESTED split, zero included), N = sum of N_r = 12 * nside**2, c pixels per cell
of the window grid, U_r cells holding at least one of rank r's pixels (its *units*), K window
slots (1 or 9), m <= K cells actually in a window, R halo rows received, S rows sent. Across two
grids: Nq_r / Nk_r queries / keys on rank r, c_q / c_k pixels per cell on each grid.

Query pixel ``i`` attends to the keys of the cells of its window (:mod:`hpattn_dist.local.windows`):
``softmax(q_i K_w^T * scale + bias_w) V_w`` over ``w = window(i // c)``; a query whose window
keys are all masked gets a zero output.

Note [local attention plan]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
The queries of one cell share their keys, so the cell is the unit of work. Rank r's units are
the cells ``start_r // c .. (stop_r - 1) // c``; a cell that straddles a shard boundary is a unit
of both ranks (each computes only its own queries of it). The *unit table* ``[sum_r U_r, K * c]``
lists each unit's window pixels (a missing neighbour's slot is filled with the unit's own pixels,
which it reads anyway); the units of rank r form the r-th contiguous range of its rows, so
:func:`hpattn_dist.comm.halo.plan_halo` plans, from that table and the pixel split, exactly which
key rows each rank sends to whom (the window pixels owned by other ranks, each once) and where
every window key sits in ``[own N_r rows | R received rows]``. Planning is pure arithmetic on
values every rank agreed on, cached per split.

Per call: ONE ``all_to_all`` of those rows (K, V and the key bias of each row packed as raw bytes
into one buffer, so a bf16 K/V keeps its fp32 bias), then the units are batched by the number m
of cells in their window (8 or 7 neighbours, 6 at ``window_nside = 1``): queries
``[n * B, H, c, D]`` against keys ``[n * B, H, m * c, D]``, the cells folded into the batch, so
the fused kernels run without any mask (a missing neighbour is simply absent) and no ``N x N``
score matrix exists. Queries are padded to whole cells (at most two partial cells per rank); the
pad rows' outputs are dropped. Units are processed in chunks of bounded size (``_CHUNK_ELEMENTS``
gathered K/V elements).

Backward: the same batches give dQ (local) and dK/dV/dbias of the extended rows (fp32 for
low-precision inputs, fp64 for fp64), accumulated with ``index_add``; the halo rows' gradients go
home in one ``all_to_all`` with the splits swapped and are added to the rows that were sent.
No forward is recomputed (each batch uses the saved lse and ``delta = rowsum(dO * O)``).

Dropout keeps Note [position-keyed dropout]: the decision for score (b, h, i, j) hashes the GLOBAL
query and key pixels, so the result does not depend on P. The block kernels key dropout by the
batch index, so with dropout each unit is one kernel call (the units are not folded into the
batch): correct, slower.

Two grids (cross-attention, ``ring_cross_attention(..., window_nside=W)``): nothing above needs
the keys to live on the queries' grid, only on a grid with the same cells. Queries on nside_q
(``c_q = (nside_q / W)**2`` per cell), keys on nside_k (``c_k = (nside_k / W)**2``), each split
independently: the units and the query padding come from the query split and ``c_q``, the unit
table lists ``K * c_k`` key pixels per unit, and ``plan_halo`` takes the KEY split as its input
ranges and the units as its outputs. Batches are then ``[n * B, H, c_q, D]`` queries against
``[n * B, H, m * c_k, D]`` keys; the halo, the kernels and the backward are unchanged. The one
agreement carries ``Nq_r`` and ``Nk_r`` in each row. Self-attention is the case where the two
splits are one (``key_sizes=None``), bit for bit the same computation.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from hpattn_dist.comm.agreement import dtype_code, records_gradients, validated_signature
from hpattn_dist.comm.groups import GroupInfo, offsets, resolve_group
from hpattn_dist.comm.halo import HaloPlan, all_to_all_rows, plan_halo
from hpattn_dist.double_backward import refuse_double_backward
from hpattn_dist.healpix import npix2nside
from hpattn_dist.kernels import (
    KERNEL_BACKENDS, BlockKernel, DropoutSpec, check_backend_name, resolve_dropout_seed, select_kernel,
)
from hpattn_dist.local.windows import WINDOW_MODES, check_window, check_window_fits, window_cells
from hpattn_dist.masks import key_bias_from_mask, mask_layout, nonfinite_rows
from hpattn_dist.precision import acc_dtype
from hpattn_dist.replicas import N_SUMS, LayerFacts, LayerRef, check_layer_rows, resolve_layer
from hpattn_dist.validation import check_dropout_p, check_qkv

__all__ = ["LocalPlan", "healpix_local_attention", "plan_local_attention", "windowed_attention"]

#: Gathered K/V elements per batch of units (bounds the extra memory of one kernel call).
_CHUNK_ELEMENTS = 1 << 20
_MAX_PLANS = 16


@dataclass(frozen=True)
class UnitBatch:
    """Units whose windows hold the same number m of cells.

    Attributes:
        units: int64 ``[n]``, positions among this rank's units.
        key_rows: int64 ``[n, m * c]``, each unit's window keys as rows of ``[own | received]``.
        key_pixels: int64 ``[n, m * c]``, the same keys as global pixels (dropout only).
        cells: the global cell of each unit, as host ints (dropout only: read per unit without a
            device read).
        first: ``units[0]`` when ``units`` is a contiguous range (then unit tensors are sliced,
            not copied), else -1.
    """

    units: Tensor
    key_rows: Tensor
    key_pixels: Tensor
    cells: tuple[int, ...]
    first: int

    @staticmethod
    def of(units: Tensor, key_rows: Tensor, key_pixels: Tensor, cells: Tensor) -> "UnitBatch":
        n = units.numel()
        contiguous = n > 0 and int(units[-1]) - int(units[0]) == n - 1  # units are ascending
        first = int(units[0]) if contiguous else -1
        return UnitBatch(units, key_rows, key_pixels, tuple(cells.tolist()), first)

    def to(self, device: torch.device) -> "UnitBatch":
        return UnitBatch(*(t.to(device) for t in (self.units, self.key_rows, self.key_pixels)), self.cells,
                         self.first)

    def take(self, x_units: Tensor) -> Tensor:
        """``x_units[units]`` (a view when the units are a range)."""
        if self.first >= 0:
            return x_units[self.first:self.first + self.units.numel()]
        return x_units.index_select(0, self.units)

    def put(self, x_units: Tensor, values: Tensor) -> None:
        """``x_units[units] = values``."""
        if self.first >= 0:
            x_units[self.first:self.first + self.units.numel()] = values
        else:
            x_units.index_copy_(0, self.units, values.to(x_units.dtype))

    def chunks(self, elements_per_unit: int) -> list["UnitBatch"]:
        """This batch split so that each part gathers at most ``_CHUNK_ELEMENTS`` elements."""
        n = int(self.units.numel())
        step = max(1, _CHUNK_ELEMENTS // max(1, elements_per_unit * self.key_rows.shape[1]))
        if n <= step:
            return [self]
        return [UnitBatch(self.units[a:a + step], self.key_rows[a:a + step],
                          self.key_pixels[a:a + step], self.cells[a:a + step],
                          self.first + a if self.first >= 0 else -1)
                for a in range(0, n, step)]


@dataclass(frozen=True)
class LocalPlan:
    """Everything rank r needs to run local attention on one split (Note [local attention plan]).

    Attributes:
        nside, window_nside, mode: the query grid's and the window grid's resolution, the window mode.
        cell_pixels: ``c_q``, query pixels per cell.
        n_local: ``Nq_r``, this rank's queries.
        n_units: ``U_r``.
        lead: pixels of the first unit before this rank's first query (query padding).
        halo: the key-row exchange (:class:`~hpattn_dist.comm.halo.HaloPlan`).
        batches: the units grouped by window size.
        key_nside, key_cell_pixels, n_local_keys: the key grid's ``nside``, ``c_k`` and this
            rank's keys ``Nk_r`` (equal to the query side's for self-attention).
        cross: queries and keys on two grids (their exchange is counted as ``cross.halo.*``,
            else ``local.halo.*``).
    """

    nside: int
    window_nside: int
    mode: str
    cell_pixels: int
    n_local: int
    n_units: int
    lead: int
    halo: HaloPlan
    batches: tuple[UnitBatch, ...]
    key_nside: int
    key_cell_pixels: int
    n_local_keys: int
    cross: bool = False

    def to(self, device: torch.device) -> "LocalPlan":
        if self.halo.local_table.device == device:
            return self
        return replace(self, halo=self.halo.to(device), batches=tuple(b.to(device) for b in self.batches))


def _unit_cells(start: int, stop: int, c: int) -> Tensor:
    if stop <= start:
        return torch.zeros(0, dtype=torch.int64)
    return torch.arange(start // c, (stop - 1) // c + 1, dtype=torch.int64)


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
    key_sizes = tuple(key_sizes) if cross else sizes
    if len(key_sizes) != len(sizes):
        raise ValueError(f"{len(sizes)} query shard sizes but {len(key_sizes)} key shard sizes")
    nside = _nested_nside(sum(sizes), "query field" if cross else "field")
    key_nside = _nested_nside(sum(key_sizes), "key field") if cross else nside
    check_window(window_nside, mode)
    c = _cell_pixels(nside, window_nside, "query field" if cross else "")  # c_q
    c_k = _cell_pixels(key_nside, window_nside, "key field") if cross else c
    cells = window_cells(window_nside, mode)  # [N_c, K]
    k_slots = cells.shape[1]
    q_starts, k_starts = offsets(sizes), offsets(key_sizes)
    q_bounds = [(s, s + size) for s, size in zip(q_starts, sizes)]
    in_bounds = [(s, s + size) for s, size in zip(k_starts, key_sizes)]
    units_per_rank = [_unit_cells(a, b, c) for a, b in q_bounds]
    out_bounds, acc = [], 0
    for units in units_per_rank:
        out_bounds.append((acc, acc + units.numel()))
        acc += units.numel()
    units = torch.cat(units_per_rank)  # [sum U_r]
    window = cells[units]  # [sum U_r, K]
    slot_cells = torch.where(window >= 0, window, units[:, None])
    key_in_cell = torch.arange(c_k, dtype=torch.int64)
    table = (slot_cells[:, :, None] * c_k + key_in_cell).reshape(units.numel(), k_slots * c_k)
    halo = plan_halo(table, in_bounds, out_bounds, rank)

    mine = units_per_rank[rank]
    u_r = int(mine.numel())
    a, b = out_bounds[rank]
    rows = halo.local_table.view(u_r, k_slots, c_k)
    valid = window[a:b] >= 0  # [U_r, K]
    m = valid.sum(dim=1)
    batches = []
    for m_value in torch.unique(m).tolist():
        sel = (m == m_value).nonzero().squeeze(1)
        v_sel = valid[sel]
        key_rows = rows[sel][v_sel].reshape(sel.numel(), m_value * c_k)
        key_cells = window[a:b][sel][v_sel].reshape(sel.numel(), m_value)
        key_pixels = (key_cells[:, :, None] * c_k + key_in_cell).reshape(sel.numel(), m_value * c_k)
        batches.append(UnitBatch.of(sel, key_rows.contiguous(), key_pixels, mine[sel]))
    lead = q_bounds[rank][0] - int(mine[0]) * c if u_r else 0
    return LocalPlan(nside, int(window_nside), mode, c, sizes[rank], u_r, lead, halo, tuple(batches),
                     key_nside, c_k, key_sizes[rank], cross)


_plans: "collections.OrderedDict[tuple, LocalPlan]" = collections.OrderedDict()


def _cached_plan(sizes: tuple[int, ...], key_sizes: Optional[tuple[int, ...]], window_nside: int, mode: str,
                 rank: int, device: torch.device) -> LocalPlan:
    key = (sizes, key_sizes, window_nside, mode, rank, str(device))
    plan = _plans.get(key)
    if plan is None:
        plan = plan_local_attention(sizes, window_nside, mode, rank, key_sizes).to(device)
        if len(_plans) >= _MAX_PLANS:
            _plans.popitem(last=False)
        _plans[key] = plan
    _plans.move_to_end(key)
    return plan


# --------------------------------------------------------------------------------------------
# Layout helpers (rows-major K/V, unit-major queries)
# --------------------------------------------------------------------------------------------


def _to_units(x: Tensor, plan: LocalPlan) -> Tensor:
    """``[B, H, N_r, D] -> [U_r, B, H, c, D]``, zero-padded to whole cells."""
    b, h, n_r, d = x.shape
    c = plan.cell_pixels
    trail = plan.n_units * c - plan.lead - n_r
    padded = torch.nn.functional.pad(x, (0, 0, plan.lead, trail))
    return padded.view(b, h, plan.n_units, c, d).permute(2, 0, 1, 3, 4).contiguous()


def _from_units(x_units: Tensor, plan: LocalPlan) -> Tensor:
    """``[U_r, B, H, c, D] -> [B, H, N_r, D]`` (the pad rows dropped)."""
    u, b, h, c, d = x_units.shape
    full = x_units.permute(1, 2, 0, 3, 4).reshape(b, h, u * c, d)
    return full[:, :, plan.lead:plan.lead + plan.n_local]


def _gather_kv(kv_ext: Tensor, key_rows: Tensor) -> tuple[Tensor, Tensor]:
    """Rows ``[N_ext, 2, B, H, D]`` at ``key_rows [n, L]`` -> k, v ``[n * B, H, L, D]``."""
    n, length = key_rows.shape
    _, _, b, h, d = kv_ext.shape
    g = kv_ext.index_select(0, key_rows.reshape(-1)).view(n, length, 2, b, h, d)
    g = g.permute(2, 0, 3, 4, 1, 5).reshape(2, n * b, h, length, d)
    return g[0], g[1]


def _gather_bias(bias_ext: Optional[Tensor], key_rows: Tensor) -> Optional[Tensor]:
    """Rows ``[N_ext, B, Hb]`` (the key bias, or the keys' non-finite flags) at ``key_rows [n, L]`` ->
    ``[n * B, Hb, L]``."""
    if bias_ext is None:
        return None
    n, length = key_rows.shape
    _, b, hb = bias_ext.shape
    g = bias_ext.index_select(0, key_rows.reshape(-1)).view(n, length, b, hb)
    return g.permute(0, 2, 3, 1).reshape(n * b, hb, length)


def _pack_bytes(parts: list[Optional[Tensor]]) -> Tensor:
    """Rows ``[S, ...]`` of several dtypes -> one uint8 ``[S, bytes per row]`` buffer."""
    rows = [p.reshape(p.shape[0], math.prod(p.shape[1:])).contiguous().view(torch.uint8)
            for p in parts if p is not None]
    return torch.cat(rows, dim=1) if len(rows) > 1 else rows[0]


def _unpack_bytes(buf: Tensor, like: list[Optional[Tensor]]) -> list[Optional[Tensor]]:
    """Inverse of :func:`_pack_bytes`: views shaped like each of ``like`` (rows from ``buf``)."""
    out, col = [], 0
    for t in like:
        if t is None:
            out.append(None)
            continue
        width = math.prod(t.shape[1:]) * t.element_size()
        if width:
            part = buf[:, col:col + width].contiguous().view(t.dtype)
        else:  # rows of no bytes (B = 0): a byte view cannot be reinterpreted, nothing to read
            part = buf.new_empty((buf.shape[0], 0), dtype=t.dtype)
        out.append(part.view(buf.shape[0], *t.shape[1:]))
        col += width
    return out


def _exchange_rows(parts: list[Optional[Tensor]], halo: HaloPlan, info: GroupInfo, label: str,
                   reverse: bool = False) -> list[Optional[Tensor]]:
    """Send ``parts`` (row-major, same row count) along the halo plan in ONE all_to_all.

    Forward (``reverse=False``): ``parts`` are this rank's ``N_r`` rows; the rows at
    ``send_indices`` go out and the ``R`` received rows come back. Reverse: ``parts`` are the
    ``R`` halo rows' gradients; the ``S`` rows returned pair with ``send_indices``.
    """
    if reverse:
        send_parts, counts = parts, (halo.recv_counts, halo.send_counts)
    else:
        send_parts = [None if p is None else p.index_select(0, halo.send_indices) for p in parts]
        counts = (halo.send_counts, halo.recv_counts)
    recv = all_to_all_rows(_pack_bytes(send_parts), counts[0], counts[1], info, label)
    return _unpack_bytes(recv, parts)


# --------------------------------------------------------------------------------------------
# The autograd Function
# --------------------------------------------------------------------------------------------


class _WindowAttention(torch.autograd.Function):
    """Shard table (rank r; ``N_ext = Nk_r + R``, Note [local attention plan]):

    =========  ========================  ==========================================
    tensor     local shape               meaning
    =========  ========================  ==========================================
    q          ``[B, H, Nq_r, D]``       this rank's queries (``Nq_r = N_r`` for self-attention)
    k, v       ``[B, H, Nk_r, D]``       this rank's keys and values
    bias       ``[B, Hb, Nk_r]`` or None additive key bias (-inf = masked), acc dtype
    kv_halo    ``[R, 2, B, H, D]``       K/V rows received (``kv_ext``: own rows, then these)
    out        ``[B, H, Nq_r, D]``       windowed softmax attention
    lse        ``[U_r, B, H, c]``        log-sum-exp per (padded) query, acc dtype
    =========  ========================  ==========================================
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], plan: LocalPlan,
                info: GroupInfo, kernel: BlockKernel, scale: float, dropout_p: float, seed: int,
                need_dbias: bool) -> Tensor:
        acc = acc_dtype(q.dtype)
        n_r = plan.n_local_keys
        kv_ext, bias_ext = _extended_rows(k, v, bias, plan.halo.rows_received)
        kv_halo = bias_halo = None
        if plan.halo.total_rows:
            kv_halo, bias_halo = _exchange_rows(
                [kv_ext[:n_r], None if bias is None else bias_ext[:n_r]], plan.halo, info,
                _label(plan, "forward"))
            kv_ext[n_r:] = kv_halo
            if bias is not None:
                bias_ext[n_r:] = bias_halo

        q_units = _to_units(q, plan)  # [U_r, B, H, c, D]
        u_r, b, h, c, d = q_units.shape
        # The keys whose k or v is not finite, found once here rather than in each of the up to
        # nine windows that gather a key (Note [non-finite inputs] in masks.py).
        key_bad_ext = nonfinite_rows(kv_ext).any(dim=1)  # [N_ext, B, H]
        out_units = torch.zeros(q_units.shape, dtype=acc, device=q.device)
        lse_units = torch.full((u_r, b, h, c), float("-inf"), dtype=acc, device=q.device)
        for batch in _chunks(plan, b * h * d * 2):
            n = batch.units.numel()
            q_b = batch.take(q_units).reshape(n * b, h, c, d)
            k_b, v_b = _gather_kv(kv_ext, batch.key_rows)
            bias_b = _gather_bias(bias_ext, batch.key_rows)
            key_bad_b = _gather_bias(key_bad_ext, batch.key_rows)  # [n * B, H, L]
            if dropout_p > 0:
                o, lse = _per_unit_forward(kernel, q_b, k_b, v_b, bias_b, scale, batch, b, c,
                                           dropout_p, seed, key_bad_b)
            else:
                o, lse = kernel.forward(q_b, k_b, v_b, scale, bias_b, key_bad=key_bad_b)
            batch.put(out_units, o.view(n, b, h, c, d))
            batch.put(lse_units, lse.view(n, b, h, c))

        out = _from_units(out_units, plan).to(q.dtype).contiguous()
        # k, v, bias themselves (not their rows): no second copy is kept, and the refusal of
        # double backward is anchored on every differentiable input (Note [double backward]).
        ctx.save_for_backward(q, k, v, bias, kv_halo, bias_halo, out, lse_units)
        ctx.plan, ctx.info, ctx.kernel, ctx.scale = plan, info, kernel, scale
        ctx.dropout_p, ctx.seed, ctx.need_dbias = dropout_p, seed, need_dbias and bias is not None
        ctx.bias_heads = None if bias is None else bias.shape[1]
        return out

    @staticmethod
    @refuse_double_backward("healpix_local_attention")
    def backward(ctx, dout: Tensor):
        q, k, v, bias, kv_halo, bias_halo, out, lse_units = ctx.saved_tensors
        plan, info, kernel, scale = ctx.plan, ctx.info, ctx.kernel, ctx.scale
        n_r = plan.n_local_keys
        kv_ext, bias_ext = _extended_rows(k, v, bias, plan.halo.rows_received)
        if kv_halo is not None:
            kv_ext[n_r:] = kv_halo
            if bias is not None:
                bias_ext[n_r:] = bias_halo
        acc = acc_dtype(q.dtype)
        q_units = _to_units(q, plan)
        dout_units = _to_units(dout.contiguous(), plan)
        out_units = _to_units(out, plan)
        delta_units = (dout_units.to(acc) * out_units.to(acc)).sum(dim=-1)  # [U_r, B, H, c]
        u_r, b, h, c, d = q_units.shape
        need_dbias = ctx.need_dbias

        dq_units = torch.zeros(q_units.shape, dtype=acc, device=q.device)
        dkv_ext = torch.zeros(kv_ext.shape, dtype=acc, device=q.device)
        dbias_ext = torch.zeros(bias_ext.shape, dtype=acc, device=q.device) if need_dbias else None
        for batch in _chunks(plan, b * h * d * 2):
            n, length = batch.key_rows.shape
            q_b, do_b, o_b = (batch.take(t).reshape(n * b, h, c, d) for t in (q_units, dout_units, out_units))
            lse_b, delta_b = (batch.take(t).reshape(n * b, h, c) for t in (lse_units, delta_units))
            k_b, v_b = _gather_kv(kv_ext, batch.key_rows)
            bias_b = _gather_bias(bias_ext, batch.key_rows)
            if ctx.dropout_p > 0:
                dq_b, dk_b, dv_b, dbias_b = _per_unit_backward(
                    kernel, do_b, q_b, k_b, v_b, o_b, lse_b, delta_b, scale, bias_b, batch, b, c,
                    ctx.dropout_p, ctx.seed, need_dbias)
            else:
                dq_b, dk_b, dv_b, dbias_b = kernel.backward(
                    do_b, q_b, k_b, v_b, o_b, lse_b, delta_b, scale, bias_b, None, need_dbias)
            batch.put(dq_units, dq_b.view(n, b, h, c, d))
            # [2, n * B, H, L, D] -> rows [n * L, 2, B, H, D]: one index_add into contiguous rows
            rows = torch.stack((dk_b, dv_b)).view(2, n, b, h, length, d).permute(1, 4, 0, 2, 3, 5)
            dkv_ext.index_add_(0, batch.key_rows.reshape(-1), rows.reshape(n * length, 2, b, h, d).to(acc))
            if need_dbias:
                if ctx.bias_heads == 1 and dbias_b.shape[1] != 1:
                    dbias_b = dbias_b.sum(dim=1, keepdim=True)
                hb = dbias_b.shape[1]  # (not -1: ambiguous for B = 0)
                dbias_ext.index_add_(0, batch.key_rows.reshape(-1),
                                     dbias_b.to(acc).view(n, b, hb, length).permute(0, 3, 1, 2)
                                     .reshape(n * length, b, hb))

        dkv_own = dkv_ext[:n_r]
        dbias_own = None if dbias_ext is None else dbias_ext[:n_r]
        if plan.halo.total_rows:
            halo_grads = [dkv_ext[n_r:], None if dbias_ext is None else dbias_ext[n_r:]]
            dkv_sent, dbias_sent = _exchange_rows(halo_grads, plan.halo, info, _label(plan, "backward"),
                                                  reverse=True)
            dkv_own = dkv_own.index_add(0, plan.halo.send_indices, dkv_sent)
            if dbias_own is not None:
                dbias_own = dbias_own.index_add(0, plan.halo.send_indices, dbias_sent)
        dq = _from_units(dq_units, plan).to(q.dtype)
        dk, dv = (t.to(q.dtype) for t in dkv_own.permute(1, 2, 3, 0, 4).unbind(0))  # [B, H, N_r, D]
        dbias = None if dbias_own is None else dbias_own.permute(1, 2, 0)
        return dq, dk, dv, dbias, None, None, None, None, None, None, None


def _label(plan: LocalPlan, direction: str) -> str:
    """Counter label of the halo exchange: ``local.halo.*``, or ``cross.halo.*`` across two grids."""
    return f"{'cross' if plan.cross else 'local'}.halo.{direction}"


def _extended_rows(k: Tensor, v: Tensor, bias: Optional[Tensor],
                   n_halo: int) -> tuple[Tensor, Optional[Tensor]]:
    """Row-major ``[N_r + R, 2, B, H, D]`` K/V and ``[N_r + R, B, Hb]`` bias: this rank's rows
    (copied in), then ``R`` rows left for the halo."""
    b, h, n_r, d = k.shape
    kv_ext = k.new_empty((n_r + n_halo, 2, b, h, d))
    kv_ext[:n_r, 0] = k.permute(2, 0, 1, 3)
    kv_ext[:n_r, 1] = v.permute(2, 0, 1, 3)
    if bias is None:
        return kv_ext, None
    bias_ext = bias.new_empty((n_r + n_halo, *bias.shape[:2]))
    bias_ext[:n_r] = bias.permute(2, 0, 1)
    return kv_ext, bias_ext


def _chunks(plan: LocalPlan, elements_per_key: int) -> list[UnitBatch]:
    return [part for batch in plan.batches for part in batch.chunks(elements_per_key)]


def _unit_spec(dropout_p: float, seed: int, batch: UnitBatch, i: int, c: int) -> DropoutSpec:
    return DropoutSpec(dropout_p, seed, q_offset=batch.cells[i] * c, k_index=batch.key_pixels[i])


def _per_unit_forward(kernel, q_b, k_b, v_b, bias_b, scale, batch, b, c, dropout_p, seed, key_bad_b):
    """One kernel call per unit (batch B), so the dropout hash sees the true batch index."""
    outs, lses = [], []
    for i in range(batch.units.numel()):
        rows = slice(i * b, (i + 1) * b)
        o, lse = kernel.forward(q_b[rows], k_b[rows], v_b[rows], scale,
                                None if bias_b is None else bias_b[rows],
                                _unit_spec(dropout_p, seed, batch, i, c), key_bad=key_bad_b[rows])
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def _per_unit_backward(kernel, do_b, q_b, k_b, v_b, o_b, lse_b, delta_b, scale, bias_b, batch, b, c,
                       dropout_p, seed, need_dbias):
    parts = []
    for i in range(batch.units.numel()):
        rows = slice(i * b, (i + 1) * b)
        parts.append(kernel.backward(do_b[rows], q_b[rows], k_b[rows], v_b[rows], o_b[rows],
                                     lse_b[rows], delta_b[rows], scale,
                                     None if bias_b is None else bias_b[rows],
                                     _unit_spec(dropout_p, seed, batch, i, c), need_dbias))
    return tuple(None if part[0] is None else torch.cat(part) for part in zip(*parts))


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------


def healpix_local_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: Optional[dist.ProcessGroup] = None,
    *,
    window_nside: int,
    mode: str = "neighbourhood",
    backend: str = "auto",
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    key_mask: Optional[Tensor] = None,
    key_bias: Optional[Tensor] = None,
    dropout_seed: Optional[int] = None,
    layer: "Optional[LayerFacts | LayerRef]" = None,
) -> Tensor:
    r"""Windowed attention on a HEALPix field whose NESTED pixels are sharded over ``group``.

    Query pixel ``i`` attends to the pixels of the cells in its window: its own cell of the
    ``window_nside`` grid (``mode="cell"``) or that cell and its 8 (7, 6) neighbours
    (``mode="neighbourhood"``), see :mod:`hpattn_dist.local.windows`. Differentiable w.r.t.
    ``q``, ``k``, ``v`` and ``key_bias``. Algorithm: Note [local attention plan].

    Args:
        q, k, v: this rank's shard ``[B, H, N_r, D]`` of a field in NESTED order, ranks holding
            contiguous ranges in group-rank order (any sizes, zero included; ``N = sum N_r``
            must be ``12 * nside**2`` with nside a power of two).
        group: the process group sharding the pixels (None = WORLD, or a single process).
        window_nside: resolution of the window grid, a power of two dividing nside; a cell holds
            ``(nside // window_nside)**2`` pixels.
        mode: ``"cell"`` or ``"neighbourhood"``.
        backend: block kernel, ``"auto" | "sdpa" | "manual" | "flash_attn"``.
        dropout_p: attention-weight dropout in ``[0, 1)``, normalised first, then dropped, keyed
            by global (query, key) pixels (Note [position-keyed dropout]).
        scale: score scale, default ``D ** -0.5``.
        key_mask: optional bool ``[B, N_r]``, True = the key may be attended to. A query whose
            window has no unmasked key gets a zero output and zero gradients.
        key_bias: optional float ``[B, N_r]`` or ``[B, H, N_r]`` added to every score of that key.
        dropout_seed: seed of the dropout mask; None draws one from PyTorch's default generator;
            group rank 0's value is used on every rank.
        layer: the calling layer's facts (parameter fingerprint), checked in the same agreement
            (Note [replicated parameter check]).

    Returns:
        ``[B, H, N_r, D]`` in the dtype of ``q``.

    Raises:
        ValueError: (on every rank together) bad shapes, dtypes, ``window_nside``, ``mode``,
            ``dropout_p`` or ``backend``; a field that is not a NESTED HEALPix grid or whose
            nside ``window_nside`` does not divide; ranks that disagree on B, H, D, dtype, the
            window, masking or whether gradients are needed; for a ``layer``: parameters that
            differ between ranks.

    Communication: one 320-byte ``all_gather`` (Note [fail together]) and one ``all_to_all`` of
    the halo rows (``2 * B * H * D`` elements of K/V per row, plus ``B * Hb`` bias values when a
    mask or bias is given) forward; the same rows' gradients (accumulation dtype) backward.
    """
    return windowed_attention(q, k, v, group, window_nside=window_nside, mode=mode, backend=backend,
                              dropout_p=dropout_p, scale=scale, key_mask=key_mask, key_bias=key_bias,
                              dropout_seed=dropout_seed, layer=layer)


def windowed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: Optional[dist.ProcessGroup] = None,
    *,
    window_nside: int,
    mode: str = "neighbourhood",
    backend: str = "auto",
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    key_mask: Optional[Tensor] = None,
    key_bias: Optional[Tensor] = None,
    dropout_seed: Optional[int] = None,
    layer: "Optional[LayerFacts | LayerRef]" = None,
    cross: bool = False,
    strategy: Optional[str] = None,
    what: str = "healpix_local_attention",
) -> Tensor:
    """The door of windowed attention, self (:func:`healpix_local_attention`) or across two grids
    (``cross=True``: ``q [B, H, Nq_r, D]`` on one NESTED grid, ``k, v [B, H, Nk_r, D]``, the key
    mask and bias on another, sharded independently; Note [local attention plan]). One agreement,
    whose row carries ``Nq_r`` and ``Nk_r``; then the plan of both splits and the halo executor.

    ``strategy``: the strategy a caller of :func:`~hpattn_dist.strategies.sharded_attention` named;
    the halo exchange has no head-parallel form, so anything but ``"ring"`` / ``"auto"`` is refused
    (on every rank). ``what`` names the entry point (or the layer) in errors.
    """
    info = resolve_group(group)
    with validated_signature(info, what) as sig:
        if strategy not in (None, "ring", "auto"):
            raise ValueError(f"{what}: window_nside={window_nside!r} runs the halo exchange of local "
                             f"attention, which has no head-parallel form; strategy must be 'ring' or "
                             f"'auto', got {strategy!r}")
        check_qkv(q, k, v, scale, cross=cross)
        layer = resolve_layer(layer)
        check_dropout_p(dropout_p)
        check_backend_name(backend)
        window_nside = check_window(window_nside, mode)
        bias = key_bias_from_mask(k, key_mask, key_bias)  # k: the keys' N (check_qkv: q's B, H, dtype)
        batch, heads, n_local, head_dim = q.shape
        mask_left = key_mask is not None and mask_layout(key_mask).any_masked
        seed = resolve_dropout_seed(dropout_p, dropout_seed)
        needs_grad = records_gradients(q, k, v, key_bias)
        sig.set(
            {
                "B": batch, "H": heads, "D": head_dim, "dtype": dtype_code(q.dtype),
                "window_nside": window_nside, "mode": WINDOW_MODES.index(mode),
                "key_bias_heads": -1 if key_bias is None else bias.shape[1],
                "key_mask": int(key_mask is not None),
                "dropout_ppm": int(round(dropout_p * 1e6)),
                "backend": KERNEL_BACKENDS.index(backend),
                "bias_grad": int(needs_grad and key_bias is not None and key_bias.requires_grad),
                "cross": int(cross), "scale": head_dim**-0.5 if scale is None else float(scale),
                **({} if layer is None else {"param_layout": layer.layout}),
            },
            (n_local, k.shape[2], int(mask_left), seed, *(() if layer is None else layer.sums)),
            q.device,
            kind="healpix_local_attention",
            grads=needs_grad,
        )
    per_rank = sig.per_rank
    sizes = tuple(row[0] for row in per_rank)
    key_sizes = tuple(row[1] for row in per_rank) if cross else None
    if layer is not None:  # the same rows on every rank: raised on every rank
        check_layer_rows(info, layer, sizes, [row[4:4 + N_SUMS] for row in per_rank])
        if cross:
            check_layer_rows(info, replace(layer, name=layer.name + " (keys and values)"), key_sizes,
                             [row[4:4 + N_SUMS] for row in per_rank])
    try:
        plan = _cached_plan(sizes, key_sizes, window_nside, mode, info.rank, q.device)
    except ValueError as err:  # same sizes and window on every rank: raised on every rank
        split = f"query shard sizes {list(sizes)}, key shard sizes {list(key_sizes)}" if cross else \
            f"shard sizes {list(sizes)}"
        raise ValueError(f"{what}: {err} ({split})") from None
    if key_bias is None and not any(row[2] for row in per_rank):
        bias = None
    seed = per_rank[0][3]
    kernel = select_kernel(backend, q, has_bias=bias is not None, dropout=dropout_p > 0)
    scale = head_dim**-0.5 if scale is None else float(scale)
    need_dbias = key_bias is not None and key_bias.requires_grad
    return _WindowAttention.apply(q, k, v, bias, plan, info, kernel, scale, float(dropout_p), seed,
                                 need_dbias)
