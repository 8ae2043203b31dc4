"""Online-softmax merge of partial attention results.

Note [stable merge]
    Two partial results over disjoint key sets, ``(o_a, lse_a)`` and ``(o_b, lse_b)``, each
    normalised over its own keys, combine into the result over the union::

        lse = logaddexp(lse_a, lse_b)
        o   = exp(lse_a - lse) * o_a + exp(lse_b - lse) * o_b

    Both exponents are <= 0, so no exponential of a large positive difference is ever taken. Rows
    with no key on either side (``lse_a = lse_b = -inf``) keep ``o = 0`` and ``lse = -inf``
    instead of the NaN that ``-inf - -inf`` would give. Accumulators are float32 (float64 for
    float64 inputs); the caller casts the final output back to the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor


def merge_into(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    """Merge one block's ``(block_out, block_lse)`` into the accumulators, in place.

    Args:
        out: ``[B, H, N_q, D]`` accumulator (float32 / float64), updated in place.
        lse: ``[B, H, N_q]`` accumulator, same dtype, updated in place.
        block_out: ``[B, H, N_q, D]`` any floating dtype.
        block_lse: ``[B, H, N_q]``.
    """
    new_lse = torch.logaddexp(lse, block_lse)
    empty = new_lse == float("-inf")
    safe_lse = torch.where(empty, torch.zeros_like(new_lse), new_lse)
    w_old = torch.exp(lse - safe_lse).unsqueeze(-1)
    w_new = torch.exp(block_lse - safe_lse).unsqueeze(-1)
    out.mul_(w_old).add_(w_new * block_out.to(out.dtype))
    lse.copy_(new_lse)
