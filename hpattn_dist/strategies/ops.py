"""The attention as registered operators: ``hpattn::attention_fwd`` and its backward
``hpattn::attention_bwd``, and for U > 1 ``hpattn::attention_heads`` and ``hpattn::heads_to_pixels``.

Legend: B batch, H heads, D head dim, P ranks of the group, U Ulysses degree, R = P / U ring
degree, h = H / U, N_r pixels on this rank, M pixels of this rank's Ulysses group (N_r for U = 1);
for cross-grid attention Nq_r / Nk_r and Mq / Mk, the queries' and the keys' counts.

Note [attention as one op]
    Activation checkpointing, ``torch.compile`` and selective-checkpoint policies see only
    dispatcher operators. Through ``torch.library.custom_op`` a call of the attention is
    operators only, and its first, ``hpattn::attention_fwd``, holds the whole door (the plan's
    agreement, Note [one agreement per call]) and, for U = 1, the whole execution (the ring's
    communication); its backward is ``hpattn::attention_bwd``. For U > 1 the door op ends with
    the head exchange of q, k, v, and two more ops follow (Note [ulysses op memory]). Everything
    a backward needs crosses between them as op arguments and outputs, never as hidden state:

    * the static values: the group by its registered name (``ProcessGroup.group_name``, as
      torch's functional collectives take it; ``""`` = a single process), the strategy, U,
      backend, dropout probability and scale;
    * the agreed values, as an int64 output ``plan`` ``[7 + 2U + R]``: ``(use_bias,
      mask_travels, q_offset, head_offset, seed, dK/dV needed, k_offset, ulysses sizes...,
      key ulysses sizes..., kv sizes...)``;
    * the residuals: ``out`` and its ``lse``, for U > 1 in head layout with the head-layout
      ``q_h, k_h, v_h``, the gathered key mask or the key bias, so that the backward sends only
      what a backward must (``dout`` to heads, the ring's K/V and dK/dV rotation, dq/dk/dv and
      dbias back) and nothing of the forward's.

    A policy that saves ``attention_fwd``'s outputs (:func:`hpattn_dist.checkpoint_context_fn`)
    therefore recomputes a checkpointed block without a byte of communication, and with the
    forward's dropout mask: the seed is an input of the op, drawn before it (Note [seed outside
    the op] in ``kernels/dropout.py``), so the recomputation draws exactly what the forward drew. The fake (meta) implementations give the shapes from the static arguments alone,
    except M for U > 1, which the peers' shards set (Note [compiling the attention]).

    Cross-grid attention (``cross=True``, queries ``[B, H, Nq_r, D]`` and keys ``[B, H, Nk_r, D]``
    on grids sharded independently, Note [cross-grid plan]) is the same op: the plan carries the
    key side too (``k_offset``, the keys' Ulysses sizes), the keys' dropout indices count on their
    own grid, q and k/v travel to heads with their own sizes (``q_h, out_h [B, h, Mq, D]``, ``k_h,
    v_h [B, h, Mk, D]``, the mask ``[B, Mk]``), and the exchanges are the executors' (labels and
    bytes).

    Note [ulysses op memory]
    For U > 1 a call is three operators, so that autograd frees what each backward step is done
    with before the next one runs, as the separate autograd nodes of DeepSpeed-Ulysses do::

        attention_fwd     the door, then q, k, v to heads: q_h [B, h, Mq, D], k_h, v_h [B, h, Mk, D]
                          (three buffers: an op's outputs may not alias), the key mask gathered
        attention_heads   out_h, lse [B, h, Mq] of the heads (a ring across Ulysses groups for hybrid)
        heads_to_pixels   out_h home, [B, H, Nq_r, D] in [B, Nq_r, H, D] memory (so the layer's
                          reshape before out_proj is a view)

    Backward, in reverse: ``pixels_to_heads`` (the adjoint) sends dout to heads in the layout the
    fused block backward reads in place, and the engine frees the pixel dout; the backward of
    ``attention_heads`` runs the block backward from its saved ``q_h, k_h, v_h, out_h, lse``, and
    the engine frees them and ``dout_h``; the door's backward sends ``dq_h, dk_h, dv_h`` home one
    at a time (:func:`~hpattn_dist.comm.head_exchange.heads_to_pixels_released`). The door saves
    only the plan and the shapes of q, k, v (:func:`_shape_of`) for U > 1: every residual is saved
    once, by ``attention_heads``. As ONE op the engine held the pixel dout through the block
    backward and the residuals through the exchange home, and the op's outputs and saved inputs
    held q, k, v, out twice: 2.8x DeepSpeed-Ulysses' peak in the layer. Now the peak is
    DeepSpeed-Ulysses' own, held by ``tests/distributed/test_memory.py`` (live bytes counted
    inside the operators, for every strategy).

    A key bias adds only tensors of its own size (``[B, h|1, Mk]``: ``bias_h``, saved by
    ``attention_heads``; its gradient, and that gradient's trip home) to the same ops' peak; the
    kernel a bias selects where no fused kernel takes one (the manual kernel on CPU) holds its
    score tiles beyond a fused kernel's peak (and a zeroed copy of K/V that are not known
    finite: Note [bounded score tile]). The manual kernel's gradients are not heads-minor, so they are laid out one at a time.

    Note [compiling the attention]
    Dynamo does not trace an operator's body, so the door (the agreement with its CRC and clock,
    the P2P ring loop, the async all-to-alls) is no graph break: ``torch.compile(model,
    fullgraph=True)`` sees one ``attention_fwd`` per layer call (three ops for U > 1), and
    AOTAutograd their backward ops. The agreement still runs on EVERY call, compiled or not, inside the op (one
    small all-gather): a rank that alone changes its shapes, or recompiles, gets the agreement's
    error on every rank, never a hang in mismatched exchanges. (Caching plans per input signature
    would save that all-gather but let one rank's new shape meet its peers' cached plan; we pay
    the all-gather, except inside a converted model's call, whose own agreement covers the
    shapes: Note [attention plans in a model call] in ``plan.py``.) The ring's residuals have
    static shapes; Ulysses' and hybrid's head-layout residuals (and their lse) have M pixels,
    which the peers' shards set: no fake can know it, and it is a fresh unbacked size (two for a cross call: Mq for ``q_h, out_h, lse``, Mk for
    ``k_h, v_h`` and the mask). ``new_dynamic_size`` would refuse to make one unless
    ``fullgraph=True`` or ``torch._dynamo.config.capture_dynamic_output_shape_ops`` (a graph
    break per call otherwise), a guard meant for data-dependent sizes that reach the user's
    code. M never does: only our ops read those tensors, and the results they hand back (``out``,
    the gradients) have the inputs' static shapes. So the fake makes the size itself, as torch's own
    ``device_mesh`` ops do, and compile (fullgraph or not, ``explain``, AOTAutograd's backward,
    a ``checkpoint_context_fn`` region) needs no configuration. A ``FakeTensorMode`` without a
    shape environment has no symbolic sizes: there the ring's fake works and a Ulysses layout's
    raises torch's ``DynamicOutputShapeException``. Padding the residuals to a static size
    instead would cost memory, and recomputing them in the backward would cost communication.

    The first call of a registered op in a process imports ``torch._dynamo`` (custom ops run
    their body with dynamo disabled): seconds, once.

    Every global and cross-grid call goes through these ops, a differentiable ``key_bias`` and a
    hybrid over explicit ``(ulysses_group, ring_group)`` (both names in the one group argument,
    joined by :data:`_PAIR`) included; arguments they cannot take are refused in one place (Note
    [what the attention op cannot take] in ``call.py``). The key bias is an input of ``attention_fwd`` and its
    gradient an output of ``attention_bwd``: for U = 1 the ring carries it beside K/V and dbias
    beside dK/dV (Note [ring memory]); for U > 1 it travels to heads in the door, the key mask
    folded in (``bias_h``, an output the heads' op reads and differentiates), and dbias comes
    home in the door's backward (Note [ulysses schedule]). Windowed attention (``window_nside``, self or cross) is its own op, ``hpattn::window_attention_fwd``
    (Note [windowed attention as one op] in :mod:`hpattn_dist.local.ops`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from hpattn_dist.attention_spec import ENTRY_POINTS, AttentionSpec
from hpattn_dist.comm.all_to_all import all_to_all
from hpattn_dist.comm.groups import GroupInfo, resolve_group
from hpattn_dist.comm.head_exchange import (gather_pixels, heads_to_pixels, heads_to_pixels_released, pixels_to_heads,
                                            qkv_to_heads)
from hpattn_dist.comm.model_call import layer_seed
from hpattn_dist.double_backward import refuse_double_backward
from hpattn_dist.kernels import select_kernel
from hpattn_dist.masks import key_bias_from_mask
from hpattn_dist.mesh import hybrid_groups_for, hybrid_parent
from hpattn_dist.replicas import LayerRef, layer_of_op_args
from hpattn_dist.strategies.plan import AttentionPlan, _choose, plan_attention
from hpattn_dist.strategies.ring import folded_bias, ring_backward, ring_forward

__all__ = ["group_name_of"]

_PLAN_HEAD = 7  # use_bias, mask_travels, q_offset, head_offset, seed, dK/dV needed anywhere, k_offset

#: Tags of every registered op of the library. ``cudagraph_unsafe``: the ops communicate, read the
#: agreed plan on the host and wait on peers, none of which a CUDA graph can capture or replay;
#: with the tag, ``torch.compile(mode="reduce-overhead")`` graphs the code around them instead.
OP_TAGS = (torch.Tag.cudagraph_unsafe,)


#: Joins a group's registered name and its size in the op's group argument (Note [group argument]).
_SIZE = "@"


def group_name_of(group: Optional[dist.ProcessGroup]) -> str:
    """The op's group argument for ``group`` (None = WORLD): its registered name and its size,
    ``"NAME@P"``, or ``""`` without torch.distributed.

    Note [group argument]
        The registered ops' fake implementations size their outputs (the agreed plan, the head
        layout) from the group's size, but a compiled graph names the group only through this
        argument, and inductor caches graphs on disk across processes. With the name alone, a
        graph compiled at P ranks was served to a later job at P' ranks wherever a rank's shapes
        coincided (an empty shard, or N / P = N' / P'): its outputs had P's shapes, and that rank
        raised while its peers waited. The size in the argument keeps such graphs apart.
    """
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialised")
        return ""
    pg = dist.group.WORLD if group is None else group
    return f"{pg.group_name}{_SIZE}{dist.get_world_size(pg)}"


def _group(name: str) -> GroupInfo:
    return resolve_group(_process_group(name))


def _process_group(name: str) -> Optional[dist.ProcessGroup]:
    if not name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name.split(_SIZE)[0])


#: Joins the names of an explicit ``(ulysses_group, ring_group)`` pair into the op's one group
#: argument (group names are torch's, and hold no such character).
_PAIR = "|"


def _grid(name: str) -> tuple[GroupInfo, Optional[tuple[GroupInfo, GroupInfo]]]:
    """``(parent, (ulysses group, ring group) or None)`` of the op's group argument: one group, or
    an explicit hybrid pair (``hybrid_attention``), whose parent is the group they were built from."""
    if _PAIR not in name:
        return _group(name), None
    u_pg, r_pg = (_process_group(n) for n in name.split(_PAIR))
    sub = resolve_group(u_pg, "ulysses_group"), resolve_group(r_pg, "ring_group")
    return resolve_group(hybrid_parent(u_pg, r_pg, sub[0].world_size * sub[1].world_size)), sub


def _single() -> GroupInfo:
    return GroupInfo(None, 0, 1)


def _sub_groups(parent_name: str, strategy: str, u_deg: int) -> tuple[GroupInfo, GroupInfo]:
    """``(ulysses_group, ring_group)`` of the executed strategy (a group of one where absent)."""
    parent, sub = _grid(parent_name)
    if sub is not None:
        return sub
    if strategy == "ring":
        return _single(), parent
    if strategy == "ulysses":
        return parent, _single()
    made = hybrid_groups_for(parent.group, u_deg)  # cached at the forward's planning
    return resolve_group(made.ulysses_group), resolve_group(made.ring_group)


def _plan_tensor(plan: AttentionPlan) -> Tensor:
    values = (int(plan.use_bias), int(plan.mask_travels), plan.q_offset, plan.head_offset, plan.seed,
              int(plan.grads_anywhere[0]) | int(plan.grads_anywhere[1]) << 1, plan.k_offset,
              *plan.ulysses_sizes, *plan.key_ulysses_sizes, *plan.kv_sizes)
    return torch.tensor(values, dtype=torch.int64)


def _plan_from(t: Tensor, q: Tensor, group_name: str, strategy: str, u_deg: int, backend: str,
               dropout_p: float, scale: float) -> AttentionPlan:
    values = [int(x) for x in t.tolist()]
    use_bias, mask_travels, q_offset, head_offset, seed, grad_bits, k_offset = values[:_PLAN_HEAD]
    u_info, r_info = _sub_groups(group_name, strategy, u_deg)
    sizes = tuple(values[_PLAN_HEAD:_PLAN_HEAD + u_deg])
    key_sizes = tuple(values[_PLAN_HEAD + u_deg:_PLAN_HEAD + 2 * u_deg])
    return AttentionPlan(
        strategy=strategy, ulysses_group=u_info, ring_group=r_info, ulysses_sizes=sizes,
        key_ulysses_sizes=key_sizes, kv_sizes=tuple(values[_PLAN_HEAD + 2 * u_deg:]), q_offset=q_offset,
        k_offset=k_offset, head_offset=head_offset,
        mask_travels=bool(mask_travels), use_bias=bool(use_bias),
        kernel=select_kernel(backend, q, has_bias=bool(use_bias), dropout=dropout_p > 0),
        scale=scale, dropout_p=dropout_p, seed=seed, grads_anywhere=(bool(grad_bits & 1), bool(grad_bits & 2)),
    )


def _empty(q: Tensor) -> Tensor:
    return q.new_empty((0,))


def _shape_of(t: Tensor) -> Tensor:
    """A tensor with ``t``'s shape, dtype and device over ONE element (all strides 0): what the
    backward of a U > 1 call reads of q, k, v and out, which it never reads the values of."""
    return torch.empty_strided(t.shape, (0,) * t.dim(), dtype=t.dtype, device=t.device)


@torch.library.custom_op("hpattn::attention_fwd", mutates_args=(), tags=OP_TAGS)
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], key_bias: Optional[Tensor],
                  group_name: str, strategy: str, ulysses_degree: int, backend: str, dropout_p: float, scale: float,
                  dropout_seed: Optional[Tensor], layer_params: list[Tensor], layer_name: str,
                  layer_healpix: bool, layer_facts: Optional[Tensor], kv_needs_grad: bool, needs_grad: bool,
                  bias_needs_grad: bool, cross: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The door (Note [attention as one op]): ``(x, plan, lse, k_h, v_h, mask_h, bias_h)``.

    ``group_name``: the group's registered name, or an explicit hybrid pair's two joined by
    :data:`_PAIR`. ``strategy`` as the caller gave it (``"auto"`` too); ``ulysses_degree`` 0 =
    None; ``dropout_seed``: this rank's proposal, an int64 CPU tensor ``[1]`` drawn before the call
    (Note [seed outside the op]), None without dropout. ``key_bias``: ``[B, Nk_r]`` or ``[B, H,
    Nk_r]``. For U = 1 the whole attention: ``x`` is the result ``[B, H, Nq_r, D]``, ``lse`` ``[B,
    H, Nq_r]``, the rest empty. For U > 1 the head exchange (Note [ulysses op memory]): ``x`` is q
    in head layout ``[B, h, Mq, D]``, ``k_h, v_h`` ``[B, h, Mk, D]``, ``mask_h`` ``[B, Mk]`` (or
    empty), ``bias_h`` the key bias with the mask folded in, ``[B, h|1, Mk]`` in the accumulation
    dtype (or empty), ``lse`` empty. Cross-attention: queries ``[B, H, Nq_r, D]`` and keys ``[B, H,
    Nk_r, D]`` on grids sharded independently (Note [cross-grid plan]). ``layer_name`` non-empty:
    the call is a layer's, whose parameters ``layer_params`` (or their fingerprint
    ``layer_facts``, int64 ``[layout, point_sets, late, *sums]``) and field (``layer_healpix``) are
    checked in the same agreement (Note [replicated parameter check]). ``kv_needs_grad`` /
    ``bias_needs_grad`` / ``needs_grad``: whether this rank needs dK/dV / the key bias's gradient
    / differentiates ``out`` at all, read before the op (its body runs with grad mode off; Note
    [gradients on every rank or none]).
    """
    layer = layer_of_op_args(layer_name, layer_params, layer_healpix, layer_facts)
    parent, sub = _grid(group_name)
    seed = None if dropout_seed is None else int(dropout_seed)
    if seed is not None and isinstance(layer, LayerRef) and dropout_p > 0:  # Note [seeds in a model call]
        seed = layer_seed(parent, layer.name, seed)
    spec = AttentionSpec(strategy, backend, dropout_p, scale, seed, ulysses_degree or None, cross)
    plan, _ = plan_attention(
        spec, q, k, v, parent.group, groups=None if sub is None else tuple(g.group for g in sub),
        key_mask=key_mask, key_bias=key_bias, layer=layer,
        what=spec.entry_point if layer is None else layer.name, kv_needs_grad=kv_needs_grad,
        in_call=isinstance(layer, LayerRef), needs_grad=needs_grad, bias_needs_grad=bias_needs_grad,
    )
    plan_t = _plan_tensor(plan)
    e = _empty(q)
    if plan.strategy == "ring" or plan.ulysses_group.world_size == 1:  # U = 1
        if plan.strategy == "ulysses":
            plan = dataclasses.replace(plan, ring_group=_single())  # a group of one
        out, lse = ring_forward(plan, q, k, v, folded_bias(plan, k, key_mask, key_bias), key_mask)
        return _distinct((out, plan_t, lse, e, e.clone(), e.clone(), e.clone()), (q, k, v, key_mask, key_bias))
    u_info, sizes, key_sizes = plan.ulysses_group, list(plan.ulysses_sizes), list(plan.key_ulysses_sizes)
    # A key bias travels with the mask folded in (Note [ulysses schedule]); a bare mask as a mask.
    bias = None if key_bias is None else key_bias_from_mask(k, key_mask, key_bias)
    q_h, k_h, v_h, bias_h = qkv_to_heads(q, k, v, bias, u_info, sizes, plan.strategy, key_sizes=key_sizes)
    del bias
    mask_h = q.new_empty((0,), dtype=torch.bool)
    if key_mask is not None and key_bias is None:
        mask_h = gather_pixels(key_mask.to(torch.uint8), u_info, key_sizes, f"{plan.strategy}.mask").bool()
    bias_h = q.new_empty((0,), dtype=_acc(q.dtype)) if bias_h is None else bias_h
    return _distinct((q_h, plan_t, e.clone(), k_h, v_h, mask_h, bias_h), (q, k, v, key_mask, key_bias))


