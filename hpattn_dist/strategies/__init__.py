"""Sequence-parallel attention strategies (each a ``torch.autograd.Function`` with its backward).

:func:`sharded_attention` is the one factory the layers call; each strategy module registers its
functional entry point in :data:`STRATEGIES`:

===========  ===========================================================================
name         entry point ``(q, k, v, group, **kwargs)``
===========  ===========================================================================
``ring``     :func:`~hpattn_dist.strategies.ring.ring_attention`
``ulysses``  :func:`~hpattn_dist.strategies.ulysses.ulysses_attention` (H divisible by P)
``hybrid``   :func:`~hpattn_dist.strategies.hybrid.hybrid_attention_over_group`; needs the
             keyword ``ulysses_degree=U`` and creates/caches the sub-groups on first use
``auto``     :func:`~hpattn_dist.strategies.auto.auto_attention` (communication-volume model)
===========  ===========================================================================
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch.distributed as dist
from torch import Tensor

from hpattn_dist.strategies.auto import auto_attention, choose_strategy
from hpattn_dist.strategies.hybrid import hybrid_attention, hybrid_attention_over_group
from hpattn_dist.strategies.ring import ring_attention
from hpattn_dist.strategies.ulysses import ulysses_attention

STRATEGIES: dict[str, Callable[..., Tensor]] = {
    "ring": ring_attention,
    "ulysses": ulysses_attention,
    "hybrid": hybrid_attention_over_group,
    "auto": auto_attention,
}


def check_strategy_name(strategy: str) -> None:
    """Raise ``ValueError`` unless ``strategy`` names a registered strategy."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {tuple(STRATEGIES)}, got {strategy!r}")


def sharded_attention(
    strategy: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: Optional[dist.ProcessGroup] = None,
    **kwargs: Any,
) -> Tensor:
    """Attention over a pixel dimension sharded across ``group`` with the named strategy.

    ``q, k, v``: ``[B, H, N_r, D]``; keyword arguments (``backend``, ``dropout_p``, ``scale``,
    ``key_mask``, ``key_bias``, and ``ulysses_degree`` for ``"hybrid"``) go to the strategy's
    functional API. Returns ``[B, H, N_r, D]``.
    """
    check_strategy_name(strategy)
    return STRATEGIES[strategy](q, k, v, group, **kwargs)


__all__ = [
    "STRATEGIES",
    "auto_attention",
    "check_strategy_name",
    "choose_strategy",
    "hybrid_attention",
    "hybrid_attention_over_group",
    "ring_attention",
    "sharded_attention",
    "ulysses_attention",
]
