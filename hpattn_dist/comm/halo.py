"""Halo exchange: fetch exactly the input rows that this rank's outputs read through a table.

Legend: B batch, N_in / N_out input / output pixels, N_r input pixels on group rank r, O_r output
pixels on rank r, K connections per output pixel, P group size, S rows this rank sends, R rows it
receives, F the trailing (feature) shape of a row.

A *connection table* ``table [N_out, K]`` says that output pixel ``p`` reads input pixels
``table[p, :]`` (idx-flow's ``connection_indices``; later also a local-attention window or a
cross-grid neighbourhood). Input and output pixels are split into contiguous ranges, one per rank
of the group, in the ordering the table uses (RING or NESTED: the mechanism does not care). Rank
``r`` then needs the input rows ``unique(table[out_r])``; those outside its own range are its
*halo*.

Note [halo plan]
~~~~~~~~~~~~~~~~
Every rank holds the same full table, so every rank can compute every rank's needs: planning is
pure arithmetic, no communication. :func:`plan_halo` computes, for one rank:

- ``send_indices [S]``: the local rows (0-based in this rank's input range) it sends, grouped by
  destination rank in ascending rank order, each group in ascending pixel order;
  ``send_counts[q]`` rows go to rank ``q``;
- ``recv_counts[q]``: rows received from rank ``q`` (rank q's ``send_counts[r]``), which arrive
  grouped by source rank, each group in ascending pixel order;
- ``local_table [O_r, K]``: the table's rows of this rank's outputs, remapped into the extended
  input ``[own N_r rows | R received rows]``, so ``x_ext[:, local_table]`` equals
  ``x_full[:, table[out_r]]`` element for element.

Per call, :func:`halo_exchange` sends just those rows in ONE ``all_to_all_single`` with uneven
splits (no call at all when the plan moves nothing on any rank). Its adjoint is the same
all-to-all with the splits swapped, followed by an ``index_add`` of the returned gradients into
the rows that were sent (a row sent to several ranks sums their contributions).

The ranks must agree on the plan, i.e. on the table and every rank's input range:
:class:`HaloExchanger` checks that in the one metadata ``all_gather`` of each call
(:func:`~hpattn_dist.comm.groups.validated_signature`: batch, features, dtype, table shape and a
CRC-32 of the table are shared values, the input length is the local value), so a rank with a
different table or a misfit input fails together with its peers (Note [fail together]).
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from hpattn_dist.comm.all_to_all import all_to_all_flat
from hpattn_dist.comm.agreement import dtype_code, validated_signature
from hpattn_dist.comm.groups import GroupInfo, offsets, resolve_group
from hpattn_dist.shard_plan import shard_bounds

__all__ = ["HaloExchanger", "HaloPlan", "all_to_all_rows", "halo_exchange", "halo_summary", "plan_halo",
           "plan_halo_from_needs", "table_crc"]

Bounds = Sequence[tuple[int, int]]


@dataclass(frozen=True, eq=False)
class HaloPlan:
    """What one rank sends, receives and reads for one table and one pair of shard plans.

    Attributes:
        rank, world_size: the rank this plan is for, and ``P``.
        in_bounds, out_bounds: every rank's ``(start, stop)`` input / output range.
        send_indices: int64 ``[S]``, local input rows to send, grouped by destination rank.
        send_counts, recv_counts: rows sent to / received from each rank (0 for itself).
        local_table: int64 ``[O_r, K]`` into ``[own N_r rows | R received rows]``.
        recv_pixels: int64 ``[R]``, the global input pixel of each received row (diagnostics).
        total_rows: rows moved by ALL ranks together (the same on every rank; 0: no exchange).
    """

    rank: int
    world_size: int
    in_bounds: tuple[tuple[int, int], ...]
    out_bounds: tuple[tuple[int, int], ...]
    send_indices: Tensor
    send_counts: tuple[int, ...]
    recv_counts: tuple[int, ...]
    local_table: Tensor
    recv_pixels: Tensor
    total_rows: int

    @property
    def rows_sent(self) -> int:
        return sum(self.send_counts)

    @property
    def rows_received(self) -> int:
        return sum(self.recv_counts)

    @property
    def n_local(self) -> int:
        start, stop = self.in_bounds[self.rank]
        return stop - start

    def to(self, device: torch.device) -> "HaloPlan":
        """The same plan with its index tensors on ``device``."""
        if self.local_table.device == device:
            return self
        return HaloPlan(self.rank, self.world_size, self.in_bounds, self.out_bounds,
                        self.send_indices.to(device), self.send_counts, self.recv_counts,
                        self.local_table.to(device), self.recv_pixels.to(device), self.total_rows)


def _check_bounds(bounds: Bounds, n: int, what: str) -> tuple[tuple[int, int], ...]:
    out = tuple((int(a), int(b)) for a, b in bounds)
    expect = 0
    for a, b in out:
        if a != expect or b < a:
            raise ValueError(f"{what} must be contiguous ranges in rank order covering [0, {n}), got {out}")
        expect = b
    if expect != n:
        raise ValueError(f"{what} must cover [0, {n}), got {out}")
    return out


def _normalized_table(table: Tensor, n_in: int) -> Tensor:
    """The table as int64 on CPU, negative entries wrapped as ``x[:, table]`` does.

    Raises:
        ValueError: the table is not a 2-D integer tensor or an entry is outside ``[-N_in, N_in)``.
    """
    if not isinstance(table, Tensor) or table.dim() != 2 or table.dtype.is_floating_point \
            or table.dtype == torch.bool or table.is_complex():
        raise ValueError(
            "a connection table must be a 2-D integer tensor [N_out, K], got "
            f"{type(table).__name__} {getattr(table, 'dtype', '')} {tuple(getattr(table, 'shape', ()))}"
        )
    t = table.detach().to("cpu", torch.int64)
    if t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < -n_in or hi >= n_in:
            raise ValueError(
                f"the connection table [{t.shape[0]}, {t.shape[1]}] holds entries in [{lo}, {hi}], "
                f"outside the input grid of {n_in} pixels (the sum of the ranks' input lengths): "
                "is each rank passing its shard of the right grid?"
            )
        if lo < 0:
            t = torch.where(t < 0, t + n_in, t)
    return t


def _owners(pixels: Tensor, in_bounds: tuple[tuple[int, int], ...]) -> Tensor:
    stops = torch.tensor([b for _, b in in_bounds], dtype=torch.int64)
    return torch.searchsorted(stops, pixels, right=True)


def plan_halo(table: Tensor, in_bounds: Bounds, out_bounds: Bounds, rank: int) -> HaloPlan:
    """Plan the halo exchange of ``rank`` (pure arithmetic, no communication; Note [halo plan]).

    Args:
        table: ``[N_out, K]`` integer connection table (entries index input pixels; negative
            entries count from the end, as in ``x[:, table]``).
        in_bounds: every rank's contiguous input range, in rank order, covering ``[0, N_in)``.
        out_bounds: every rank's contiguous output range, covering ``[0, N_out)``.
        rank: the rank to plan for.

    Returns:
        The :class:`HaloPlan` of ``rank`` (index tensors on CPU).

    Raises:
        ValueError: bounds that are not contiguous covers of the right sizes, a misfit table, or a
            rank outside ``[0, P)``.
    """
    n_in = in_bounds[-1][1] if len(in_bounds) else 0
    in_b = _check_bounds(in_bounds, n_in, "in_bounds")
    n_out = int(table.shape[0]) if isinstance(table, Tensor) and table.dim() == 2 else -1
    out_b = _check_bounds(out_bounds, n_out, "out_bounds") if n_out >= 0 else ()
    t = _normalized_table(table, n_in)
    if len(out_b) != len(in_b) or not 0 <= rank < len(in_b):
        raise ValueError(f"{len(in_b)} input ranges, {len(out_b)} output ranges and rank {rank} do not fit")
    needs = [torch.unique(t[a:b]) for a, b in out_b]  # each rank's input pixels, sorted
    plan = plan_halo_from_needs(needs, in_b, rank)
    my_start, my_stop = in_b[rank]
    out_start, out_stop = out_b[rank]
    rows = t[out_start:out_stop]
    own = (rows >= my_start) & (rows < my_stop)
    local = torch.where(own, rows - my_start, plan.n_local + torch.searchsorted(plan.recv_pixels, rows))
    return dataclasses.replace(plan, out_bounds=out_b, local_table=local.contiguous())


def plan_halo_from_needs(needs: Sequence[Tensor], in_bounds: Bounds, rank: int) -> HaloPlan:
    """The exchange of :func:`plan_halo` from what each rank reads rather than from a table.

    Args:
        needs: per rank, int64 ``[*]``: the sorted distinct input pixels it reads (its own pixels
            may be left out: they never travel).
        in_bounds: every rank's contiguous input range, in rank order.
        rank: the rank to plan for.

    Returns:
        The :class:`HaloPlan` of ``rank`` without a table (``local_table`` is ``[0, 0]``,
        ``out_bounds`` empty); received rows arrive in ascending pixel order (``recv_pixels``).
    """
    n_in = in_bounds[-1][1] if len(in_bounds) else 0
    in_b = _check_bounds(in_bounds, n_in, "in_bounds")
    p = len(in_b)
    if len(needs) != p or not 0 <= rank < p:
        raise ValueError(f"{len(in_b)} input ranges, {len(needs)} rows of needs and rank {rank} do not fit")
    owners = [_owners(need, in_b) for need in needs]
    total_rows = sum(int((own != r).sum()) for r, own in enumerate(owners))
    my_start, _ = in_b[rank]

    # Rank q is sent the pixels of needs[q] inside this rank's range, ascending.
    send_parts, send_counts = [], []
    for q in range(p):
        mine = needs[q][owners[q] == rank] if q != rank else needs[q][:0]
        send_parts.append(mine - my_start)
        send_counts.append(int(mine.numel()))

    # Received rows arrive grouped by source rank, each group ascending: that is `remote` itself.
    remote = needs[rank][owners[rank] != rank]
    recv_counts = [0 if q == rank else int((owners[rank] == q).sum()) for q in range(p)]
    return HaloPlan(
        rank=rank, world_size=p, in_bounds=in_b, out_bounds=(),
        send_indices=torch.cat(send_parts).to(torch.int64), send_counts=tuple(send_counts),
        recv_counts=tuple(recv_counts), local_table=torch.zeros((0, 0), dtype=torch.int64),
        recv_pixels=remote, total_rows=total_rows,
    )


def halo_summary(table: Tensor, n_in: int, world_size: int,
                 in_bounds: Optional[Bounds] = None) -> list[dict]:
    """The halo each rank needs for ``table`` split over ``world_size`` ranks (planning only).

    Args:
        table: ``[N_out, K]`` connection table.
        n_in: input pixels ``N_in``.
        world_size: ``P``.
        in_bounds: the input ranges (default ``shard_bounds(N_in, P)``); outputs always follow
            ``shard_bounds(N_out, P)``.

    Returns:
        One dict per rank: ``rank``, ``n_in_local``, ``n_out_local``, ``rows_received``,
        ``rows_sent``, ``peers_received_from``, ``peers_sent_to``. Bytes per call are
        ``rows * (B * F * itemsize)`` for a ``[B, N_r, F]`` input.
    """
    in_b = shard_bounds(n_in, world_size) if in_bounds is None else in_bounds
    out_b = shard_bounds(int(table.shape[0]), world_size)
    out = []
    for r in range(world_size):
        plan = plan_halo(table, in_b, out_b, r)
        out.append({
            "rank": r, "n_in_local": plan.n_local,
            "n_out_local": out_b[r][1] - out_b[r][0],
            "rows_received": plan.rows_received, "rows_sent": plan.rows_sent,
            "peers_received_from": sum(1 for c in plan.recv_counts if c),
            "peers_sent_to": sum(1 for c in plan.send_counts if c),
        })
    return out


def table_crc(table: Tensor) -> int:
    """CRC-32 of a table's shape and int64 values (the cross-rank agreement on the table)."""
    data = table.detach().to("cpu", torch.int64).contiguous()
    raw = ctypes.string_at(data.data_ptr(), data.numel() * 8) if data.numel() else b""
    return zlib.crc32(raw, zlib.crc32(repr(tuple(data.shape)).encode()))


