"""What windowed attention sends and computes, against the global ring, per rank (planning only).

Legend: P ranks, r a rank, Nq / Nk query / key pixels (Nq_r / Nk_r on rank r), B batch, H heads,
D head dim, c_q / c_k pixels per window cell on the query / key grid, N_c = 12 * window_nside**2
cells, U_r the cells holding rank r's queries (its units), m the cells of a unit's window.

:func:`window_traffic` runs the planner of :mod:`hpattn_dist.local.plan` for every rank
(pure arithmetic, no process group) and reads off, per rank:

- the halo rows it receives and sends per forward (``cross.halo.forward`` / ``local.halo.forward``
  in :func:`~hpattn_dist.comm.counters.count_communication`, K/V only: a mask or bias adds
  ``B * Hb`` values to each row), against the global ring's: rank r receives every other rank's
  keys, ``Nk - Nk_r`` rows, and sends what :func:`~hpattn_dist.strategies.auto.communication_volume`
  counts for the ring over the key split (Note [communication volume]);
- the (query, key) pairs its kernels score, ``sum`` over its queries of the window's keys,
  against ``Nq_r * Nk``;
- the cell blocks (``c_q x c_k`` tiles) it computes, ``sum over U_r of m``, against the ring's
  ``U_r * N_c``.

The group's fractions skipped (``1 - windowed / ring`` of the totals) are on :class:`WindowTraffic`.
Without masks the forward's bytes equal the counters' exactly; the backward sends each received
row's gradient home (``rows_received`` rows per rank, in the accumulation dtype).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from hpattn_dist.comm.groups import offsets
from hpattn_dist.local.plan import plan_local_attention
from hpattn_dist.strategies.auto import communication_volume

__all__ = ["RankTraffic", "WindowTraffic", "window_traffic"]


@dataclass(frozen=True)
class RankTraffic:
    """One rank's forward traffic and work, windowed (halo) vs the global ring.

    Attributes:
        rank: the group rank.
        rows_received, rows_sent: halo K/V rows in and out per forward.
        bytes_received, bytes_sent: the same in bytes (``2 * B * H * D * itemsize`` per row).
        ring_rows_received, ring_rows_sent, ring_bytes_received, ring_bytes_sent: the global
            ring's forward for the same split (no masked-key compaction).
        pairs, all_pairs: (query, key) scores computed for this rank's queries, and ``Nq_r * Nk``.
        blocks, all_blocks: cell blocks computed (units x window cells), and ``U_r * N_c``.
    """

    rank: int
    rows_received: int
    rows_sent: int
    bytes_received: int
    bytes_sent: int
    ring_rows_received: int
    ring_rows_sent: int
    ring_bytes_received: int
    ring_bytes_sent: int
    pairs: int
    all_pairs: int
    blocks: int
    all_blocks: int


@dataclass(frozen=True)
class WindowTraffic:
    """Every rank's :class:`RankTraffic` and the group's fractions skipped."""

    ranks: tuple[RankTraffic, ...]

    def _skipped(self, done: str, every: str) -> float:
        total = sum(getattr(r, every) for r in self.ranks)
        return 1.0 - sum(getattr(r, done) for r in self.ranks) / total if total else 0.0

    @property
    def bytes_skipped(self) -> float:
        """Fraction of the ring's forward K/V bytes the halo exchange does not send (0 at P = 1)."""
        return self._skipped("bytes_sent", "ring_bytes_sent")

    @property
    def pairs_skipped(self) -> float:
        """Fraction of the ``Nq * Nk`` (query, key) scores not computed."""
        return self._skipped("pairs", "all_pairs")

    @property
    def blocks_skipped(self) -> float:
        """Fraction of the cell blocks (``U_r * N_c`` summed over ranks) not computed."""
        return self._skipped("blocks", "all_blocks")

    def as_dict(self) -> dict:
        return {"bytes_skipped": self.bytes_skipped, "pairs_skipped": self.pairs_skipped,
                "blocks_skipped": self.blocks_skipped, "ranks": [vars(r) for r in self.ranks]}


def window_traffic(q_sizes: Sequence[int], k_sizes: Optional[Sequence[int]], window_nside: int, mode: str, *,
                   batch: int = 1, heads: int = 1, head_dim: int = 1, itemsize: int = 4) -> WindowTraffic:
    """Per-rank halo traffic and work of windowed attention, against the global ring.

    Args:
        q_sizes: every rank's query pixels ``Nq_r`` (contiguous NESTED ranges, group-rank order).
        k_sizes: every rank's key pixels ``Nk_r``; None for self-attention (keys = queries).
        window_nside, mode: the window (:mod:`hpattn_dist.local.windows`).
        batch, heads, head_dim, itemsize: ``B, H, D`` and bytes per element of K/V.

    Raises:
        ValueError: what :func:`~hpattn_dist.local.plan.plan_local_attention` raises.
    """
    q_sizes = tuple(int(n) for n in q_sizes)
    keys = q_sizes if k_sizes is None else tuple(int(n) for n in k_sizes)
    p, n_k = len(q_sizes), sum(keys)
    row = 2 * batch * heads * head_dim * itemsize
    q_starts = offsets(q_sizes)
    out = []
    for r in range(p):
        plan = plan_local_attention(q_sizes, window_nside, mode, r, None if k_sizes is None else keys)
        c_q, c_k = plan.cell_pixels, plan.key_cell_pixels
        start, stop = q_starts[r], q_starts[r] + q_sizes[r]
        here = ((plan.units + 1) * c_q).clamp(max=stop) - (plan.units * c_q).clamp(min=start)  # queries per unit
        pairs = int((here * plan.window_sizes).sum()) * c_k
        blocks = int(plan.window_sizes.sum())
        ring_sent = communication_volume("ring", batch=batch, heads=heads, head_dim=head_dim, sizes=keys,
                                         rank=r, itemsize=itemsize).forward // row
        out.append(RankTraffic(
            rank=r, rows_received=plan.halo.rows_received, rows_sent=plan.halo.rows_sent,
            bytes_received=plan.halo.rows_received * row, bytes_sent=plan.halo.rows_sent * row,
            ring_rows_received=n_k - keys[r] if p > 1 else 0, ring_rows_sent=ring_sent,
            ring_bytes_received=(n_k - keys[r] if p > 1 else 0) * row, ring_bytes_sent=ring_sent * row,
            pairs=pairs, all_pairs=q_sizes[r] * n_k, blocks=blocks,
            all_blocks=plan.n_units * 12 * window_nside**2,
        ))
    return WindowTraffic(tuple(out))
