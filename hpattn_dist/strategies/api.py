"""The public functional API and the one door behind it: plan at the door, then execute.

Every entry point (the functions below and the layers) builds an
:class:`~hpattn_dist.attention_spec.AttentionSpec` of its options and goes through :func:`attend`,
and every call of it through registered operators: windowed attention through
``hpattn::window_attention_fwd`` (:mod:`hpattn_dist.local.ops`), every other call through
``hpattn::attention_fwd`` (:mod:`hpattn_dist.strategies.ops`, Note [attention as one op]), whose
body is the door (:func:`~hpattn_dist.strategies.plan.plan_attention`: the checks and the one
agreement, Note [one agreement per call]) and the strategy the plan names:

===========  ====================================================================================
strategy     execution
===========  ====================================================================================
``ring``     the ring Function's body (K/V blocks rotate, Note [ring schedule])
``ulysses``  the head exchange, one block over every pixel, and back (Note [ulysses schedule])
``hybrid``   the head exchange over sub-groups of U ranks, the ring across them (Note [hybrid
             schedule])
``auto``     the planner's choice among the three (:func:`~hpattn_dist.strategies.auto.choose_strategy`)
===========  ====================================================================================

Arguments the ops cannot take are refused in one place, on every rank (Note [what the attention
op cannot take] in :mod:`hpattn_dist.strategies.ops`).

Legend: B batch, H heads, D head dim, P ranks in the group, N_r pixels on rank r.
"""

from __future__ import annotations

from typing import Optional, Unpack

import torch.distributed as dist
from torch import Tensor

from hpattn_dist.attention_spec import AttentionOptions, AttentionSpec, check_option_names
from hpattn_dist.local.ops import op_window_attention
from hpattn_dist.replicas import LayerFacts, LayerRef
from hpattn_dist.strategies.call import op_attention

__all__ = ["attend", "auto_attention", "hybrid_attention", "ring_attention", "ring_cross_attention", "sharded_attention",
           "ulysses_attention"]


def sharded_attention(
    strategy: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: Optional[dist.ProcessGroup] = None,
    *,
    ulysses_degree: Optional[int] = None,
    layer: "Optional[LayerFacts | LayerRef]" = None,
    cross: bool = False,
    window_nside: Optional[int] = None,
    mode: str = "neighbourhood",
    **options: Unpack[AttentionOptions],
) -> Tensor:
    """Attention over a pixel dimension sharded across ``group`` with the named strategy: the one
    door every entry point and layer calls (with the fields of an
    :class:`~hpattn_dist.attention_spec.AttentionSpec`).

    ``q, k, v``: ``[B, H, N_r, D]``; ``options``: :class:`~hpattn_dist.attention_spec.AttentionOptions`;
    ``ulysses_degree`` (U, a divisor of P and H) for ``"hybrid"``, whose sub-groups are
    created on the first call (collectively, by every process; see
    :func:`hpattn_dist.mesh.hybrid_groups_for`) and cached. ``layer``: the calling layer's facts
    (:class:`~hpattn_dist.replicas.LayerFacts`, or a :class:`~hpattn_dist.replicas.LayerRef` to take
    them from), checked in the same agreement; the functions
    below pass none, so they accept any total pixel count N (point sets as well as HEALPix
    fields). ``cross``: queries and keys on different grids, as for :func:`ring_cross_attention`
    (with any strategy). ``window_nside``, ``mode``: the locality option of
    :func:`ring_cross_attention` (``cross=True``) or the windows of
    :func:`~hpattn_dist.local.healpix_local_attention` (self-attention): the halo path of Note
    [local attention plan], for strategies ``"ring"`` and ``"auto"`` only. Returns ``[B, H, N_r, D]``.

    Raises:
        ValueError: an unknown strategy, ``ulysses_degree`` with a strategy other than
            ``"hybrid"`` (or missing for it), a window with a head-parallel strategy, and
            everything :func:`ring_attention` raises.
    """
    spec, key_mask, key_bias = AttentionSpec.from_options(
        "sharded_attention", options, strategy=strategy, ulysses_degree=ulysses_degree, cross=cross,
        window_nside=window_nside, mode=mode)
    return attend(spec, q, k, v, group, key_mask=key_mask, key_bias=key_bias, layer=layer)


