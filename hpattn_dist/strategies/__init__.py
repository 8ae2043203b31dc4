"""Sequence-parallel attention strategies (each a ``torch.autograd.Function`` with its backward).

:func:`sharded_attention` is the one factory the layers call; each strategy module registers its
functional entry point in :data:`STRATEGIES`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch.distributed as dist
from torch import Tensor

from hpattn_dist.strategies.ring import ring_attention

STRATEGIES: dict[str, Callable[..., Tensor]] = {"ring": ring_attention}


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
    ``key_mask``, ``key_bias``) go to the strategy's functional API. Returns ``[B, H, N_r, D]``.
    """
    check_strategy_name(strategy)
    return STRATEGIES[strategy](q, k, v, group, **kwargs)


__all__ = ["STRATEGIES", "check_strategy_name", "ring_attention", "sharded_attention"]
