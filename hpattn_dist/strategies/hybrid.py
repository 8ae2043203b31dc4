"""The hybrid (2D) executor: Ulysses inside a sub-group x ring across sub-groups.

Legend: B batch, H heads, D head dim, U Ulysses degree (size of ``ulysses_group``), R ring degree
(size of ``ring_group``), P = U * R, h = H / U, N_r pixels on this rank, M_i = pixels of Ulysses
group i (sum of its N_r), N = sum of M_i. Rank layout: Note [hybrid layout] in
:mod:`hpattn_dist.mesh` (shards in ring-index-major, Ulysses-index-minor order).

Note [hybrid schedule]
    ::

        q, k, v [B, H, N_r, D]
            --all-to-all over ulysses_group (scatter heads, gather pixels)--> [B, h, M_i, D]
            --ring attention over ring_group (K/V of the R Ulysses groups rotate)--> [B, h, M_i, D]
            --all-to-all over ulysses_group (scatter pixels, gather heads)--> [B, H, N_r, D]

    Every Ulysses rank u holds heads ``u*h .. u*h+h-1`` of its group's pixels; the members of one
    ring group share u, so the ring combines the same head slice over all N pixels. U = P is
    Ulysses (the ring has one member), U = 1 is the ring (the all-to-alls move nothing).
    Backward: autograd through the all-to-alls (Note [all-to-all adjoint]) and the ring's explicit
    backward (Note [ring schedule]).

Communication per rank (itemsize s, ring accumulators a): the Ulysses formulas with P -> U and
N -> M_i, plus the ring's over ring_group on blocks ``[B, h, M_i, D]``; exact formulas and their
equal-shard forms in :mod:`hpattn_dist.strategies.auto`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from hpattn_dist.comm.head_exchange import gather_pixels, heads_to_pixels, qkv_to_heads
from hpattn_dist.masks import key_bias_from_mask
from hpattn_dist.strategies.plan import AttentionPlan
from hpattn_dist.strategies.ring import run_ring

__all__ = ["run_hybrid"]


def run_hybrid(plan: AttentionPlan, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
               key_mask: Optional[Tensor]) -> Tensor:
    """Execute ``plan``: the Ulysses exchange over ``plan.ulysses_group``, the ring executor over
    ``plan.ring_group``, and back (Note [hybrid schedule]).

    ``q, k, v``: ``[B, H, N_r, D]`` (k, v ``[B, H, K_r, D]`` for cross-attention, Note
    [cross-grid plan]); ``bias``: ``[B, H|1, K_r]`` in the accumulation dtype or None;
    ``key_mask``: bool ``[B, K_r]`` or None. Returns ``[B, H, N_r, D]`` in q's dtype.
    """
    u_info, sizes, key_sizes = plan.ulysses_group, list(plan.ulysses_sizes), list(plan.key_ulysses_sizes)
    mask_h = None
    if plan.mask_travels:
        # A bare mask travels as a mask (1 byte per key), so the ring can drop fully masked keys.
        q_h, k_h, v_h, _ = qkv_to_heads(q, k, v, None, u_info, sizes, "hybrid", key_sizes=key_sizes,
                                        grads_anywhere=plan.grads_anywhere)
        mask_h = gather_pixels(key_mask.to(torch.uint8), u_info, key_sizes, "hybrid.mask").bool()
        bias_h = key_bias_from_mask(k_h, mask_h, None) if plan.use_bias else None
    else:
        q_h, k_h, v_h, bias_h = qkv_to_heads(q, k, v, bias, u_info, sizes, "hybrid", key_sizes=key_sizes,
                                             grads_anywhere=plan.grads_anywhere)
    out_h = run_ring(plan, q_h, k_h, v_h, bias_h, mask_h)  # [B, h, M_i, D]
    return heads_to_pixels((out_h,), u_info, sizes, "hybrid.out")[0]