# --------------------------------------------------------------------------------------------
# The exchange
# --------------------------------------------------------------------------------------------


def all_to_all_rows(send: Tensor, send_counts: Sequence[int], recv_counts: Sequence[int],
                    info: GroupInfo, label: str) -> Tensor:
    """Rows ``[S, *F] -> [R, *F]``: ``send_counts[j]`` consecutive rows to rank j, ``recv_counts[i]``
    rows from rank i in source-rank order (the row view of :func:`all_to_all_flat`)."""
    row = math.prod(send.shape[1:])
    recv = all_to_all_flat(send.reshape(-1), [c * row for c in send_counts],
                           [c * row for c in recv_counts], info, label)
    return recv.view(sum(recv_counts), *send.shape[1:])


class _HaloExchange(torch.autograd.Function):
    """Rows of this rank's input that peers read -> rows this rank reads from peers.

    ========  ==================  =============================================
    tensor    local shape         formula
    ========  ==================  =============================================
    x_rows    ``[N_r, *F]``       this rank's input, pixel dim first
    forward   ``[R, *F]``         ``all_to_all(x_rows[send_indices])``
    dgrad     ``[N_r, *F]``       ``index_add(send_indices, all_to_all^T(g))``
    ========  ==================  =============================================
    """

    @staticmethod
    def forward(ctx, x_rows: Tensor, plan: HaloPlan, info: GroupInfo) -> Tensor:
        ctx.plan, ctx.info, ctx.n_rows = plan, info, x_rows.shape[0]
        send = x_rows.index_select(0, plan.send_indices)
        return all_to_all_rows(send, plan.send_counts, plan.recv_counts, info, "halo.forward")

    @staticmethod
    def backward(ctx, grad_recv: Tensor):
        plan = ctx.plan
        grad_sent = all_to_all_rows(grad_recv.contiguous(), plan.recv_counts, plan.send_counts,
                                     ctx.info, "halo.backward")
        grad = grad_sent.new_zeros((ctx.n_rows, *grad_sent.shape[1:]))
        grad.index_add_(0, plan.send_indices, grad_sent)
        return grad, None, None