def attend(spec: AttentionSpec, q: Tensor, k: Tensor, v: Tensor, group: Optional[dist.ProcessGroup] = None, *,
           key_mask: Optional[Tensor] = None, key_bias: Optional[Tensor] = None,
           layer: "Optional[LayerFacts | LayerRef]" = None) -> Tensor:
    """The one door: every entry point and layer calls it with its :class:`~hpattn_dist.attention_spec.AttentionSpec`
    (arguments as for :func:`sharded_attention`). The strategy, which routes the call, is checked
    here, before any exchange; every other option inside the call's one agreement
    (:meth:`~hpattn_dist.attention_spec.AttentionSpec.check`, Note [fail together])."""
    spec.check_strategy()
    if spec.window_nside is not None:
        return op_window_attention(spec, q, k, v, group, key_mask=key_mask, key_bias=key_bias, layer=layer,
                                   what=spec.entry_point if layer is None else layer.name)
    return op_attention(spec, q, k, v, group, key_mask=key_mask, key_bias=key_bias, layer=layer)


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: Optional[dist.ProcessGroup] = None,
    **options: Unpack[AttentionOptions],
) -> Tensor:
    r"""Exact softmax attention of this rank's queries over the keys of EVERY rank in ``group``.

    Computes, for this rank's shard, ``softmax(Q K^T * scale + bias) V`` where K and V are the
    concatenation (in group-rank order) of every rank's ``k`` and ``v``. Differentiable w.r.t.
    ``q``, ``k``, ``v`` and ``key_bias``. See Note [ring schedule] in
    :mod:`hpattn_dist.strategies.ring` for the algorithm.

    Args:
        q, k, v: this rank's shard ``[B, H, N_r, D]``; ``N_r`` may differ between ranks (zero too).
        group: the process group that shards the pixels (None = WORLD, or a single process when
            torch.distributed is not initialised).
        **options: the keyword arguments every attention function shares, ``backend``,
            ``dropout_p``, ``scale``, ``key_mask`` (``[B, N_r]``), ``key_bias`` and
            ``dropout_seed``: :class:`~hpattn_dist.attention_spec.AttentionOptions`.

    Returns:
        ``[B, H, N_r, D]`` in the dtype of ``q``.

    Raises:
        ValueError: bad shapes, dtypes, devices, ``dropout_p`` or ``backend``; a group this process
            is not in; or (on every rank) ranks that disagree on B, H, D, dtype, scale or masking.

    Communication: one 320-byte ``all_gather`` (shapes, Note [fail together]) plus P - 1 K/V transfers of
    ``2 * B * H * M_src * D`` elements per forward, where ``M_src`` counts the keys of the source
    rank that are unmasked in at least one batch element (Note [masked key compaction]); the
    backward adds P - 1 K/V transfers and P fp32 dK/dV transfers.
    """
    check_option_names("ring_attention", options)
    return sharded_attention("ring", q, k, v, group, **options)


def ring_cross_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: Optional[dist.ProcessGroup] = None,
    *,
    window_nside: Optional[int] = None,
    mode: str = "neighbourhood",
    **options: Unpack[AttentionOptions],
) -> Tensor:
    r"""Exact cross-attention: this rank's queries over the keys of EVERY rank, where queries and
    keys live on two grids (or point sets) sharded independently; optionally only over the keys
    of a window (``window_nside``).

    Computes, for this rank's queries, ``softmax(q K^T * scale + bias) V`` where K and V are the
    concatenation (in group-rank order) of every rank's ``k`` and ``v``. The ring schedule of
    :func:`ring_attention` with two shard tables (Note [cross-grid plan] in
    :mod:`hpattn_dist.strategies.plan`). For head parallelism use
    ``sharded_attention("ulysses" | "hybrid" | "auto", ..., cross=True)`` (or the layer
    :class:`~hpattn_dist.cross.DistributedSpatialCrossAttention`), which needs no equal lengths either.

    Args:
        q: this rank's queries ``[B, H, Nq_r, D]``.
        k, v: this rank's keys and values ``[B, H, Nk_r, D]``; ``Nq_r`` and ``Nk_r`` are independent
            of each other and may differ between ranks (zero included).
        group: as for :func:`ring_attention`.
        window_nside: None (every query sees every key), or the locality option for mappers:
            both grids are NESTED HEALPix grids (``Nq = 12 * nside_q**2``, ``Nk = 12 *
            nside_k**2``, power-of-two nsides) and query pixel ``i`` sees only the keys whose cell
            ``j // c_k`` of the ``window_nside`` grid lies in the window of its cell ``i // c_q``
            (``c = (nside / window_nside)**2`` per grid; ``window_nside`` a power of two at most
            ``min(nside_q, nside_k)``). A query with no allowed unmasked key gets zeros. Keys
            then travel by ONE halo exchange of the rows some local query can see, not the ring
            (Note [local attention plan] in :mod:`hpattn_dist.local.attention`); count it with
            :func:`hpattn_dist.local.window_traffic`.
        mode: the window, ``"cell"`` (the query's parent cell) or ``"neighbourhood"`` (that cell
            and its 8 (7, 6) neighbours), as for :func:`~hpattn_dist.local.healpix_local_attention`.
        **options: :class:`~hpattn_dist.attention_spec.AttentionOptions`, with the keys' ``Nk_r``
            (``key_mask [B, Nk_r]``, ``key_bias [B, Nk_r]`` or ``[B, H, Nk_r]``). The dropout mask
            is keyed by (global query index, global key index), each counted on its own grid.

    Returns:
        ``[B, H, Nq_r, D]`` in the dtype of ``q``.

    Raises:
        ValueError: as for :func:`ring_attention` (on every rank), with q compared to k and v in
            B, H, D, dtype and device only; with ``window_nside`` (on every rank): a bad window
            or mode, totals that are no NESTED HEALPix grids, a window cell finer than a pixel
            of either grid.

    Communication: one 320-byte ``all_gather`` (shapes), then P - 1 K/V transfers of
    ``2 * B * H * Mk_src * D`` elements per forward (``Mk_src``: the keys of the source rank left
    after masked-key compaction); the backward adds P - 1 K/V transfers and P fp32 dK/dV
    transfers. Queries never travel. With ``window_nside``: one ``all_to_all`` of the halo rows
    forward (``cross.halo.forward``) and one of their gradients backward (``cross.halo.backward``).

    Example (a mapper from nside 64 to nside 16 where each latent pixel sees its parent cell of
    nside 8 and the neighbouring cells)::

        >>> out = ring_cross_attention(q_latent, k_data, v_data, window_nside=8, mode="neighbourhood")
    """
    check_option_names("ring_cross_attention", options)
    return sharded_attention("ring", q, k, v, group, cross=True, window_nside=window_nside, mode=mode,
                             **options)


