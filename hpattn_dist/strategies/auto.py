r"""Automatic choice between ring, Ulysses and hybrid attention from a communication-volume model.

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

Note [auto agreement]
    The choice depends on H and the dtype, which are local to each rank; ranks that disagree
    (a bug in the caller) must raise together, not enter different collectives. The choice is
    made inside the one agreement of the call (Note [one agreement per call]) and is part of its
    signature, so ranks that chose differently raise "called with different signatures" on every
    rank before any data moves, and ``auto`` costs exactly what the chosen strategy costs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from hpattn_dist.precision import acc_dtype

__all__ = [
    "CommVolume",
    "StrategyChoice",
    "choose_strategy",
    "communication_volume",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CommVolume:
    """Bytes one process sends (Note [communication volume])."""

    forward: int
    backward: int

    @property
    def total(self) -> int:
        return self.forward + self.backward


@dataclass(frozen=True)
class StrategyChoice:
    """Outcome of :func:`choose_strategy`.

    Attributes:
        strategy: ``"ring"``, ``"ulysses"`` or ``"hybrid"``.
        ulysses_degree: U (1 for ring, P for Ulysses).
        cost: modelled bytes per rank in units of ``s * X`` (Note [communication volume]).
    """

    strategy: str
    ulysses_degree: int
    cost: float


def _strategy_name(ulysses_degree: int, group_size: int) -> str:
    if ulysses_degree == 1:
        return "ring"
    return "ulysses" if ulysses_degree == group_size else "hybrid"


def _degree_for(strategy: str, group_size: int, ulysses_degree: Optional[int]) -> int:
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
    u_deg = _degree_for(strategy, p, ulysses_degree)
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


def _model_cost(ulysses_degree: int, group_size: int, acc_ratio: float, backward: bool) -> float:
    """Equal-shard bytes per rank in units of ``s * X`` (Note [communication volume])."""
    u_deg, r_deg = ulysses_degree, group_size // ulysses_degree
    one_way = 4 * (u_deg - 1) / u_deg + 2 * (r_deg - 1)
    if not backward:
        return one_way
    return 2 * one_way + (2 * r_deg * acc_ratio if r_deg > 1 else 0.0)


_logged: set = set()


def choose_strategy(
    heads: int,
    group_size: int,
    *,
    dtype: torch.dtype = torch.float32,
    backward: bool = True,
) -> StrategyChoice:
    """The strategy that sends the fewest bytes per rank under Note [communication volume].

    Candidates are every Ulysses degree U that divides both ``group_size`` (P) and ``heads`` (H):
    U = 1 is ``"ring"``, U = P ``"ulysses"``, anything else ``"hybrid"``; ties go to the smaller U
    (the ring's transfers overlap with compute). The first time a given decision is made in this
    process it is logged at INFO level on ``hpattn_dist.strategies.auto``.

    Args:
        heads: H. group_size: P. dtype: of q/k/v (sets s and a). backward: count the backward too.

    Raises:
        ValueError: non-positive ``heads`` or ``group_size``.
    """
    for name, value in (("heads", heads), ("group_size", group_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    acc_ratio = torch.empty((), dtype=acc_dtype(dtype)).element_size() / itemsize
    degrees = [u for u in range(1, group_size + 1) if group_size % u == 0 and heads % u == 0]
    costs = {u: _model_cost(u, group_size, acc_ratio, backward) for u in degrees}
    best = min(degrees, key=lambda u: (costs[u], u))
    choice = StrategyChoice(_strategy_name(best, group_size), best, costs[best])
    key = (heads, group_size, dtype, backward, choice)
    if key not in _logged:
        _logged.add(key)
        table = ", ".join(f"U={u}: {c:.3g}" for u, c in costs.items())
        logger.info(
            "hpattn_dist auto strategy: H=%d heads over P=%d ranks (%s) -> %s (ulysses_degree=%d); "
            "modelled bytes per rank in units of itemsize*B*H*N_r*D: %s",
            heads, group_size, dtype, choice.strategy, best, table,
        )
    return choice
