"""The Python side of a global attention call: its arguments as the registered ops take them, the
ops in sequence (Note [attention as one op] in :mod:`hpattn_dist.strategies.ops`), and the one
refusal of what they cannot take.

Legend: B batch, H heads, D head dim, Nq_r / Nk_r this rank's queries / keys.
"""

from __future__ import annotations

from typing import NoReturn, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from hpattn_dist.attention_spec import AttentionSpec
from hpattn_dist.comm.agreement import records_gradients
from hpattn_dist.comm.groups import GroupInfo
from hpattn_dist.kernels import seed_input
from hpattn_dist.replicas import LayerFacts, LayerRef, layer_op_args
from hpattn_dist.strategies.ops import _PAIR, group_name_of
from hpattn_dist.strategies.plan import plan_attention

__all__ = ["off_op_reason", "op_attention", "refuse_off_op"]


def op_attention(spec: AttentionSpec, q: Tensor, k: Tensor, v: Tensor, group: Optional[dist.ProcessGroup], *,
                 key_mask: Optional[Tensor], key_bias: Optional[Tensor] = None,
                 layer: "Optional[LayerFacts | LayerRef]" = None, groups: Optional[tuple] = None) -> Tensor:
    """:func:`~hpattn_dist.strategies.api.sharded_attention` through ``hpattn::attention_fwd``
    (Note [attention as one op]); ``q [B, H, Nq_r, D]``, ``k, v [B, H, Nk_r, D]`` (``Nk_r = Nq_r``
    unless ``spec.cross``), ``key_bias [B, Nk_r]`` or ``[B, H, Nk_r]`` in, ``[B, H, Nq_r, D]`` out.
    ``groups``: an explicit ``(ulysses_group, ring_group)`` pair (``hybrid_attention``) instead of
    ``group``. Arguments the op cannot take are refused on every rank (:func:`refuse_off_op`)."""
    what = layer.name if isinstance(layer, (LayerFacts, LayerRef)) else spec.entry_point
    group, groups = _process_groups(group), None if groups is None else tuple(_process_groups(g) for g in groups)
    reason = off_op_reason(spec, what, q, k, v, key_mask, key_bias, group if groups is None else groups, layer)
    if reason is not None:
        refuse_off_op(reason, spec, q, k, v, group, groups=groups, key_mask=key_mask, key_bias=key_bias,
                      layer=layer, what=what)
    group_name = group_name_of(group) if groups is None else _PAIR.join(group_name_of(g) for g in groups)
    u, dropout_p = spec.ulysses_degree or 0, float(spec.dropout_p)
    scale = spec.scale_for(q.shape[-1])
    grad_on = torch.is_grad_enabled()
    x, plan_t, _, k_h, v_h, mask_h, bias_h = torch.ops.hpattn.attention_fwd(
        q, k, v, key_mask, key_bias, group_name, spec.strategy, u, spec.backend, dropout_p, scale,
        seed_input(dropout_p, spec.dropout_seed), *layer_op_args(layer),
        grad_on and (k.requires_grad or v.requires_grad), records_gradients(q, k, v, key_bias),
        grad_on and key_bias is not None and key_bias.requires_grad, bool(spec.cross),
    )
    if x.shape[1] == q.shape[1]:  # U = 1: the result itself
        return x
    out_h = torch.ops.hpattn.attention_heads(x, k_h, v_h, mask_h, bias_h, plan_t, q, group_name, spec.strategy, u,
                                             spec.backend, dropout_p, scale)[0]
    return torch.ops.hpattn.heads_to_pixels(out_h, plan_t, q, group_name, spec.strategy, u)


def _process_groups(group: object) -> object:
    """A resolved :class:`GroupInfo` as its ProcessGroup (None: WORLD or no torch.distributed)."""
    return group.group if isinstance(group, GroupInfo) else group


# Note [what the attention op cannot take]
# A call runs through the registered ops only: compile, checkpoint policies and the memory
# accounting then see one op family, and there is one execution of each strategy. What an op's
# schema cannot carry, or what would dispatch differently on one rank than on its peers, is no
# valid call: tensors that are not all on one real device (a meta tensor dispatches to the op's
# fake, which skips the agreement and its exchanges, so the peers would wait), a group that is
# no ProcessGroup (an unbound layer's marker; the op takes groups by registered name), options
# the spec's one validation refuses (a dropout seed that is no int in [0, 2**31), a dropout
# probability outside [0, 1), ...: the op would convert or draw them before its agreement), a
# scale that is no real number, a layer that is neither LayerRef nor LayerFacts.
# :func:`off_op_reason` names the argument; such a rank still runs the door's agreement
# (:func:`refuse_off_op`, the agreed ``via_op`` flag off), so that its bad argument, or the
# flag, makes EVERY rank raise (Note [fail together]) instead of leaving the peers in the op's
# exchanges. Where the door's own checks refuse the argument first, that message is raised.


def off_op_reason(spec: AttentionSpec, what: str, q: object, k: object, v: object, key_mask: object,
                  key_bias: object, group: object, layer: object) -> Optional[str]:
    """Why the registered op cannot take these arguments (naming the argument), or None
    (Note [what the attention op cannot take]). ``group``: a group, or an explicit pair. The
    options are the spec's one validation (:meth:`AttentionSpec.check`), whose message the
    door's agreement then raises on every rank."""
    named = {"q": q, "k": k, "v": v, "key_mask": key_mask, "key_bias": key_bias}
    for name, t in named.items():
        if not (t is None and name.startswith("key_") or isinstance(t, Tensor)):
            return f"{name} must be a torch.Tensor, got {type(t).__name__}"
    devices = {str(t.device) for t in named.values() if t is not None}
    if len(devices) > 1 or "meta" in devices:
        return ("q, k, v, key_mask and key_bias must be on one real device, got "
                + ", ".join(f"{n} on {t.device}" for n, t in named.items() if t is not None))
    for name, g in zip(("group",) if not isinstance(group, tuple) else ("ulysses_group", "ring_group"),
                       group if isinstance(group, tuple) else (group,)):
        if not (g is None or isinstance(g, dist.ProcessGroup)):
            return f"{name} must be a torch.distributed ProcessGroup or None, got {type(g).__name__}"
    try:
        spec.check(what)
    except ValueError as err:
        return str(err)
    if spec.scale is not None and (isinstance(spec.scale, bool) or not isinstance(spec.scale, (int, float))):
        return f"scale must be None or a number, got {spec.scale!r}"
    if layer is not None and not isinstance(layer, (LayerFacts, LayerRef)):
        return f"layer must be a LayerFacts or LayerRef, got {type(layer).__name__}"
    return None


def refuse_off_op(reason: str, spec: AttentionSpec, q: Tensor, k: Tensor, v: Tensor,
                  group: Optional[dist.ProcessGroup], *, what: str, **kwargs) -> NoReturn:
    """The one refusal of arguments the op cannot take (Note [what the attention op cannot take]):
    the door's agreement with ``via_op`` off, then ``ValueError`` naming the argument."""
    plan_attention(spec, q, k, v, group, via_op=False, what=what, **kwargs)
    raise ValueError(f"{what}: {reason}")