def _static_degree(q: Tensor, group_name: str, strategy: str, ulysses_degree: int) -> tuple[str, int]:
    parent, sub = _grid(group_name)
    return _choose(strategy, parent, sub, ulysses_degree or None, q)


@attention_fwd.register_fake
def _(q, k, v, key_mask, key_bias, group_name, strategy, ulysses_degree, backend, dropout_p, scale, dropout_seed,
      layer_params, layer_name, layer_healpix, layer_facts, kv_needs_grad, needs_grad, bias_needs_grad, cross):
    executed, u_deg = _static_degree(q, group_name, strategy, ulysses_degree)
    r_deg = _grid(group_name)[0].world_size // u_deg
    plan_t = torch.empty((_PLAN_HEAD + 2 * u_deg + r_deg,), dtype=torch.int64)  # CPU, like the real one
    acc = _acc(q.dtype)
    if u_deg == 1:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = q.new_empty(q.shape[:3], dtype=acc)
        return out, plan_t, lse, *(q.new_empty((0,)) for _ in range(3)), q.new_empty((0,), dtype=acc)
    batch, heads, _, head_dim = q.shape
    m_q = _group_pixels()
    m_k = _group_pixels() if cross else m_q
    h = heads // u_deg
    q_h = q.new_empty((batch, h, m_q, head_dim))
    k_h, v_h = (q.new_empty((batch, h, m_k, head_dim)) for _ in range(2))
    mask_h = q.new_empty((0,), dtype=torch.bool) if key_mask is None or key_bias is not None \
        else q.new_empty((batch, m_k), dtype=torch.bool)
    bias_h = q.new_empty((0,), dtype=acc) if key_bias is None \
        else q.new_empty((batch, 1 if key_bias.dim() == 2 else h, m_k), dtype=acc)
    return q_h, plan_t, q.new_empty((0,)), k_h, v_h, mask_h, bias_h


