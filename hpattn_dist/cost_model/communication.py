"""Bytes each rank sends: the global strategies' closed forms and the halo of windowed attention.

Legend: B batch, H heads, D head dim, P ranks in the group, U Ulysses degree (U | P, U | H),
R = P / U ring degree, h = H / U, N_p pixels on group position p = i*U + u (ring index i, Ulysses
index u; Note [hybrid layout]), M_i = sum of N_p over Ulysses group i, N = sum of all N_p,
s the itemsize of q/k/v, a the itemsize of the ring's gradient accumulators (fp32, or fp64 for
fp64 inputs), X = B * H * N_p * D (elements of one of q, k, v on this rank).

Note [communication volume]
    Bytes SENT by the process at position p (what :func:`~hpattn_dist.count_communication`
    reports), excluding the few-byte shape handshakes (labels ``*.meta``) and any key bias.
    Ring and Ulysses are the hybrid with U = 1 and U = P.

    Ulysses all-to-alls over the Ulysses group (:mod:`hpattn_dist.comm.all_to_all` sends all but
    its own piece). Forward: q, k, v in (each rank keeps h of its H heads, sends the rest of its
    N_p pixels) and the output back (sends its h heads of the other members' pixels)::

        a2a_fwd = s * B * D * (3 * (H - h) * N_p  +  h * (M_i - N_p))
        a2a_bwd = s * B * D * ((H - h) * N_p  +  3 * h * (M_i - N_p))     (dO in; dQ, dK, dV back)

    Ring over the ring group on blocks ``[B, h, M_j, D]`` (Note [ring schedule]): forward, R - 1
    K/V sends, every block except that of ring index i + 1 (the one that is never passed on);
    backward, the same K/V sends plus R sends of dK/dV accumulators in the accumulation dtype,
    one per block (none when R = 1)::

        ring_fwd = 2 * s * B * h * D * (N - M_{(i+1) mod R})          (0 when R = 1)
        ring_bwd = ring_fwd + 2 * a * B * h * D * N                    (0 when R = 1)

    With equal shards (N_p = N / P) everything is a multiple of X::

        forward   = s * X * (4 * (U - 1) / U + 2 * (R - 1))
        backward  = s * X * (4 * (U - 1) / U + 2 * (R - 1)) + a * X * 2 * R * [R > 1]

        ring    (U = 1): fwd 2 (P - 1) s X,     bwd 2 (P - 1) s X + 2 P a X
        ulysses (U = P): fwd 4 (P - 1)/P s X,   bwd 4 (P - 1)/P s X
        hybrid  U x R  : in between; per rank it falls as U grows (the ring's 2 (R - 1) term
                         dominates the all-to-all's < 4 per direction).

    So Ulysses moves the fewest bytes whenever H is divisible by P, and otherwise the largest
    feasible U wins. At P = 2 forward-only the two tie (2 s X each); ties go to the smaller U.

    What the model leaves out: the ring's transfers overlap with compute (Note [double
    buffering]) while an all-to-all does not, all-to-all latency grows with the number of peers,
    and Ulysses computes full-length attention for h heads (same FLOPs, more per-kernel memory).
    Measure (``hpattn-dist bench``) where it matters.

Note [halo traffic]
    Windowed attention (Note [local attention plan]) sends each rank the pixels of its units'
    window cells that other ranks own, each row once per receiving rank. A cell of the window grid
    is a contiguous NESTED range of ``c = (nside / window_nside)**2`` pixels, so the counts need
    no pixel table: rank s receives ``sum over the cells w of its units' windows of
    (c - |w & own_s|)`` rows, and rank r sends ``sum over s != r of sum over those w of |w & own_r|``.
    A row is ``2 * B * H * D`` values of K/V forward (itemsize s) and their gradients backward
    (accumulation itemsize a). :func:`halo_rows` is that count at the cost of the cell table
    (``12 * window_nside**2`` cells, up to 9 slots each), not of the ``N`` pixels; the tests hold it
    to :func:`hpattn_dist.local.window_traffic` (the plan the layer executes) and to the counters.
    Plus one agreement row per call (``AGREEMENT_BYTES``) (``all_gather.meta``), as for every attention.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from hpattn_dist.comm.agreement import SIGNATURE_WIDTH
from hpattn_dist.comm.groups import offsets

__all__ = ["AGREEMENT_BYTES", "CommVolume", "HaloRows", "communication_volume", "degree_for",
           "equal_shard_cost", "halo_rows", "strategy_name"]

AGREEMENT_BYTES = 8 * SIGNATURE_WIDTH
"""Bytes one rank sends in the one agreement of an attention call (``all_gather.meta``; Note
[fail together]: ``SIGNATURE_WIDTH`` int64 values)."""


@dataclass(frozen=True)
class CommVolume:
    """Bytes one process sends (Note [communication volume])."""

    forward: int
    backward: int

    @property
    def total(self) -> int:
        return self.forward + self.backward


def strategy_name(ulysses_degree: int, group_size: int) -> str:
    """``"ring"`` (U = 1), ``"ulysses"`` (U = P) or ``"hybrid"``."""
    if ulysses_degree == 1:
        return "ring"
    return "ulysses" if ulysses_degree == group_size else "hybrid"


def degree_for(strategy: str, group_size: int, ulysses_degree: Optional[int]) -> int:
    """U of ``strategy`` on a group of ``group_size`` (``ulysses_degree`` for hybrid)."""
    if strategy == "ring":
        return 1
    if strategy == "ulysses":
        return group_size
    if strategy == "hybrid":
        if ulysses_degree is None or group_size % ulysses_degree != 0:
            raise ValueError(f"strategy 'hybrid' needs a ulysses_degree dividing {group_size}, "
                             f"got {ulysses_degree!r}")
        return ulysses_degree
    raise ValueError(f"strategy must be 'ring', 'ulysses' or 'hybrid', got {strategy!r}")


def communication_volume(
    strategy: str,
    *,
    batch: int,
    heads: int,
    head_dim: int,
    sizes: Sequence[int],
    rank: int,
    itemsize: int,
    acc_itemsize: Optional[int] = None,
    ulysses_degree: Optional[int] = None,
) -> CommVolume:
    """Exact bytes sent by group position ``rank`` (Note [communication volume]).

    Args:
        strategy: ``"ring"``, ``"ulysses"`` or ``"hybrid"`` (then ``ulysses_degree`` is U).
        batch, heads, head_dim: B, H, D.
        sizes: N_p of every position of the (parent) group, in group-rank order.
        rank: the position p whose traffic is wanted.
        itemsize: bytes per element of q, k, v.
        acc_itemsize: bytes per element of the ring's gradient accumulators (default 4, or 8 when
            ``itemsize`` is 8).

    Raises:
        ValueError: unknown strategy or a degree that does not divide P or H.
    """
    p = len(sizes)
    u_deg = degree_for(strategy, p, ulysses_degree)
    if heads % u_deg != 0:
        raise ValueError(f"heads={heads} is not divisible by the Ulysses degree {u_deg}")
    r_deg = p // u_deg
    acc = (8 if itemsize == 8 else 4) if acc_itemsize is None else acc_itemsize
    h = heads // u_deg
    i = rank // u_deg
    m = [sum(sizes[j * u_deg:(j + 1) * u_deg]) for j in range(r_deg)]
    n_total, n_p = sum(sizes), sizes[rank]
    unit = batch * head_dim
    a2a_fwd = itemsize * unit * (3 * (heads - h) * n_p + h * (m[i] - n_p))
    a2a_bwd = itemsize * unit * ((heads - h) * n_p + 3 * h * (m[i] - n_p))
    if r_deg > 1:
        ring_fwd = 2 * itemsize * batch * h * head_dim * (n_total - m[(i + 1) % r_deg])
        ring_bwd = ring_fwd + 2 * acc * batch * h * head_dim * n_total
    else:
        ring_fwd = ring_bwd = 0
    return CommVolume(a2a_fwd + ring_fwd, a2a_bwd + ring_bwd)


def equal_shard_cost(ulysses_degree: int, group_size: int, acc_ratio: float, backward: bool) -> float:
    """Equal-shard bytes per rank in units of ``s * X`` (Note [communication volume]); ``acc_ratio``
    = a / s."""
    u_deg, r_deg = ulysses_degree, group_size // ulysses_degree
    one_way = 4 * (u_deg - 1) / u_deg + 2 * (r_deg - 1)
    if not backward:
        return one_way
    return 2 * one_way + (2 * r_deg * acc_ratio if r_deg > 1 else 0.0)


@dataclass(frozen=True)
class HaloRows:
    """One rank's halo rows per windowed-attention call (Note [halo traffic])."""

    received: int
    sent: int