def halo_exchange(x_local: Tensor, plan: HaloPlan, info: GroupInfo, dim: int = 1) -> Tensor:
    """This rank's input extended by its halo: ``[own N_r rows | R received rows]`` along ``dim``.

    Differentiable (the adjoint sends gradients home and adds them up). Called on every rank of
    the group with plans from the same table and bounds; no communication when the plan moves
    no row on any rank.

    Args:
        x_local: ``[..., N_r, ...]`` with this rank's input pixels along ``dim`` (e.g. ``[B, N_r, C]``).
        plan: this rank's :class:`HaloPlan` (index tensors on ``x_local``'s device).
        info: the group.
        dim: the pixel dimension.

    Returns:
        ``x_ext`` with ``N_r + R`` pixels along ``dim``; ``x_ext.index_select(dim, local_table.flatten())``
        are the inputs of this rank's outputs.
    """
    if plan.total_rows == 0:
        return x_local
    rows = x_local.movedim(dim, 0)
    received = _HaloExchange.apply(rows, plan, info)
    return torch.cat([x_local, received.movedim(0, dim)], dim=dim)


class HaloExchanger:
    """The per-call side of a halo exchange for one layer and group: agree, plan (cached), exchange.

    Outputs follow ``shard_bounds(N_out, P)``; inputs may be any contiguous split, read from the
    ranks' input lengths in each call's metadata ``all_gather`` (Note [halo plan]). Plans are
    cached by input split and table; the table's CRC is cached by its storage and version, so an
    in-place change of the table (``load_state_dict``) is noticed. The exchanger holds no tensor
    of the model: the layer passes its table on each call.

    Args:
        group: the group (None: WORLD, resolved at each call, Note [groups resolved per call] in
            ``comm/groups.py``; or a :class:`GroupInfo`, used as it is).
        what: name used in error messages (e.g. ``"SpatialConv 'enc.0'"``).
    """

    _MAX_PLANS = 8

    def __init__(self, group: "Optional[dist.ProcessGroup] | GroupInfo", what: str) -> None:
        self.group, self.what = group, what
        self._crc_key: Optional[tuple] = None
        self._crc = 0
        self._plans: dict[tuple, HaloPlan] = {}

    @property
    def info(self) -> GroupInfo:
        """This process's view of the group, now."""
        return resolve_group(self.group)

    def __deepcopy__(self, memo: dict) -> "HaloExchanger":
        return HaloExchanger(self.group, self.what)  # a copied model shares the group, not the caches

    def table_crc(self, table: Tensor) -> int:
        """CRC-32 of ``table`` (:func:`table_crc`), recomputed only when its storage, version or
        shape changed; a change also drops the cached plans."""
        key = (table.data_ptr(), table._version, tuple(table.shape), table.device)
        if key != self._crc_key:
            self._crc, self._crc_key, self._plans = table_crc(table), key, {}
        return self._crc

    def agree(self, x_local: Tensor, table: Tensor, dim: int = 1) -> tuple[int, ...]:
        """Agree with the peers on this call: every rank's input length (one metadata all_gather).

        Args:
            x_local: this rank's input, its pixels along ``dim`` (e.g. ``[B, N_r, C]``).
            table: ``[N_out, K]`` connection table, identical on every rank.
            dim: the pixel dimension.

        Returns:
            ``N_r`` of every rank, in group-rank order.

        Raises (on every rank together):
            ValueError: ranks disagree on the table, the other dims or the dtype, or a rank's
                input is not a tensor of 1 to 8 dims.
        """
        info = self.info
        with validated_signature(info, self.what) as sig:
            if not isinstance(x_local, Tensor) or x_local.dim() < 1 or x_local.dim() > 8:
                raise ValueError(f"{self.what}: expected a tensor of 1 to 8 dims, got "
                                 f"{getattr(x_local, 'shape', type(x_local).__name__)}")
            if not isinstance(table, Tensor) or table.dim() != 2:
                raise ValueError(f"{self.what}: the connection table must be 2-D [N_out, K]")
            dim = dim % x_local.dim()
            shape = list(x_local.shape)
            n_local = shape.pop(dim)
            crc = self.table_crc(table)
            sig.set({"dims": x_local.dim(), "pixel_dim": dim,
                     **{f"size{i}": size for i, size in enumerate(shape)},
                     "dtype": dtype_code(x_local.dtype), "n_out": int(table.shape[0]),
                     "k": int(table.shape[1]), "table_crc": crc}, n_local, x_local.device)
        return tuple(sig.per_rank)

    def plan_for(self, sizes: Sequence[int], table: Tensor, device: torch.device) -> HaloPlan:
        """This rank's plan for inputs of ``sizes`` rows per rank (cached; no communication).

        Raises:
            ValueError: the table does not fit the input grid (``N_in = sum(sizes)``); with
                sizes agreed by :meth:`agree`, on every rank together.
        """
        self.table_crc(table)  # drops the cached plans if the table changed in place
        info = self.info
        sizes = tuple(sizes)
        key = (sizes, info.rank)  # a new group may place this process elsewhere
        plan = self._plans.get(key)
        if plan is None:
            starts = offsets(sizes)
            in_b = [(s, s + n) for s, n in zip(starts, sizes)]
            out_b = shard_bounds(int(table.shape[0]), info.world_size)
            try:
                plan = plan_halo(table, in_b, out_b, info.rank)
            except ValueError as err:  # same table and sizes on every rank: raised on every rank
                raise ValueError(f"{self.what}: {err}") from None
            if len(self._plans) >= self._MAX_PLANS:
                self._plans.pop(next(iter(self._plans)))
        plan = plan.to(device)
        self._plans[key] = plan
        return plan

    def plan(self, x_local: Tensor, table: Tensor, dim: int = 1) -> HaloPlan:
        """Agree with the peers on this call and return this rank's plan (one metadata all_gather).

        :meth:`agree`, then :meth:`plan_for`; index tensors on ``x_local``'s device.
        """
        return self.plan_for(self.agree(x_local, table, dim), table, x_local.device)

    def __call__(self, x_local: Tensor, table: Tensor, dim: int = 1) -> tuple[Tensor, HaloPlan]:
        """``(x_ext, plan)``: :meth:`plan`, then :func:`halo_exchange`."""
        plan = self.plan(x_local, table, dim)
        return halo_exchange(x_local, plan, self.info, dim), plan
