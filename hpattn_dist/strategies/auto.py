r"""Automatic choice between ring, Ulysses and hybrid attention from the communication-volume model.

Legend: H heads, P ranks in the group, U Ulysses degree (U | P, U | H), s the itemsize of q/k/v,
X = B * H * N_p * D (elements of one of q, k, v on this rank).

The bytes come from :mod:`hpattn_dist.cost_model.communication` (Note [communication volume]),
the one cost model that ``auto``, the capacity planner (``hpattn-dist plan``) and the tests read.

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

import torch

from hpattn_dist.cost_model.communication import (
    CommVolume, communication_volume, equal_shard_cost, strategy_name,
)
from hpattn_dist.precision import acc_dtype

__all__ = [
    "CommVolume",
    "StrategyChoice",
    "choose_strategy",
    "communication_volume",
]

logger = logging.getLogger(__name__)


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
    costs = {u: equal_shard_cost(u, group_size, acc_ratio, backward) for u in degrees}
    best = min(degrees, key=lambda u: (costs[u], u))
    choice = StrategyChoice(strategy_name(best, group_size), best, costs[best])
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
