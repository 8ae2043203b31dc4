"""Local (windowed) attention over a sharded HEALPix field: the door and the public functions.

Legend: B batch, H heads, D head dim, P ranks in the group, r this rank, N_r pixels on rank r
(any contiguous NESTED split, zero included), N = sum of N_r = 12 * nside**2, c pixels per cell
of the window grid. Across two grids: Nq_r / Nk_r queries / keys on rank r.

Query pixel ``i`` attends to the keys of the cells of its window (:mod:`hpattn_dist.local.windows`):
``softmax(q_i K_w^T * scale + bias_w) V_w`` over ``w = window(i // c)``; a query whose window
keys are all masked gets a zero output.

A call is ONE registered op, ``hpattn::window_attention_fwd`` (:mod:`hpattn_dist.local.ops`),
whose body is the door (:func:`~hpattn_dist.local.agreement.agree`: the checks and the one
agreement, Note [fail together]), the plan of both splits
(:func:`~hpattn_dist.local.plan.cached_plan`, Note [local attention plan]) and the executor
(:mod:`hpattn_dist.local.execute`).

Dropout keeps Note [position-keyed dropout]: the decision for score (b, h, i, j) hashes the GLOBAL
query and key pixels, so the result does not depend on P; a call's folded windows carry their
pixels (:class:`~hpattn_dist.kernels.dropout.FoldedIndex`), so dropout costs no extra kernel call.
"""

from __future__ import annotations

from typing import Optional, Unpack

import torch.distributed as dist
from torch import Tensor

from hpattn_dist.attention_spec import AttentionOptions, AttentionSpec
from hpattn_dist.local.agreement import WindowCall, agree
from hpattn_dist.local.ops import op_window_attention
from hpattn_dist.local.plan import plan_local_attention
from hpattn_dist.replicas import LayerFacts

__all__ = ["WindowCall", "agree", "healpix_local_attention", "plan_local_attention"]


def healpix_local_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: Optional[dist.ProcessGroup] = None,
    *,
    window_nside: int,
    mode: str = "neighbourhood",
    layer: Optional[LayerFacts] = None,
    **options: Unpack[AttentionOptions],
) -> Tensor:
    r"""Windowed attention on a HEALPix field whose NESTED pixels are sharded over ``group``.

    Query pixel ``i`` attends to the pixels of the cells in its window: its own cell of the
    ``window_nside`` grid (``mode="cell"``) or that cell and its 8 (7, 6) neighbours
    (``mode="neighbourhood"``), see :mod:`hpattn_dist.local.windows`. Differentiable w.r.t.
    ``q``, ``k``, ``v`` and ``key_bias``. Algorithm: Note [local attention plan].

    Args:
        q, k, v: this rank's shard ``[B, H, N_r, D]`` of a field in NESTED order, ranks holding
            contiguous ranges in group-rank order (any sizes, zero included; ``N = sum N_r``
            must be ``12 * nside**2`` with nside a power of two).
        group: the process group sharding the pixels (None = WORLD, or a single process).
        window_nside: resolution of the window grid, a power of two dividing nside; a cell holds
            ``(nside // window_nside)**2`` pixels.
        mode: ``"cell"`` or ``"neighbourhood"``.
        layer: the calling layer's facts (parameter fingerprint), checked in the same agreement
            (Note [replicated parameter check]).
        **options: :class:`~hpattn_dist.attention_spec.AttentionOptions` (``key_mask [B, N_r]``:
            a query whose window has no unmasked key gets a zero output and zero gradients).

    Returns:
        ``[B, H, N_r, D]`` in the dtype of ``q``.

    Raises:
        ValueError: (on every rank together) bad shapes, dtypes, ``window_nside``, ``mode``,
            ``dropout_p`` or ``backend``; a field that is not a NESTED HEALPix grid or whose
            nside ``window_nside`` does not divide; ranks that disagree on B, H, D, dtype, the
            window, masking or whether gradients are needed; for a ``layer``: parameters that
            differ between ranks.

    Communication: one 320-byte ``all_gather`` (Note [fail together]) and one ``all_to_all`` of
    the halo rows (``2 * B * H * D`` elements of K/V per row, plus ``B * Hb`` bias values when a
    mask or bias is given) forward; the same rows' gradients (accumulation dtype) backward.
    """
    spec, key_mask, key_bias = AttentionSpec.from_options("healpix_local_attention", options, window_nside=window_nside,
                                                          mode=mode)
    return op_window_attention(spec, q, k, v, group, key_mask=key_mask, key_bias=key_bias, layer=layer,
                               what="healpix_local_attention")
