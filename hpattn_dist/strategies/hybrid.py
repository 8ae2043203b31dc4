"""Hybrid (2D) attention: Ulysses inside a sub-group x ring across sub-groups.

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
import torch.distributed as dist
from torch import Tensor

from hpattn_dist.comm.groups import all_gather_ints, dtype_code, resolve_group, validated_signature
from hpattn_dist.kernels import resolve_dropout_seed
from hpattn_dist.mesh import hybrid_groups_for
from hpattn_dist.strategies.ring import ring_attention
from hpattn_dist.strategies.ulysses import (
    check_heads_divisible,
    gather_heads,
    gather_pixels,
    scatter_heads,
)
from hpattn_dist.validation import check_dropout_p, check_qkv, key_bias_from_mask

__all__ = ["hybrid_attention", "hybrid_attention_over_group"]


def hybrid_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    ulysses_group: Optional[dist.ProcessGroup],
    ring_group: Optional[dist.ProcessGroup],
    backend: str = "auto",
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    key_mask: Optional[Tensor] = None,
    key_bias: Optional[Tensor] = None,
    dropout_seed: Optional[int] = None,
) -> Tensor:
    r"""Exact softmax attention over the pixels of all U * R ranks: Ulysses x ring.

    Same contract as :func:`~hpattn_dist.strategies.ring.ring_attention`, with the pixel shards
    laid out as in Note [hybrid layout] (build the groups with
    :func:`hpattn_dist.mesh.build_hybrid_groups`, or take them from a ``DeviceMesh``). See Note
    [hybrid schedule].

    Args:
        q, k, v: this rank's shard ``[B, H, N_r, D]``; ``N_r`` may differ between ranks.
            H must be divisible by U.
        ulysses_group: the ranks that split heads (size U).
        ring_group: the ranks with this rank's Ulysses index, one per Ulysses group (size R).
        backend, dropout_p, scale, key_mask, key_bias, dropout_seed: as for ``ring_attention``.

    Returns:
        ``[B, H, N_r, D]`` in the dtype of ``q``.

    Raises:
        ValueError: (on every rank of the group concerned) H not divisible by U; ranks of a group
            that disagree on shapes, dtype, masking or dropout; ring members with different
            Ulysses ranks or degrees (groups that do not form a grid); bad arguments.
    """
    u_info = resolve_group(ulysses_group, "ulysses_group")
    r_info = resolve_group(ring_group, "ring_group")
    with validated_signature(u_info, "hybrid_attention") as sig:
        check_qkv(q, k, v, scale)
        check_dropout_p(dropout_p)
        bias = key_bias_from_mask(q, key_mask, key_bias)
        batch, heads, n_local, head_dim = q.shape
        check_heads_divisible(heads, u_info.world_size, "hybrid_attention", "ulysses_group")
        sig.set(
            {
                "B": batch, "H": heads, "D": head_dim, "dtype": dtype_code(q.dtype),
                "bias_heads": -1 if bias is None else bias.shape[1],
                "dropout_ppm": int(round(dropout_p * 1e6)), "ring_size": r_info.world_size,
            },
            (n_local, resolve_dropout_seed(dropout_p, dropout_seed)),
            q.device,
        )
    sizes = [row[0] for row in sig.per_rank]
    # Ulysses rank 0's seed here; ring_attention then takes ring rank 0's, i.e. global rank 0's.
    seed = sig.per_rank[0][1]
    _check_grid(u_info.rank, u_info.world_size, r_info, q)
    heads_local = heads // u_info.world_size
    mask_h = None
    if key_bias is None and key_mask is not None:
        # A bare mask travels as a mask (1 byte per key), so the ring can drop fully masked keys.
        q_h, k_h, v_h, bias_h = scatter_heads(q, k, v, None, u_info, sizes, "hybrid")
        mask_h = gather_pixels(key_mask.to(torch.uint8), u_info, sizes, "hybrid.mask").bool()
    else:
        q_h, k_h, v_h, bias_h = scatter_heads(q, k, v, bias, u_info, sizes, "hybrid")
        if bias_h is not None and bias_h.shape[1] == 1:
            bias_h = bias_h[:, 0]  # [B, M_i]: ring_attention's head-shared key_bias form
    out_h = ring_attention(q_h, k_h, v_h, r_info.group, backend=backend, dropout_p=dropout_p,
                           scale=scale, key_mask=mask_h, key_bias=bias_h,
                           head_offset=u_info.rank * heads_local, dropout_seed=seed)
    return gather_heads(out_h, u_info, sizes, "hybrid.out")


def _check_grid(u_rank: int, u_size: int, r_info, q: Tensor) -> None:
    """Every ring member must have the same Ulysses rank and degree (one tiny all-gather)."""
    rows = all_gather_ints([u_rank, u_size], r_info, q.device)
    if any(row != rows[0] for row in rows):
        table = "; ".join(f"ring rank {i}: ulysses rank {a} of {b}" for i, (a, b) in enumerate(rows))
        raise ValueError(
            "hybrid_attention: ulysses_group and ring_group do not form a grid (the members of a "
            f"ring group must share their Ulysses rank and degree): {table}. "
            "Build them with hpattn_dist.mesh.build_hybrid_groups."
        )


def hybrid_attention_over_group(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: Optional[dist.ProcessGroup] = None,
    *,
    ulysses_degree: Optional[int] = None,
    **kwargs,
) -> Tensor:
    """:func:`hybrid_attention` over ``group`` split as U = ``ulysses_degree`` x R (Note [hybrid
    layout]); the sub-groups are created on the first call (collectively, by every process) and
    cached. The form the layers call through
    :func:`~hpattn_dist.strategies.sharded_attention`.

    Raises:
        ValueError: ``ulysses_degree`` missing, not a positive int or not dividing the group size.
    """
    if ulysses_degree is None:
        raise ValueError("strategy 'hybrid' over one process group needs ulysses_degree=U (a "
                         "divisor of the group size and of the head count), or use strategy='auto'")
    if resolve_group(group).world_size == 1:
        # A group of one (or no torch.distributed): nothing to split.
        return ring_attention(q, k, v, group, **kwargs)
    groups = hybrid_groups_for(group, ulysses_degree)
    return hybrid_attention(q, k, v, ulysses_group=groups.ulysses_group,
                            ring_group=groups.ring_group, **kwargs)
