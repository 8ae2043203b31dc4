"""The Ulysses (head-parallel) executor: all-to-all to whole heads, local full attention, and back.

Legend: B batch, H heads, D head dim, P ranks in the group, r this rank, h = H / P heads per rank,
N_r pixels on rank r (ranks may differ, zero included), N = sum of N_r.

Note [ulysses schedule]
    Forward::

        q, k, v [B, H, N_r, D]
            --one all-to-all (scatter heads, gather pixels)--> 3 x [B, h, N, D]   heads r*h .. r*h+h-1
            --local attention over all N keys (one block, same kernel dispatch as the ring)-->
        out [B, h, N, D] --all-to-all (scatter pixels, gather heads)--> [B, H, N_r, D]

    Both all-to-alls pack and unpack with one copy each (Note [head exchange layout] in
    ``comm/head_exchange.py``).

    Pixels arrive in group-rank order, so the global pixel index of a key is its position in the
    gathered sequence, exactly as in the ring (:func:`~hpattn_dist.strategies.ring.run_ring`); with the
    head offset ``r * h`` the position-keyed dropout mask (Note [position-keyed dropout]) is the
    ring's, so results do not depend on the strategy or on P.

    A key bias ``[B, H, N_r]`` travels like q (-> ``[B, h, N]``); a head-shared bias ``[B, 1, N_r]``
    is all-gathered to ``[B, 1, N]`` (:func:`~hpattn_dist.comm.head_exchange.gather_pixels`).

    Backward: autograd through the two all-to-alls (Note [all-to-all adjoint]) and the local
    attention Function, whose backward uses the saved final lse (no recomputation).

Communication per rank (bytes, itemsize s; exact formulas in :mod:`hpattn_dist.strategies.auto`):
forward ``s * B * D * (3 * (H - h) * N_r + h * (N - N_r))``, backward
``s * B * D * ((H - h) * N_r + 3 * h * (N - N_r))``; with equal shards each is
``4 * (P - 1) / P * B * H * N_r * D * s``.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from hpattn_dist.comm.head_exchange import heads_to_pixels, qkv_to_heads
from hpattn_dist.kernels.local import local_attention
from hpattn_dist.strategies.plan import AttentionPlan

__all__ = ["run_ulysses"]


def run_ulysses(plan: AttentionPlan, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
                key_mask: Optional[Tensor] = None) -> Tensor:
    """Execute ``plan`` head-parallel over its Ulysses group (Note [ulysses schedule]).

    ``q, k, v``: ``[B, H, N_r, D]`` (k, v ``[B, H, K_r, D]`` for cross-attention, Note
    [cross-grid plan]); ``bias``: ``[B, H|1, K_r]`` in the accumulation dtype or None (a key mask
    is already folded into it). Returns ``[B, H, N_r, D]`` in q's dtype.
    """
    info, sizes = plan.ulysses_group, list(plan.ulysses_sizes)
    q_h, k_h, v_h, bias_h = qkv_to_heads(q, k, v, bias, info, sizes, "ulysses",
                                         key_sizes=list(plan.key_ulysses_sizes),
                                         grads_anywhere=plan.grads_anywhere)
    out_h = local_attention(q_h, k_h, v_h, bias_h, plan.kernel, plan.scale, plan.dropout_p,
                            plan.seed, head_offset=plan.head_offset)
    return heads_to_pixels((out_h,), info, sizes, "ulysses.out")[0]
