"""Activation checkpointing that keeps the attention's result: :func:`checkpoint_context_fn`.

Note [checkpointing without replaying communication]
    ``torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)`` reruns the block's forward
    in the backward, and with it the attention's planning agreement and its whole forward
    communication (ring: the P - 1 K/V exchanges; Ulysses: the q/k/v all-to-all), and draws a new
    dropout seed unless the RNG state is preserved. Passed as ``context_fn``, this module's policy
    saves the outputs of the attention's operators (Note [attention as one op] in
    :mod:`hpattn_dist.strategies.ops`): ``hpattn::attention_fwd`` (the attention's output, the
    agreed plan, seed included, and the lse; for Ulysses / hybrid the head-layout q, k, v),
    and for Ulysses / hybrid ``hpattn::attention_heads`` (the head-layout output and lse) and
    ``hpattn::heads_to_pixels`` (the output), and for windowed attention (local, or cross-grid with
    a window) ``hpattn::window_attention_fwd`` (output, plan with the seed, lse, edge cells: Note
    [windowed attention as one op]), O(N/P) per rank each, and recomputes everything
    else (norms, projections, MLP) locally. The
    recomputed block therefore sends nothing, the backward sends exactly what an un-checkpointed
    block's backward sends, and dropout masks are those of the forward whatever
    ``preserve_rng_state`` says. A recompute that fails cannot hang the group: it communicates
    nothing.

Compared with the alternatives: plain ``checkpoint`` saves only the block input (least memory,
replays the forward communication); DeepSpeed's activation checkpointing (reentrant, RNG tracked)
behaves like plain ``checkpoint`` here; no checkpointing saves every activation.
"""

from __future__ import annotations


import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

import hpattn_dist.strategies.ops  # noqa: F401  (registers torch.ops.hpattn)
import hpattn_dist.local.ops  # noqa: F401  (registers torch.ops.hpattn.window_attention_*; after strategies)

__all__ = ["checkpoint_context_fn", "save_attention_policy"]


_ATTENTION_OPS = (torch.ops.hpattn.attention_fwd.default, torch.ops.hpattn.attention_heads.default,
                  torch.ops.hpattn.heads_to_pixels.default, torch.ops.hpattn.window_attention_fwd.default)


def save_attention_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective-checkpoint policy: MUST_SAVE the attention operators, recompute everything else."""
    if op in _ATTENTION_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_context_fn():
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` that keeps
    the attention's outputs (Note [checkpointing without replaying communication]).

    Example::

        >>> y = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False,
        ...                                       context_fn=hpattn_dist.checkpoint_context_fn)
    """
    return create_selective_checkpoint_contexts(save_attention_policy)