def halo_rows(sizes: Sequence[int], window_nside: int, mode: str) -> list[HaloRows]:
    """Every rank's halo rows for windowed self-attention on the split ``sizes`` (Note [halo traffic]).

    Args:
        sizes: every rank's pixel count, group-rank order (contiguous NESTED ranges of a field of
            ``N = 12 * nside**2`` pixels, ``nside`` a power of two divisible by ``window_nside``).
        window_nside, mode: the window (:mod:`hpattn_dist.local.windows`).

    Raises:
        ValueError: a total that is no such field, a window finer than the field.
    """
    return list(_halo_rows(tuple(int(n) for n in sizes), window_nside, mode))


@functools.lru_cache(maxsize=32)
def _halo_rows(sizes: tuple[int, ...], window_nside: int, mode: str) -> tuple[HaloRows, ...]:
    from hpattn_dist.healpix import check_nside, npix2nside
    from hpattn_dist.local.windows import check_window, check_window_fits, window_cells

    nside = check_nside(npix2nside(sum(sizes)), nest=True)
    window_nside = check_window(window_nside, mode)
    c = check_window_fits(nside, window_nside)
    cells = window_cells(window_nside, mode)  # [N_c, K], -1 = no such neighbour
    starts = torch.tensor(offsets(sizes), dtype=torch.int64)
    stops = starts + torch.tensor(sizes, dtype=torch.int64)
    received, sent = [0] * len(sizes), torch.zeros(len(sizes), dtype=torch.int64)
    for s, (a, b) in enumerate(zip(starts.tolist(), stops.tolist())):
        if b <= a:
            continue
        units = cells[a // c:(b - 1) // c + 1]
        window = torch.unique(units[units >= 0])  # the cells whose keys rank s reads
        lo, hi = window[:, None] * c, window[:, None] * c + c  # [W, 1] against every rank's [P]
        overlap = (torch.minimum(hi, stops) - torch.maximum(lo, starts)).clamp(min=0).sum(dim=0)  # [P]
        received[s] = window.numel() * c - int(overlap[s])
        overlap[s] = 0
        sent += overlap
    return tuple(HaloRows(rv, int(sd)) for rv, sd in zip(received, sent))