def ulysses_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: Optional[dist.ProcessGroup] = None,
    **options: Unpack[AttentionOptions],
) -> Tensor:
    r"""Exact softmax attention over every rank's pixels, computed head-parallel (DeepSpeed-Ulysses).

    Same contract and shard layout as :func:`ring_attention`; see Note [ulysses schedule] in
    :mod:`hpattn_dist.strategies.ulysses` for the algorithm. Differentiable w.r.t. q, k, v and
    ``key_bias``.

    Args:
        q, k, v: this rank's shard ``[B, H, N_r, D]``; H must be divisible by P.
        group, **options: as for :func:`ring_attention` (the dropout mask is the ring's:
            position-keyed).

    Returns:
        ``[B, H, N_r, D]`` in the dtype of ``q``.

    Raises:
        ValueError: (on every rank) H not divisible by P, naming both; ranks that disagree on B,
            H, D, dtype, masking or dropout; bad shapes, dtypes, ``dropout_p`` or ``backend``.

    Communication: one small all-gather (shapes), then two all-to-alls forward (q/k/v in, out
    back) and two backward; bytes per rank in :mod:`hpattn_dist.strategies.ulysses`.
    """
    check_option_names("ulysses_attention", options)
    return sharded_attention("ulysses", q, k, v, group, **options)


def hybrid_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    ulysses_group: Optional[dist.ProcessGroup],
    ring_group: Optional[dist.ProcessGroup],
    **options: Unpack[AttentionOptions],
) -> Tensor:
    r"""Exact softmax attention over the pixels of all U * R ranks: Ulysses x ring.

    Same contract as :func:`ring_attention`, with the pixel shards
    laid out as in Note [hybrid layout] (build the groups with
    :func:`hpattn_dist.mesh.build_hybrid_groups`, or take them from a ``DeviceMesh``). See Note
    [hybrid schedule].

    Args:
        q, k, v: this rank's shard ``[B, H, N_r, D]``; ``N_r`` may differ between ranks.
            H must be divisible by U.
        ulysses_group: the ranks that split heads (size U).
        ring_group: the ranks with this rank's Ulysses index, one per Ulysses group (size R).
        **options: as for :func:`ring_attention`.

    Returns:
        ``[B, H, N_r, D]`` in the dtype of ``q``.

    Raises:
        ValueError: (on every rank of the group concerned) H not divisible by U; ranks of a group
            that disagree on shapes, dtype, masking or dropout; ring members with different
            Ulysses ranks or degrees (groups that do not form a grid); bad arguments; a pair of
            groups covering fewer processes than WORLD that :func:`~hpattn_dist.mesh.build_hybrid_groups`
            did not build (no group of exactly their ranks is known to agree over).
    """
    spec, key_mask, key_bias = AttentionSpec.from_options("hybrid_attention", options, strategy="hybrid")
    return op_attention(spec, q, k, v, None, key_mask=key_mask, key_bias=key_bias,
                        groups=(ulysses_group, ring_group))


def auto_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: Optional[dist.ProcessGroup] = None,
    **options: Unpack[AttentionOptions],
) -> Tensor:
    """Attention over ``group`` with the strategy :func:`~hpattn_dist.strategies.auto.choose_strategy`
    picks for q's head count, the group size and q's dtype (forward + backward model). Same
    arguments, shapes and result as :func:`ring_attention`, and the same communication as the
    chosen strategy: the choice is made inside the one agreement (Note [one agreement per call]).
    A hybrid choice creates its sub-groups on the first call (collective, every process; see
    :func:`hpattn_dist.mesh.hybrid_groups_for`).
    """
    check_option_names("auto_attention", options)
    return sharded_attention("auto", q, k, v, group, **options)
