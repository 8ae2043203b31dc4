"""Windowed attention as two registered operators, ``hpattn::window_attention_fwd`` and ``_bwd``.

Legend: B batch, H heads, Hb key-bias heads, D head dim, P ranks of the group, Nq_r / Nk_r this
rank's queries / keys, E the edge cells this rank reads (its halo and the cells it shares with a
neighbour rank, Note [local attention plan]), c_k key pixels per cell.

Note [windowed attention as one op]
    As Note [attention as one op] (``strategies/ops.py``): one call of windowed attention (local,
    or cross-grid with ``window_nside``) is ONE dispatcher operator whose body is the door
    (:func:`~hpattn_dist.local.agreement.agree`: the checks and the one agreement), the plan and
    the executor (:mod:`hpattn_dist.local.execute`, its halo exchange included); its backward is a
    second operator. ``torch.compile(fullgraph=True)`` sees one node per call, with or without a
    process group. What crosses between the two, as arguments and outputs:

    * the static values: the group by its registered name (``""``: one process), the window,
      backend, dropout probability, scale, ``cross`` and whether this rank's key bias needs a
      gradient (agreed: the flag is part of the signature);
    * the agreed values, an int64 ``plan`` ``[2 + 2P]``: ``(use_bias, seed, Nq_r of every rank,
      Nk_r of every rank)``, from which the backward takes its cached plan;
    * the residuals: ``out``, its ``lse`` and the edge cells' keys, values and bias as the forward
      assembled them (``edge_kv [2, B * H, (E + z) * c_k, D]``, ``edge_bias`` flat), so the
      backward sends only the halo rows' gradients home. E is set by the peers' shards: the fake
      makes it an unbacked size, as the Ulysses residuals' M (Note [compiling the attention]).

    The dropout seed is an input drawn before the op (Note [seed outside the op] in
    ``kernels/dropout.py``), so a checkpointed recomputation draws what the forward drew; the layer's
    parameters are read inside the agreement. Both ops are side-effectful to compilers (Note [ops
    that communicate are never dead code]).
"""

from __future__ import annotations

import math
import operator
from dataclasses import replace
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from hpattn_dist.attention_spec import ENTRY_POINTS, AttentionSpec
from hpattn_dist.comm.agreement import records_gradients
from hpattn_dist.comm.groups import resolve_group
from hpattn_dist.double_backward import refuse_double_backward
from hpattn_dist.kernels import seed_input, select_kernel
from hpattn_dist.local import execute
from hpattn_dist.local.agreement import agree
from hpattn_dist.local.plan import cached_plan
from hpattn_dist.masks import key_bias_from_mask
from hpattn_dist.replicas import LayerFacts, LayerRef, layer_of_op_args, layer_op_args
from hpattn_dist.strategies.ops import OP_TAGS, _acc, _distinct, _group, _group_pixels, group_name_of

__all__ = ["op_window_attention"]

_PLAN_HEAD = 2  # use_bias, seed