def _group_pixels() -> torch.SymInt:
    """M for U > 1, set by the peers' shards: a fresh unbacked size made as ``new_dynamic_size``
    makes it, less its ``capture_dynamic_output_shape_ops`` check (Note [compiling the
    attention]). Without a shape environment ``new_dynamic_size`` raises torch's
    ``DynamicOutputShapeException`` naming the op."""
    ctx = torch.library.get_ctx()
    shape_env = getattr(ctx, "_shape_env", None)
    if shape_env is None:
        return ctx.new_dynamic_size()
    from torch._library.fake_impl import allocate_size

    return allocate_size(shape_env)


def _acc(dtype: torch.dtype) -> torch.dtype:
    from hpattn_dist.precision import acc_dtype

    return acc_dtype(dtype)


@torch.library.custom_op("hpattn::attention_bwd", mutates_args=(), tags=OP_TAGS)
def attention_bwd(dout: Tensor, dk_h: Optional[Tensor], dv_h: Optional[Tensor], dbias_h: Optional[Tensor], q: Tensor,
                  k: Tensor, v: Tensor, key_mask: Optional[Tensor], key_bias: Optional[Tensor], out: Optional[Tensor],
                  plan_t: Tensor, lse: Optional[Tensor], group_name: str, strategy: str, ulysses_degree: int,
                  backend: str, dropout_p: float, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dkey_bias)`` shaped like ``(q, k, v, key_bias)`` (``dkey_bias`` empty unless
    some rank needs it): the door's backward. U = 1: the ring's, from ``dout`` and the residuals
    ``out, lse`` (``dk_h, dv_h, dbias_h`` None). U > 1: ``dout, dk_h, dv_h, dbias_h`` are the
    gradients of ``(x, k_h, v_h, bias_h)`` (None = zero), sent home; ``q, k, v, key_bias`` are
    read for their shapes only and the gradients are ``[H, B, N_r, D]``-contiguous buffers seen as
    ``[B, H, N_r, D]`` (Note [ulysses op memory])."""
    executed, u_deg = _static_degree(q, group_name, strategy, ulysses_degree)
    plan = _plan_from(plan_t, q, group_name, executed, u_deg, backend, dropout_p, scale)
    if u_deg == 1:
        bias = folded_bias(plan, k, key_mask, key_bias)
        dq, dk, dv, dbias = ring_backward(plan, dout, q, k, v, bias, key_mask, out, lse)
        return _distinct((dq, dk, dv, _key_bias_grad(dbias, key_bias, q)), (dout, q, k, v, out, lse, key_bias))
    u_info, sizes, key_sizes = plan.ulysses_group, list(plan.ulysses_sizes), list(plan.key_ulysses_sizes)
    h = q.shape[1] // u_deg
    dbias = None
    if key_bias is not None and plan.grads_anywhere[1]:  # the adjoint of the bias's trip to heads
        shape = (q.shape[0], 1 if key_bias.dim() == 2 else h, sum(key_sizes))
        dbias = all_to_all(_zero_if_none(dbias_h, shape, q, _acc(q.dtype)), u_info, scatter_dim=2, gather_dim=1,
                           scatter_sizes=key_sizes, label=f"{executed}.bias.grad")
        del dbias_h
        dbias = dbias.sum(1, keepdim=True) if key_bias.dim() == 2 else dbias  # [B, U, Nk_r]: each rank's heads
    grads = [_zero_if_none(g, (q.shape[0], h, n, q.shape[3]), q)
             for g, n in ((dout, sum(sizes)), (dk_h, sum(key_sizes)), (dv_h, sum(key_sizes)))]
    if key_sizes == sizes:  # the adjoint of qkv_to_heads, with its labels
        home = heads_to_pixels_released(grads, u_info, sizes, f"{executed}.qkv.grad")
    else:
        q_grad = [grads.pop(0)]
        home = (*heads_to_pixels_released(q_grad, u_info, sizes, f"{executed}.q.grad"),
                *heads_to_pixels_released(grads, u_info, key_sizes, f"{executed}.kv.grad"))
    return _distinct((*home, _key_bias_grad(dbias, key_bias, q)), (dout, dk_h, dv_h), layout=lambda t: t)


def _key_bias_grad(dbias: Optional[Tensor], key_bias: Optional[Tensor], q: Tensor) -> Tensor:
    """The gradient of ``key_bias`` (``[B, N_r]`` or ``[B, H, N_r]``) from that of the folded bias
    ``[B, H|1, N_r]``, contiguous (zeros where no rank needs it: the shape the fake promises);
    empty without a key bias."""
    if key_bias is None:
        return q.new_empty((0,))
    if dbias is None:
        return key_bias.new_zeros(key_bias.shape)
    return dbias.reshape(key_bias.shape).to(key_bias.dtype).contiguous()


def _zero_if_none(g: Optional[Tensor], shape: tuple, like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    return like.new_zeros(shape, dtype=dtype) if g is None else g


def _distinct(ts: "tuple | list", inputs: tuple = (), layout: Callable[[Tensor], Tensor] = Tensor.contiguous,
              release: bool = False) -> tuple:
    """``ts`` in the layout the fake promises (``layout``: contiguous unless said otherwise), with
    a copy of any tensor sharing storage with an input or an earlier one. Compiled code trusts
    the fakes' strides (a block kernel's gradients for a broadcast ``dout`` are not contiguous);
    an op's outputs may alias nothing (the ring's dK and dV are halves of one buffer, a group of
    one exchanges nothing). ``release``: ``ts`` is a list nobody else holds, emptied as it goes,
    so that each tensor is freed once laid out."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
    out = []
    ts = ts if release else list(ts)
    while ts:
        t = layout(ts.pop(0))
        ptr = t.untyped_storage().data_ptr()
        out.append(t.clone() if ptr in seen else t)
        seen.add(ptr)
    return tuple(out)


