"""Sequence-parallel attention strategies: the planning door, the registered ops, the public functions.

=============  ==================================================================================
module         what lives there
=============  ==================================================================================
``plan``       :func:`~hpattn_dist.strategies.plan.plan_attention`: local checks, the ONE
               cross-rank agreement of a call, the frozen :class:`AttentionPlan`
``ops``        the registered ops every global call runs through (Note [attention as one op])
``call``       a call's arguments as the ops take them, the ops in sequence, and the one refusal
               of what they cannot take (Note [what the attention op cannot take])
``ring``       the ring's autograd Function, whose body the ops run (Note [ring schedule])
``ulysses``    Note [ulysses schedule]
``hybrid``     Note [hybrid schedule]: Ulysses exchange + the ring across sub-groups
``auto``       the communication-volume model behind ``strategy="auto"``
``api``        the public functions and the one factory, :func:`sharded_attention`
=============  ==================================================================================
"""

from __future__ import annotations

from hpattn_dist.strategies.api import (
    STRATEGIES,
    auto_attention,
    check_strategy_args,
    check_strategy_name,
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