@torch.library.custom_op("hpattn::window_attention_fwd", mutates_args=(), tags=OP_TAGS)
def window_attention_fwd(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], key_bias: Optional[Tensor],
                         group_name: str, window_nside: int, mode: str, backend: str, dropout_p: float,
                         scale: float, dropout_seed: Optional[Tensor], layer_params: list[Tensor],
                         layer_name: str, layer_healpix: bool, layer_facts: Optional[Tensor], needs_grad: bool,
                         bias_grad: bool, cross: bool, strategy: str,
                         what: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(out, plan, lse, edge_kv, edge_bias)`` (Note [windowed attention as one op]).

    ``dropout_seed``: this rank's proposal, an int64 CPU tensor ``[1]`` drawn before the call, or
    None without dropout. ``layer_name`` non-empty: a layer's call, whose parameters
    (``layer_params``, or their fingerprint ``layer_facts``, :func:`~hpattn_dist.replicas.layer_op_args`) and field are checked
    in the same agreement. ``strategy``: as the caller named it. ``out [B, H, Nq_r, D]``, ``lse [B, H,
    Nq_r]`` (accumulation dtype), ``edge_kv [2, B * H, (E + z) * c_k, D]``, ``edge_bias`` flat
    (empty without a bias).
    """
    info = _group(group_name)
    layer = layer_of_op_args(layer_name, layer_params, layer_healpix, layer_facts, point_sets=False)
    spec = AttentionSpec(strategy or "auto", backend, dropout_p, scale, 0 if dropout_seed is None else int(dropout_seed),
                         cross=cross, window_nside=window_nside, mode=mode)
    call = agree(q, k, v, info, spec, key_mask=key_mask, key_bias=key_bias, layer=layer,
                 what=what if layer is None else layer.name, needs_grad=needs_grad, bias_grad=bias_grad)
    out, lse, edge_kv, edge_bias = execute.forward(call.plan, q, k, v, call.bias, info, call.kernel, call.scale,
                                                   dropout_p, call.seed)
    plan_t = torch.tensor((int(call.use_bias), call.seed, *call.sizes, *(call.key_sizes or call.sizes)),
                          dtype=torch.int64)
    edge_bias = q.new_empty((0,), dtype=_acc(q.dtype)) if edge_bias is None else edge_bias.reshape(-1)
    return _distinct((out, plan_t, lse, edge_kv, edge_bias), (q, k, v, key_mask, key_bias))


@window_attention_fwd.register_fake
def _(q, k, v, key_mask, key_bias, group_name, window_nside, mode, backend, dropout_p, scale, dropout_seed,
      layer_params, layer_name, layer_healpix, layer_facts, needs_grad, bias_grad, cross, strategy, what):
    batch, heads, n_local, head_dim = q.shape
    p = _group(group_name).world_size
    plan_t = torch.empty((_PLAN_HEAD + 2 * p,), dtype=torch.int64)  # CPU, like the real one
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty((batch, heads, n_local), dtype=_acc(q.dtype))
    edge_kv = q.new_empty((2, batch * heads, _group_pixels(), head_dim))
    edge_bias = q.new_empty((_group_pixels(),), dtype=_acc(q.dtype))
    return out, plan_t, lse, edge_kv, edge_bias


@torch.library.custom_op("hpattn::window_attention_bwd", mutates_args=(), tags=OP_TAGS)
def window_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                         key_bias: Optional[Tensor], out: Tensor, plan_t: Tensor, lse: Tensor, edge_kv: Tensor,
                         edge_bias: Tensor, group_name: str, window_nside: int, mode: str, backend: str,
                         dropout_p: float, scale: float, cross: bool,
                         bias_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dkey_bias)`` from what ``window_attention_fwd`` returned; ``dkey_bias`` is
    shaped like ``key_bias`` when ``bias_grad``, else empty."""
    values = [int(x) for x in plan_t.tolist()]
    use_bias, seed = bool(values[0]), values[1]
    p = (len(values) - _PLAN_HEAD) // 2
    sizes, key_sizes = tuple(values[_PLAN_HEAD:_PLAN_HEAD + p]), tuple(values[_PLAN_HEAD + p:])
    info = _group(group_name)
    plan = cached_plan(sizes, key_sizes if cross else None, window_nside, mode, info.rank, q.device)
    bias = key_bias_from_mask(k, key_mask, key_bias) if use_bias else None
    kernel = select_kernel(backend, q, has_bias=use_bias, dropout=dropout_p > 0)
    edge_b = None if bias is None else edge_bias.view(bias.shape[0] * bias.shape[1], edge_kv.shape[2])
    dq, dk, dv, dbias = execute.backward(plan, dout, q, k, v, bias, out, lse, edge_kv, edge_b, info, kernel, scale,
                                         dropout_p, seed, bias_grad)
    d_key_bias = q.new_empty((0,))
    if bias_grad:
        d_key_bias = dbias.reshape(key_bias.shape).to(key_bias.dtype)
    return _distinct((dq, dk, dv, d_key_bias), (dout, q, k, v, out, lse, key_bias))


@window_attention_bwd.register_fake
def _(dout, q, k, v, key_mask, key_bias, out, plan_t, lse, edge_kv, edge_bias, group_name, window_nside, mode,
      backend, dropout_p, scale, cross, bias_grad):
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)]
    d_key_bias = torch.empty_like(key_bias, memory_format=torch.contiguous_format) if bias_grad \
        else q.new_empty((0,))
    return (*grads, d_key_bias)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, key_mask, key_bias, group_name, window_nside, mode, backend, dropout_p, scale = inputs[:11]
    ctx.n_layer_params = len(inputs[12])
    bias_grad, cross = inputs[17], inputs[18]
    out, plan_t, lse, edge_kv, edge_bias = output
    ctx.save_for_backward(q, k, v, key_mask, key_bias, out, plan_t, lse, edge_kv, edge_bias)
    ctx.static = (group_name, window_nside, mode, backend, dropout_p, scale, cross, bias_grad)
    ctx.what = AttentionSpec(cross=cross, window_nside=window_nside).entry_point
    ctx.set_materialize_grads(False)  # no zero gradients for the residuals (edge_kv is 2 e units)


def _plain_backward(ctx, dout):
    return window_attention_bwd(dout, *ctx.saved_tensors, *ctx.static)


# The backward is explicit, so not differentiable: Note [double backward], named per entry point.
_REFUSING = {name: refuse_double_backward(name)(_plain_backward) for name in ENTRY_POINTS}