def _pixels_from_heads(like: Tensor, heads_major: bool = False) -> Tensor:
    """An uninitialised ``[B, H, N_r, D]`` (``like``'s shape) in the layout a head exchange
    returns: ``[B, N_r, H, D]``-contiguous (:func:`heads_to_pixels`), or with ``heads_major``
    ``[H, B, N_r, D]``-contiguous (:func:`heads_to_pixels_released`)."""
    batch, heads, n, head_dim = like.shape
    if heads_major:
        return like.new_empty((heads, batch, n, head_dim)).transpose(0, 1)
    return like.new_empty((batch, n, heads, head_dim)).transpose(1, 2)


@attention_bwd.register_fake
def _(dout, dk_h, dv_h, dbias_h, q, k, v, key_mask, key_bias, out, plan_t, lse, group_name, strategy,
      ulysses_degree, backend, dropout_p, scale):
    d_key_bias = q.new_empty((0,)) if key_bias is None else torch.empty_like(
        key_bias, memory_format=torch.contiguous_format)
    if _static_degree(q, group_name, strategy, ulysses_degree)[1] == 1:
        return *(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)), d_key_bias
    return *(_pixels_from_heads(t, heads_major=True) for t in (q, k, v)), d_key_bias


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, key_mask, key_bias, group_name, strategy, ulysses_degree, backend, dropout_p, scale = inputs[:11]
    ctx.n_layer_params = len(inputs[12])
    x, plan_t, lse, k_h, v_h, mask_h, bias_h = output
    ctx.heads = _static_degree(q, group_name, strategy, ulysses_degree)[1] > 1
    if ctx.heads:  # the backward only sends gradients home (Note [ulysses op memory])
        ctx.save_for_backward(*(_shape_of(t) for t in (q, k, v)), None,
                              None if key_bias is None else _shape_of(key_bias), None, plan_t, None)
    else:
        ctx.save_for_backward(q, k, v, key_mask, key_bias, x, plan_t, lse)
    ctx.mark_non_differentiable(plan_t, lse, mask_h)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the residuals
    ctx.static = (group_name, strategy, ulysses_degree, backend, dropout_p, scale)
    ctx.what = AttentionSpec(strategy, cross=inputs[-1]).entry_point


