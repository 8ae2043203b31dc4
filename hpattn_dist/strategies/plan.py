"""The door of every attention call: local checks, ONE cross-rank agreement, a frozen plan.

Legend: B batch, H heads, D head dim, P ranks of the group sharding the pixels, U Ulysses degree
(ranks that split heads), R = P / U ring degree, h = H / U, N_p pixels on grid position p, M_i
pixels of Ulysses group i (sum of its N_p).

Note [one agreement per call]
    Every strategy needs the same facts about its peers before it can move data: every rank's
    pixel count (uneven shards), how many keys survive masking (Note [masked key compaction]),
    whether a mask is left anywhere, the dropout seed of position 0, and that the ranks called
    with the same B, H, D, dtype, score scale, bias form, dropout and strategy.
    :func:`plan_attention` gathers them in ONE ``validated_signature`` over the group that shards
    the pixels (the parent group of a hybrid grid), with the local checks inside it so that a
    rank whose input is bad makes every rank raise (Note [fail together]). The result, an :class:`AttentionPlan`, is all the
    executors read: nothing below the door validates or agrees again.

    The strategy is part of the signature (:meth:`Signature.set`'s ``kind``), so ranks that chose
    differently (``strategy="auto"`` with different head counts, or different explicit
    strategies) raise "called with different signatures" on every rank instead of entering
    different collectives.

    Every rank's row also carries its place in the Ulysses x ring grid (Note [hybrid layout]):
    its Ulysses rank u, ring rank i and the global rank that opens each of its two groups. Ring
    (U = 1) and Ulysses (U = P) are the grid's two degenerate cases, so one derivation of sizes
    and offsets serves all three strategies, and a hybrid whose two groups do not form a grid is
    refused on every rank from the same rows.

    A layer adds its own facts to the same row (:class:`~hpattn_dist.replicas.LayerFacts`): a
    fingerprint of its replicated parameters and whether the shards must form a HEALPix field
    (Note [replicated parameter check] in ``replicas.py``); they are checked from the agreed rows,
    so ranks whose weights differ raise together at no extra collective.

Note [cross-grid plan]
    Cross-attention (queries on one grid, keys and values on another, ``cross=True``) is the same
    plan with two shard tables instead of one: every row carries its query count N_p and its key
    count (and the kept-key count derived from the keys), so the one agreement yields both. The
    executors read the query table for what stays with the queries (the Ulysses exchange of q
    and of the output, ``q_offset``: the global index of the first query, for the dropout mask)
    and the key table for what travels with the keys (the exchange of k, v and the bias, the ring
    block sizes ``kv_sizes``, ``k_offset``: the global index of the first key). Self-attention is
    the case where the two tables are equal. Nothing else changes: softmax over every key of every
    rank, the merge, masks and position-keyed dropout are indifferent to whether the query and key
    indices range over the same pixels. With ``window_nside`` (the locality option) a call never
    reaches this plan: the windowed op (:func:`~hpattn_dist.local.ops.op_window_attention`) agrees on both
    splits itself and plans a halo exchange (Note [local attention plan]).

Note [attention plans in a model call]
    A layer's call inside a converted model's agreed call (Note [one agreement per model call] in
    ``integrations/idx_flow/call_agreement.py``) can do without its own agreement: what the
    plan follows from is fixed by the call's key, and what changes from call to call is known
    at the call's start. So the registered op passes ``in_call``, and :func:`plan_attention`
    looks the layer's slot up (keyed by the layer's name and its calls so far in the model
    call). The first call with a key agrees as always and stores the agreed rows with this
    rank's own facts (everything in its row but the seed and the parameter sums); a later call
    runs the same local checks, compares its facts with the stored ones (a local
    ``RuntimeError`` if they differ: the model's shapes did not follow from its arguments) and
    derives the plan from the stored rows, with no exchange. The row's per-call values come
    from the model's call: the parameter fingerprint was compared for the WHOLE model at its
    start (the layer checks that its parameters are unchanged since, same storage and
    version), and the dropout seed is the call's derived seed, the same on every rank (Note
    [seeds in a model call] in ``comm/model_call.py``). The layer's settings (scale, dropout,
    backend, strategy) are in the call's row too, so a rank whose layer differs raises at the
    call's start. A key mask (its kept keys are data), a key bias, parameters not fingerprinted
    at the call's start or changed since (FSDP2 / ZeRO-3 shards, a hook rewriting them), or a
    call that drops without a call seed make the layer agree on its own, as outside a model.

    The slot is read inside the op's body, which ``torch.compile`` never traces: a compiled
    model reads the call's state when it runs, never a value baked in at tracing. (The op's
    arguments could not carry it without a graph break or a recompilation per call: the seed
    and the rows change from call to call.)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from hpattn_dist.attention_spec import AttentionSpec, check_ulysses_degree
from hpattn_dist.comm.agreement import Signature, dtype_code, records_gradients, validated_signature
from hpattn_dist.comm.groups import GroupInfo, resolve_group
from hpattn_dist.comm.model_call import Slot, current_call
from hpattn_dist.kernels import KERNEL_BACKENDS, BlockKernel, resolve_dropout_seed, select_kernel
from hpattn_dist.masks import key_bias_from_mask, mask_layout
from hpattn_dist.mesh import hybrid_groups_for, hybrid_parent
from hpattn_dist.replicas import N_SUMS, LayerFacts, LayerRef, check_layer_rows, resolve_layer
from hpattn_dist.strategies.auto import choose_strategy
from hpattn_dist.validation import check_heads_divisible, check_qkv

__all__ = ["AttentionPlan", "plan_attention"]


@dataclass(frozen=True)
class AttentionPlan:
    """What one call does, identical in meaning on every rank (Note [one agreement per call]).

    Attributes:
        strategy: the executor, ``"ring"``, ``"ulysses"`` or ``"hybrid"`` (``"auto"`` resolved).
        ulysses_group: the ranks that split heads (size U); None for the ring.
        ring_group: the ranks whose key blocks rotate (size R); None for Ulysses.
        ulysses_sizes: N_p of each member of this rank's Ulysses group, in its rank order (its
            queries' counts for cross-attention).
        key_ulysses_sizes: the same for keys (equal to ``ulysses_sizes`` unless cross-attention,
            Note [cross-grid plan]).
        kv_sizes: keys each ring member holds after the head exchange and compaction (M_i, less
            the keys masked in every batch element).
        q_offset: global pixel index of the first pixel this rank holds after the head exchange
            (its own first pixel for the ring, its Ulysses group's for hybrid, 0 for Ulysses).
        k_offset: global index of the first key this rank holds after the head exchange (before
            compaction): ``q_offset`` for self-attention, the same sum over the key counts for
            cross-attention.
        head_offset: global index of this rank's first head after the head exchange.
        mask_travels: the key mask goes to the ring as a mask (so it compacts keys); otherwise the
            additive bias travels.
        use_bias: the kernels apply a key bias (False when the mask travels, no key is masked
            anywhere after compaction and no key_bias was given).
        kernel, scale, dropout_p, seed: as the block kernels take them; ``seed`` is position 0's.
        grads_anywhere: ``(kv, bias)``: whether ANY rank needs the gradient of its k/v (resp. its
            key bias), so every rank runs the ring's dK/dV return trip alike (Note [ring memory]).
    """

    strategy: str
    ulysses_group: Optional[GroupInfo]
    ring_group: Optional[GroupInfo]
    ulysses_sizes: tuple[int, ...]
    key_ulysses_sizes: tuple[int, ...]
    kv_sizes: tuple[int, ...]
    q_offset: int
    k_offset: int
    head_offset: int
    mask_travels: bool
    use_bias: bool
    kernel: BlockKernel
    scale: float
    dropout_p: float
    seed: int
    grads_anywhere: tuple[bool, bool] = (True, True)


def _grid_row(parent: GroupInfo, u_deg: int, sub: Optional[tuple[GroupInfo, GroupInfo]]) -> tuple[int, ...]:
    """``(u, i, first global rank of the Ulysses group, first of the ring group)`` of this rank;
    without explicit sub-groups, the layout of Note [hybrid layout] over ``parent``."""
    if sub is not None:
        u_info, r_info = sub
        return u_info.rank, r_info.rank, u_info.global_rank(0), r_info.global_rank(0)
    i, u = divmod(parent.rank, u_deg)
    return u, i, parent.global_rank(i * u_deg), parent.global_rank(u)


def _choose(strategy: str, parent: GroupInfo, sub: Optional[tuple], ulysses_degree: object,
            q: Tensor) -> tuple[str, int]:
    """The executed strategy and its Ulysses degree U (``auto`` resolved; Note [communication
    volume] in ``auto.py``)."""
    p = parent.world_size
    if sub is not None:
        return "hybrid", sub[0].world_size
    if strategy == "auto":
        choice = choose_strategy(q.shape[1], p, dtype=q.dtype)
        return choice.strategy, choice.ulysses_degree
    if strategy == "ring":
        return "ring", 1
    if strategy == "ulysses":
        return "ulysses", p
    if ulysses_degree is None:
        raise ValueError("strategy 'hybrid' over one process group needs ulysses_degree=U (a "
                         "divisor of the group size and of the head count), or use strategy='auto'")
    check_ulysses_degree(ulysses_degree)
    if p == 1:
        return "ring", 1  # a group of one (or no torch.distributed): nothing to split
    if p % ulysses_degree != 0:
        raise ValueError(f"ulysses_degree={ulysses_degree} does not divide the size of the group ({p})")
    return "hybrid", ulysses_degree


def _check_grid(rows: Sequence[tuple], u_deg: int, r_deg: int, what: str) -> list[int]:
    """Grid position ``i * U + u`` of every row; ValueError unless the rows form a U x R grid."""
    u_groups: dict[int, list] = {}
    r_groups: dict[int, list] = {}
    for u, i, u_id, r_id in rows:
        u_groups.setdefault(u_id, []).append((u, i))
        r_groups.setdefault(r_id, []).append((i, u))
    ok = len(rows) == u_deg * r_deg and len(u_groups) == r_deg and len(r_groups) == u_deg
    for members, size in ((u_groups, u_deg), (r_groups, r_deg)):
        for pairs in members.values():
            ok = ok and sorted(a for a, _ in pairs) == list(range(size)) and len({b for _, b in pairs}) == 1
    if not ok:
        table = "; ".join(f"position {p}: ulysses rank {u}, ring rank {i}" for p, (u, i, _, _) in enumerate(rows))
        raise ValueError(
            f"{what}: ulysses_group and ring_group do not form a grid (the members of a ring group "
            f"must share their Ulysses rank and degree): {table}. Build them with "
            "hpattn_dist.mesh.build_hybrid_groups."
        )
    return [i * u_deg + u for u, i, _, _ in rows]


def plan_attention(
    spec: AttentionSpec,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: Optional[dist.ProcessGroup] = None,
    *,
    groups: Optional[tuple] = None,
    key_mask: Optional[Tensor] = None,
    key_bias: Optional[Tensor] = None,
    layer: "Optional[LayerFacts | LayerRef]" = None,
    what: str,
    kv_needs_grad: Optional[bool] = None,
    in_call: bool = False,
    needs_grad: Optional[bool] = None,
    bias_needs_grad: Optional[bool] = None,
    via_op: bool = True,
) -> tuple[AttentionPlan, Optional[Tensor]]:
    """Check the call, agree once with the peers, and return ``(plan, bias)``.

    ``spec``: the call's options (:class:`~hpattn_dist.attention_spec.AttentionSpec`, checked here,
    inside the agreement; no window: Note [cross-grid plan]); ``groups``: an explicit
    ``(ulysses_group, ring_group)`` pair (hybrid), else ``group`` (split by ``spec.ulysses_degree``
    for ``"hybrid"``). ``bias``: this rank's additive key bias ``[B, H|1, N_r]`` in the accumulation
    dtype (-inf where masked), or None. ``what`` names the entry point in errors. ``layer``: the
    calling layer's facts (parameter fingerprint, HEALPix field), or a reference to read them from
    inside the agreement, checked in the same agreement.
    ``kv_needs_grad``: whether this rank needs dK/dV, where the call cannot see it on k and v
    (inside the registered op); None reads it from grad mode and ``requires_grad``.
    ``needs_grad``: likewise, whether this call's output will be differentiated, agreed by every
    rank (Note [gradients on every rank or none] in ``comm/agreement.py``); ``bias_needs_grad``
    likewise for the gradient of ``key_bias``.
    ``via_op``: called by the registered op (False: by the one refusal of arguments it cannot
    take, Note [what the attention op cannot take] in ``call.py``; the flag is agreed, so the
    peers raise with that rank instead of running the op's exchanges).
    ``spec.cross``: queries and keys are sharded independently (``q [B, H, Nq_r, D]``, ``k, v [B,
    H, Nk_r, D]``, Note [cross-grid plan]); ``key_mask`` and ``key_bias`` then have k's N.
    ``in_call``: a layer's call that may reuse the plan agreed in an earlier call of a converted
    model with the same key (Note [attention plans in a model call]); ``spec.dropout_seed`` is then
    the call's derived seed when it drops.

    Raises (on every rank of the group, Note [fail together]):
        ValueError / TypeError: a bad argument on any rank; ranks that disagree on shapes,
            dtype, masking, dropout, backend or strategy; groups that do not form a grid; for a
            ``layer``: parameters that differ between ranks, or (``layer.healpix_field``) a total
            pixel count that is no HEALPix size.
        ExchangeError: the agreement itself failed (a rank died or is stuck).
    """
    if groups is not None:
        sub = (resolve_group(groups[0], "ulysses_group"), resolve_group(groups[1], "ring_group"))
        parent = resolve_group(hybrid_parent(*groups, sub[0].world_size * sub[1].world_size))
    else:
        sub, parent = None, resolve_group(group)
    slot = _model_call_slot(parent, layer, key_mask, key_bias, spec.dropout_p) if in_call else None
    known = slot is not None and slot.known is not None
    with (_declared(parent, what) if known else validated_signature(parent, what)) as sig:
        check_qkv(q, k, v, spec.scale, cross=spec.cross)
        layer = None if known else resolve_layer(layer)  # known: checked at the model call's start
        spec = spec.check(what)
        strategy, backend, dropout_p, cross = spec.strategy, spec.backend, spec.dropout_p, spec.cross
        executed, u_deg = _choose(strategy, parent, sub, spec.ulysses_degree, q)
        bias = key_bias_from_mask(k, key_mask, key_bias)  # k: the keys' N (check_qkv: q's B, H, dtype)
        batch, heads, n_local, head_dim = q.shape
        n_keys = k.shape[2]
        if executed != "ring":
            check_heads_divisible(heads, u_deg, what, "group" if executed == "ulysses" else "ulysses_group")
        mask_travels = key_mask is not None and (executed == "ring" or (executed == "hybrid" and key_bias is None))
        layout = mask_layout(key_mask) if mask_travels else None
        n_kept = n_keys if layout is None else layout.n_kept
        # After compaction a mask shared by the whole batch (a land mask) leaves nothing to mask,
        # so no bias is needed and the fused kernels apply; every rank must agree on that.
        mask_left = layout is not None and layout.left
        row = _grid_row(parent, u_deg, sub)
        # Which gradients must travel home (Note [ring memory]): each rank knows only its own.
        grad_on = torch.is_grad_enabled()
        kv_grad = (k.requires_grad or v.requires_grad) if kv_needs_grad is None else kv_needs_grad
        bias_grad = (grad_on and key_bias is not None and key_bias.requires_grad) if bias_needs_grad is None \
            else key_bias is not None and bias_needs_grad
        grad_bits = (int(grad_on and kv_grad) if kv_needs_grad is None else int(kv_needs_grad), int(bias_grad))
        shared = {
            "B": batch, "H": heads, "D": head_dim, "dtype": dtype_code(q.dtype),
            "key_bias_heads": -1 if key_bias is None else bias.shape[1],
            "key_mask": int(key_mask is not None),
            # compared bit for bit (ranks dropping at different rates give no one model's result);
            # + 0.0 makes -0.0 the 0.0 of its peers
            "dropout_p": float(dropout_p) + 0.0, "backend": KERNEL_BACKENDS.index(backend),
            "U": u_deg, "R": parent.world_size // u_deg, "cross": int(cross),
            "scale": spec.scale_for(head_dim), "via_op": int(via_op),
        }
        seed = resolve_dropout_seed(dropout_p, spec.dropout_seed)
        grads = records_gradients(q, k, v, key_bias) if needs_grad is None else needs_grad
        sig.set(
            {**shared, **({} if layer is None else {"param_layout": layer.layout})},
            (n_local, n_kept, int(mask_left), seed, *row, n_keys, *(() if layer is None else layer.sums),
             *grad_bits),
            q.device,
            kind=executed,
            grads=grads,
        )
    # What the plan follows from on this rank, less what changes every call (seed, parameter sums).
    mine = (what, executed, q.device.type, tuple(shared.items()), (n_local, n_kept, int(mask_left), *row, n_keys),
            grad_bits, int(grads))
    if known:
        rows = slot.reuse(mine, what)
    else:
        rows = sig.per_rank
        if slot is not None:
            slot.store(rows, mine)
    if layer is not None:
        layer_sums = [r[9:9 + N_SUMS] for r in rows]
        check_layer_rows(parent, layer, [r[0] for r in rows], layer_sums)
        if cross and layer.healpix_field:
            keys = replace(layer, name=layer.name + " (keys and values)")
            check_layer_rows(parent, keys, [r[8] for r in rows], layer_sums)
    plan = _plan_from_rows(
        rows, executed, u_deg, parent, sub, group, my_row=row, heads=heads, mask_travels=mask_travels,
        has_bias=bias is not None, key_bias_given=key_bias is not None, backend=backend, q=q,
        scale=spec.scale_for(head_dim), dropout_p=float(dropout_p), what=what,
    )
    if known:  # every rank proposed the call's derived seed (Note [seeds in a model call])
        plan = replace(plan, seed=seed)
    return plan, bias


@contextlib.contextmanager
def _declared(info: GroupInfo, what: str) -> Iterator[Signature]:
    """A :class:`Signature` declared without an exchange: the call reuses agreed rows (a local
    failure is raised here only, Note [attention plans in a model call])."""
    yield Signature(info, what)


def _model_call_slot(parent: GroupInfo, layer: "Optional[LayerFacts | LayerRef]", key_mask: Optional[Tensor],
                     key_bias: Optional[Tensor], dropout_p: float) -> Optional[Slot]:
    """The layer's slot in the converted model's call in progress, when its plan may come from an
    earlier call with the same key; None when the call must agree on its own."""
    if not isinstance(layer, LayerRef) or key_mask is not None or key_bias is not None:
        return None  # a mask's kept keys are data: agreed on every call
    call = current_call(parent) if parent.world_size > 1 else None
    if call is None or not call.covers(layer.params) or (dropout_p > 0 and call.seed is None):
        return None
    return Slot(call, ("attention", layer.name))


def _plan_from_rows(rows: list, executed: str, u_deg: int, parent: GroupInfo, sub: Optional[tuple],
                    group: Optional[dist.ProcessGroup], *, my_row: tuple, heads: int, mask_travels: bool,
                    has_bias: bool, key_bias_given: bool, backend: str, q: Tensor, scale: float,
                    dropout_p: float, what: str) -> AttentionPlan:
    """The plan every rank derives alike from the agreed rows (grid positions, Note [hybrid
    layout]: position ``i * U + u`` holds global shard ``i * U + u``)."""
    r_deg = parent.world_size // u_deg
    by_pos: list = [None] * parent.world_size
    for p, row in zip(_check_grid([r[4:8] for r in rows], u_deg, r_deg, what), rows):
        by_pos[p] = row
    u_me, i_me = my_row[0], my_row[1]
    if executed == "hybrid" and sub is None:
        made = hybrid_groups_for(group, u_deg)  # cached; collective on first use only
        sub = (resolve_group(made.ulysses_group), resolve_group(made.ring_group))
    sizes = [r[0] for r in by_pos]
    key_sizes = [r[8] for r in by_pos]
    kept_sizes = [r[1] for r in by_pos]
    use_bias = (key_bias_given or any(r[2] for r in rows)) if mask_travels else has_bias
    return AttentionPlan(
        strategy=executed,
        ulysses_group=parent if executed == "ulysses" else (sub[0] if sub else None),
        ring_group=parent if executed == "ring" else (sub[1] if sub else None),
        ulysses_sizes=tuple(sizes[i_me * u_deg:(i_me + 1) * u_deg]),
        key_ulysses_sizes=tuple(key_sizes[i_me * u_deg:(i_me + 1) * u_deg]),
        kv_sizes=tuple(sum(kept_sizes[j * u_deg:(j + 1) * u_deg]) for j in range(r_deg)),
        q_offset=sum(sizes[:i_me * u_deg]),
        k_offset=sum(key_sizes[:i_me * u_deg]),
        head_offset=u_me * (heads // u_deg),
        mask_travels=mask_travels,
        use_bias=use_bias,
        kernel=select_kernel(backend, q, has_bias=use_bias, dropout=dropout_p > 0),
        scale=scale,
        dropout_p=dropout_p,
        seed=by_pos[0][3],
        grads_anywhere=(any(r[-2] for r in rows), any(r[-1] for r in rows)),
    )