def _backward(ctx, dout, *unused):
    dq, dk, dv, d_key_bias = _REFUSING[ctx.what](ctx, dout)
    bias_grad = ctx.static[-1]
    # No gradient for the layer's parameters through here: the op only reads their sums.
    return (dq, dk, dv, None, d_key_bias if bias_grad else None, None, None, None, None, None, None, None,
            [None] * ctx.n_layer_params, None, None, None, None, None, None, None, None)


window_attention_fwd.register_autograd(_backward, setup_context=_setup_context)

# Both ops communicate (the agreement, the halo): never dead code to a compiler (Note [ops that
# communicate are never dead code] in hpattn_dist/strategies/ops.py).
for _op in (window_attention_fwd, window_attention_bwd):
    torch.fx.node.has_side_effect(_op._opoverload)


def _op_ready(q, k, v, key_mask, key_bias, group, spec: AttentionSpec) -> bool:
    """Arguments the op's schema takes, on one real device: anything else goes to the door
    directly, which refuses it on every rank (Note [fail together])."""
    tensors = (q, k, v, key_mask, key_bias)
    if not all(isinstance(t, Tensor) for t in (q, k, v)) or not all(
            t is None or isinstance(t, Tensor) for t in (key_mask, key_bias)):
        return False
    devices = {t.device for t in tensors if t is not None}
    number = (int, float)
    dropout_p, scale, seed = spec.dropout_p, spec.scale, spec.dropout_seed
    return (len(devices) == 1 and q.device.type != "meta"
            and (group is None or isinstance(group, dist.ProcessGroup))
            and type(spec.window_nside) is int and isinstance(spec.mode, str) and isinstance(spec.backend, str)
            and isinstance(spec.strategy, str)
            and isinstance(dropout_p, number) and not isinstance(dropout_p, bool) and math.isfinite(dropout_p)
            and (scale is None or isinstance(scale, number) and not isinstance(scale, bool))
            and (seed is None or type(seed) is int and 0 <= seed < 2**31))


def op_window_attention(spec: AttentionSpec, q: Tensor, k: Tensor, v: Tensor, group: Optional[dist.ProcessGroup],
                        *, key_mask: Optional[Tensor], key_bias: Optional[Tensor],
                        layer: "Optional[LayerFacts | LayerRef]", what: str) -> Tensor:
    """Windowed attention, self (:func:`~hpattn_dist.local.attention.healpix_local_attention`) or across
    two grids (``spec.cross``: q on one NESTED grid, k, v, the key mask and bias on another, sharded
    independently; Note [local attention plan]), through ``hpattn::window_attention_fwd`` (Note
    [windowed attention as one op]): ``q [B, H, Nq_r, D]``, ``k, v [B, H, Nk_r, D]`` in,
    ``[B, H, Nq_r, D]`` out; ``spec`` with ``window_nside`` set. ``layer``: the calling layer's facts,
    or a :class:`~hpattn_dist.replicas.LayerRef` whose parameters the op reads (so that
    ``torch.compile`` sees no parameter sums); ``what`` names the entry point in errors."""
    needs_grad = records_gradients(*(t for t in (q, k, v, key_bias) if isinstance(t, Tensor)))
    bias_grad = needs_grad and isinstance(key_bias, Tensor) and key_bias.requires_grad
    if not isinstance(spec.window_nside, (bool, int)) and hasattr(spec.window_nside, "__index__"):
        spec = replace(spec, window_nside=operator.index(spec.window_nside))  # a numpy integer
    if not _op_ready(q, k, v, key_mask, key_bias, group, spec):
        # The door raises on every rank for any argument the op cannot take; a peer that took the
        # op path meets a different signature (via_op) and raises too.
        proposal = replace(spec, dropout_seed=0 if spec.dropout_seed is None else spec.dropout_seed)
        agree(q, k, v, resolve_group(group), proposal, key_mask=key_mask, key_bias=key_bias, layer=layer,
              what=what if layer is None else layer.name, needs_grad=needs_grad, bias_grad=bias_grad, via_op=False)
        raise ValueError(f"{what}: arguments the registered op cannot take (q {type(q).__name__} on "
                         f"{getattr(q, 'device', '?')}, window_nside {spec.window_nside!r}, scale {spec.scale!r}, "
                         f"dropout_p {spec.dropout_p!r})")
    return torch.ops.hpattn.window_attention_fwd(
        q, k, v, key_mask, key_bias, group_name_of(group), spec.window_nside, spec.mode, spec.backend,
        float(spec.dropout_p), spec.scale_for(q.shape[-1]),
        seed_input(spec.dropout_p, spec.dropout_seed), *layer_op_args(layer), needs_grad, bias_grad,
        bool(spec.cross), spec.strategy, what,
    )[0]