def _plain_backward(ctx, dx, dk_h=None, dv_h=None, dbias_h=None):
    return attention_bwd(dx, dk_h, dv_h, dbias_h, *ctx.saved_tensors, *ctx.static)


# The backward is explicit, so not differentiable: Note [double backward], named per entry point.
# (U > 1: the door's backward only sends gradients home, but under create_graph it sits behind
# the refusing attention of the heads; it refuses too, so that the message names the entry point.)
_REFUSING = {name: refuse_double_backward(name)(_plain_backward) for name in ENTRY_POINTS}


def _backward(ctx, dx, plan_grad, lse_grad, dk_h, dv_h, mask_grad, dbias_h):
    dq, dk, dv, d_key_bias = _REFUSING[ctx.what](ctx, dx, dk_h, dv_h, dbias_h)
    # No gradient for the layer's parameters through here: the op only reads their sums.
    return (dq, dk, dv, None, d_key_bias if ctx.needs_input_grad[4] else None, None, None, None, None, None, None,
            None, [None] * ctx.n_layer_params, None, None, None, None, None, None, None)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)

# Note [ops that communicate are never dead code]
# Our ops communicate: every rank of the group must run each of them whatever its outputs are
# used for. A pure op (mutates_args=()) is dead code to a compiler whose graph does not read its
# outputs: inductor dropped attention_bwd on a rank whose shard is empty (every gradient it
# returns has no element, so the weight gradients it feeds are zeros without reading it), and
# the peer blocked in the ring. Marked side-effectful (``torch.fx.node.has_side_effect``), they
# are impure to every dead-code pass (FX, AOTAutograd's partitioner, inductor's scheduler), so
# each runs on every rank as in eager, in its place in the graph: successive layers' ops are
# ordered by their data. Not an ORDERED effect (``register_effect``), which would also thread a
# token through them: torch 2.13's inductor fails to lower ``with_effects`` around an op with
# unbacked output sizes (Ulysses' residuals, Note [compiling the attention]). Compile caches
# (AOTAutograd's, inductor's FX graph cache) key graphs without this registration: a cache
# written by a version of this library without it serves the old graph, so clear it
# (``torch._inductor.config.force_disable_caches`` or the cache directory) after upgrading.


