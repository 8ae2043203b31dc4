"""Sequence-parallel attention strategies: the planning door, the executors, the public functions.

=============  ==================================================================================
module         what lives there
=============  ==================================================================================
``plan``       :func:`~hpattn_dist.strategies.plan.plan_attention`: local checks, the ONE
               cross-rank agreement of a call, the frozen :class:`AttentionPlan`
``ring``       the ring executor and its autograd Function (Note [ring schedule])
``ulysses``    the Ulysses executor (Note [ulysses schedule])
``hybrid``     the hybrid executor: Ulysses exchange + ring executor (Note [hybrid schedule])
``auto``       the communication-volume model behind ``strategy="auto"``
``api``        the public functions and the one door, :func:`~hpattn_dist.strategies.api.attend`
=============  ==================================================================================
"""

from __future__ import annotations

from hpattn_dist.attention_spec import STRATEGIES, check_strategy_args, check_strategy_name
from hpattn_dist.strategies.api import (
    auto_attention,
    hybrid_attention,
    ring_attention,
    ring_cross_attention,
    sharded_attention,
    ulysses_attention,
)
from hpattn_dist.strategies.auto import choose_strategy

__all__ = [
    "STRATEGIES",
    "auto_attention",
    "check_strategy_args",
    "check_strategy_name",
    "choose_strategy",
    "hybrid_attention",
    "ring_attention",
    "ring_cross_attention",
    "sharded_attention",
    "ulysses_attention",
]