# --- U > 1: the attention of the heads (hpattn::attention_heads) and the result home
# (hpattn::heads_to_pixels), Note [ulysses op memory]


@torch.library.custom_op("hpattn::attention_heads", mutates_args=(), tags=OP_TAGS)
def attention_heads(q_h: Tensor, k_h: Tensor, v_h: Tensor, mask_h: Tensor, bias_h: Tensor, plan_t: Tensor, q: Tensor,
                    group_name: str, strategy: str, ulysses_degree: int, backend: str, dropout_p: float,
                    scale: float) -> tuple[Tensor, Tensor]:
    """``(out_h [B, h, Mq, D], lse [B, h, Mq])``: the attention of this rank's heads over every
    pixel of its Ulysses group, a ring across the groups for hybrid (R > 1). ``q`` is read for
    its shape only; ``mask_h``, ``bias_h`` as ``attention_fwd`` returned them."""
    plan = _heads_plan(plan_t, q, group_name, strategy, ulysses_degree, backend, dropout_p, scale)
    mask, bias = _heads_mask_bias(plan, k_h, mask_h, bias_h)
    return _distinct(ring_forward(plan, q_h, k_h, v_h, bias, mask), (q_h, k_h, v_h, mask_h, bias_h))


def _heads_mask_bias(plan: AttentionPlan, k_h: Tensor, mask_h: Tensor,
                     bias_h: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The heads' key mask and folded bias. A mask is 2-D (``[B, Mk]``; B = 0 makes it empty, still
    a mask), a bias 3-D; their absence is ``(0,)``."""
    mask = mask_h.bool() if mask_h.dim() == 2 else None
    return mask, folded_bias(plan, k_h, mask, None, bias_h if bias_h.dim() == 3 else None)


def _heads_plan(plan_t: Tensor, q: Tensor, group_name: str, strategy: str, ulysses_degree: int, backend: str,
                dropout_p: float, scale: float) -> AttentionPlan:
    executed, u_deg = _static_degree(q, group_name, strategy, ulysses_degree)
    return _plan_from(plan_t, q, group_name, executed, u_deg, backend, dropout_p, scale)


@attention_heads.register_fake
def _(q_h, k_h, v_h, mask_h, bias_h, plan_t, q, group_name, strategy, ulysses_degree, backend, dropout_p, scale):
    return torch.empty_like(q_h, memory_format=torch.contiguous_format), q_h.new_empty(q_h.shape[:3],
                                                                                        dtype=_acc(q_h.dtype))


@torch.library.custom_op("hpattn::attention_heads_bwd", mutates_args=(), tags=OP_TAGS)
def attention_heads_bwd(dout_h: Tensor, q_h: Tensor, k_h: Tensor, v_h: Tensor, mask_h: Tensor, bias_h: Tensor,
                        out_h: Tensor, lse: Tensor, plan_t: Tensor, q: Tensor, group_name: str, strategy: str,
                        ulysses_degree: int, backend: str, dropout_p: float,
                        scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq_h, dk_h, dv_h, dbias_h)`` shaped like ``(q_h, k_h, v_h, bias_h)`` (``dbias_h`` empty
    unless some rank needs the key bias's gradient)."""
    plan = _heads_plan(plan_t, q, group_name, strategy, ulysses_degree, backend, dropout_p, scale)
    mask, bias = _heads_mask_bias(plan, k_h, mask_h, bias_h)
    grads = list(ring_backward(plan, dout_h, q_h, k_h, v_h, bias, mask, out_h, lse))
    dbias_h = grads.pop()
    # Shaped like bias_h, as the fake promises: zeros where no rank needs the gradient, (0,) without a bias.
    dbias_h = torch.zeros_like(bias_h, memory_format=torch.contiguous_format) if dbias_h is None \
        else dbias_h.contiguous()
    # One gradient at a time: a kernel whose gradients are not heads-minor (the manual one) gets
    # each copied while the others wait, not all three beside their copies (Note [ulysses op memory]).
    return (*_distinct(grads, (dout_h, q_h, k_h, v_h, out_h, lse), layout=_heads_minor, release=True),
            *_distinct((dbias_h,), (bias_h,)))


def _heads_minor(t: Tensor) -> Tensor:
    """``t`` ``[B, h, M, D]`` as a ``[B, M, h, D]``-contiguous buffer: the layout the fused CPU
    (and CUDA) block backward returns its gradients in, so no copy there."""
    batch, h, m, head_dim = t.shape
    if t.stride() == (m * h * head_dim, head_dim, h * head_dim, 1):
        return t
    return t.new_empty((batch, m, h, head_dim)).transpose(1, 2).copy_(t)


@attention_heads_bwd.register_fake
def _(dout_h, q_h, k_h, v_h, mask_h, bias_h, out_h, lse, plan_t, q, group_name, strategy, ulysses_degree, backend,
      dropout_p, scale):
    dbias_h = torch.empty_like(bias_h, memory_format=torch.contiguous_format)  # (0,) without a bias
    return (*(t.new_empty((t.shape[0], t.shape[2], t.shape[1], t.shape[3])).transpose(1, 2)
              for t in (q_h, k_h, v_h)), dbias_h)


def _heads_setup(ctx, inputs, output) -> None:
    q_h, k_h, v_h, mask_h, bias_h, plan_t, q, *static = inputs
    out_h, lse = output
    ctx.save_for_backward(q_h, k_h, v_h, mask_h, bias_h, out_h, lse, plan_t, _shape_of(q))
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)
    ctx.static = tuple(static)
    ctx.what = AttentionSpec(static[1]).entry_point


def _heads_plain_backward(ctx, dout_h):
    return attention_heads_bwd(dout_h, *ctx.saved_tensors, *ctx.static)


_REFUSING_HEADS = {name: refuse_double_backward(name)(_heads_plain_backward) for name in ENTRY_POINTS}


def _heads_backward(ctx, dout_h, lse_grad):
    dq_h, dk_h, dv_h, dbias_h = _REFUSING_HEADS[ctx.what](ctx, dout_h)
    dbias_h = dbias_h if ctx.needs_input_grad[4] and dbias_h.dim() == 3 else None
    return dq_h, dk_h, dv_h, None, dbias_h, None, None, None, None, None, None, None, None


attention_heads.register_autograd(_heads_backward, setup_context=_heads_setup)


def _query_sizes(plan_t: Tensor, q: Tensor, group_name: str, strategy: str,
                 ulysses_degree: int) -> tuple[str, GroupInfo, list[int]]:
    """``(executed strategy, Ulysses group, its ranks' query counts)`` of an agreed ``plan_t``."""
    executed, u_deg = _static_degree(q, group_name, strategy, ulysses_degree)
    sizes = [int(n) for n in plan_t[_PLAN_HEAD:_PLAN_HEAD + u_deg].tolist()]
    return executed, _sub_groups(group_name, executed, u_deg)[0], sizes


@torch.library.custom_op("hpattn::heads_to_pixels", mutates_args=(), tags=OP_TAGS)
def heads_to_pixels_op(out_h: Tensor, plan_t: Tensor, q: Tensor, group_name: str, strategy: str,
                       ulysses_degree: int) -> Tensor:
    """The result of a U > 1 call home: ``out_h [B, h, Mq, D]`` -> ``[B, H, Nq_r, D]`` (a
    ``[B, Nq_r, H, D]``-contiguous buffer), ``q`` read for its shape (Note [ulysses op memory])."""
    executed, info, sizes = _query_sizes(plan_t, q, group_name, strategy, ulysses_degree)
    return heads_to_pixels((out_h,), info, sizes, f"{executed}.out")[0]


@heads_to_pixels_op.register_fake
def _(out_h, plan_t, q, group_name, strategy, ulysses_degree):
    return _pixels_from_heads(q)


@torch.library.custom_op("hpattn::pixels_to_heads", mutates_args=(), tags=OP_TAGS)
def pixels_to_heads_op(dout: Tensor, plan_t: Tensor, out_h: Tensor, q: Tensor, group_name: str, strategy: str,
                       ulysses_degree: int) -> Tensor:
    """The adjoint of ``hpattn::heads_to_pixels``: ``[B, H, Nq_r, D]`` -> ``[B, h, Mq, D]`` shaped
    like ``out_h`` (read for its shape), a ``[B, Mq, h, D]``-contiguous buffer: the layout the
    fused block backward reads ``dout`` in (Note [head exchange memory])."""
    executed, info, sizes = _query_sizes(plan_t, q, group_name, strategy, ulysses_degree)
    return pixels_to_heads((dout,), info, sizes, f"{executed}.out.grad", heads_minor=True)[0]


@pixels_to_heads_op.register_fake
def _(dout, plan_t, out_h, q, group_name, strategy, ulysses_degree):
    batch, h, m, head_dim = out_h.shape
    return out_h.new_empty((batch, m, h, head_dim)).transpose(1, 2)


def _exchange_setup(ctx, inputs, output) -> None:
    x, plan_t, *likes = inputs[:-3]
    ctx.save_for_backward(plan_t, _shape_of(x), *(_shape_of(t) for t in likes))
    ctx.static = inputs[-3:]


def _heads_to_pixels_backward(ctx, dout):
    plan_t, out_h, q = ctx.saved_tensors
    return torch.ops.hpattn.pixels_to_heads(dout, plan_t, out_h, q, *ctx.static), None, None, None, None, None


def _pixels_to_heads_backward(ctx, dout_h):
    plan_t, _, _, q = ctx.saved_tensors  # pure communication: the adjoint is exact
    return torch.ops.hpattn.heads_to_pixels(dout_h, plan_t, q, *ctx.static), None, None, None, None, None, None


heads_to_pixels_op.register_autograd(_heads_to_pixels_backward, setup_context=_exchange_setup)
pixels_to_heads_op.register_autograd(_pixels_to_heads_backward, setup_context=_exchange_setup)

# Note [ops that communicate are never dead code] (every op here communicates, or for a hybrid
# may: attention_heads runs the ring across Ulysses groups).
for _op in (attention_fwd, attention_bwd, attention_heads, attention_heads_bwd, heads_to_pixels_op,
            pixels_to_heads_op):
    torch.fx.node.has_side_effect(_op._opoverload)
