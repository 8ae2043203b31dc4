"""The two all-to-alls of head parallelism (Ulysses), with one packing copy on each side.

Legend: B batch, H heads, D head dim, P ranks in the group, r this rank, h = H / P heads per rank,
N_i pixels on rank i (ranks may differ, zero included), N = sum of N_i, T tensors moved together
(3 for q, k, v).

:func:`pixels_to_heads` turns T pixel shards ``[B, H, N_r, D]`` into whole-sequence heads
``[B, h, N, D]`` (heads ``r*h .. r*h+h-1``); :func:`heads_to_pixels` is the way back. Each is ONE
``all_to_all_single`` for all T tensors, and an ``autograd.Function`` whose backward applies the
other direction (Note [all-to-all adjoint] in ``all_to_all.py``), so that double backward is exact.

Note [head exchange layout]
    ``all_to_all_single`` concatenates what it receives in source-rank order, so the buffers are
    laid out with the rank dimension outermost and the pixel dimension next::

        pixels -> heads   send [P(dest), N_r, T, B, h, D]   recv [N (= sources x N_i), T, B, h, D]
        heads -> pixels   send [N (= dests x N_i), B, h, D] recv [P(source), N_r, B, h, D]

    One copy packs the send buffer and one unpacks the receive buffer into the layout the next
    step reads fastest: contiguous ``[T, B, h, N, D]`` for the attention kernel (the CPU flash
    kernel is slower on the interleaved ``[N, T, B, h, D]`` view than the copy costs), and
    ``[B, N_r, H, D]`` for the output, so that the layer's ``out.transpose(1, 2).reshape(B, N_r,
    E)`` before ``out_proj`` is a view. The generic :func:`~hpattn_dist.comm.all_to_all.all_to_all`
    moves the same bytes but copies twice more (stack, pack, concatenate) and, with one output per
    tensor, its backward sums zero-filled gradients.

Counting, as for :func:`~hpattn_dist.comm.all_to_all.all_to_all`: the bytes sent to other ranks,
under ``label`` forward and ``label + ".grad"`` backward.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from einops import rearrange
from torch import Tensor

from hpattn_dist.comm.all_to_all import all_to_all, all_to_all_flat
from hpattn_dist.comm.groups import GroupInfo

__all__ = ["gather_pixels", "heads_to_pixels", "pixels_to_heads", "qkv_to_heads"]


def _scatter_heads_raw(xs: Sequence[Tensor], info: GroupInfo, sizes: list[int], label: str) -> list[Tensor]:
    """T x ``[B, H, N_r, D]`` -> T x ``[B, h, N, D]`` (views of one contiguous ``[T, B, h, N, D]``)."""
    p, n_r = info.world_size, sizes[info.rank]
    batch, heads, _, head_dim = xs[0].shape
    h, t = heads // p, len(xs)
    send = xs[0].new_empty((p, n_r, t, batch, h, head_dim))
    for i, x in enumerate(xs):
        send[:, :, i].copy_(rearrange(x, "b (p h) n d -> p n b h d", p=p))
    piece = n_r * t * batch * h * head_dim
    recv = all_to_all_flat(send.view(-1), [piece] * p, [n * t * batch * h * head_dim for n in sizes],
                           info, label)
    del send  # before the unpacked copy is allocated: two buffers alive at a time, not three
    recv = recv.view(sum(sizes), t, batch, h, head_dim)
    out = torch.empty((t, batch, h, sum(sizes), head_dim), dtype=recv.dtype, device=recv.device)
    out.copy_(rearrange(recv, "n t b h d -> t b h n d"))
    return list(out.unbind(0))


def _gather_heads_raw(ys: Sequence[Tensor], info: GroupInfo, sizes: list[int], label: str) -> list[Tensor]:
    """T x ``[B, h, N, D]`` -> T x ``[B, H, N_r, D]`` (views of one ``[B, N_r, T, H, D]`` buffer)."""
    p, n_r = info.world_size, sizes[info.rank]
    batch, h, n, head_dim = ys[0].shape
    t = len(ys)
    send = ys[0].new_empty((n, t, batch, h, head_dim))
    for i, y in enumerate(ys):
        send[:, i].copy_(rearrange(y, "b h n d -> n b h d"))
    unit = t * batch * h * head_dim
    recv = all_to_all_flat(send.view(-1), [m * unit for m in sizes], [n_r * unit] * p, info, label)
    del send
    recv = recv.view(p, n_r, t, batch, h, head_dim)
    out = torch.empty((batch, n_r, t, p * h, head_dim), dtype=recv.dtype, device=recv.device)
    rearrange(out, "b n t (p h) d -> p n t b h d", p=p).copy_(recv)
    return [y.transpose(1, 2) for y in out.unbind(2)]


class _HeadExchange(torch.autograd.Function):
    """One direction of the exchange; its backward is the other direction (the adjoint)."""

    @staticmethod
    def forward(ctx, to_heads: bool, info: GroupInfo, sizes: list[int], label: str,
                *xs: Tensor) -> tuple[Tensor, ...]:
        move = _scatter_heads_raw if to_heads else _gather_heads_raw
        ys = move(xs, info, sizes, label)
        ctx.to_heads, ctx.info, ctx.sizes, ctx.label = to_heads, info, sizes, label
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        # An output left out of the loss arrives as zeros (autograd materialises it), not None.
        # The adjoint through apply, so that it is recorded under create_graph=True: double
        # backward is exact (Note [double backward] in hpattn_dist/double_backward.py).
        back = _HeadExchange.apply(not ctx.to_heads, ctx.info, ctx.sizes, ctx.label + ".grad", *grads)
        return (None, None, None, None, *back)


def pixels_to_heads(xs: Sequence[Tensor], info: GroupInfo, sizes: Sequence[int], label: str) -> tuple[Tensor, ...]:
    """Pixel shards -> whole-sequence heads, for several tensors in one all-to-all.

    Args:
        xs: T tensors ``[B, H, N_r, D]`` of one dtype and shape (any strides), H divisible by P.
        info: the resolved group.
        sizes: every rank's N_i, in group-rank order (``sizes[r] == N_r``).
        label: counter label (``label + ".grad"`` for the backward).

    Returns:
        T contiguous tensors ``[B, h, N, D]`` holding heads ``r*h .. r*h+h-1`` of every pixel, pixels
        in group-rank order; differentiable.
    """
    sizes = [int(s) for s in sizes]
    if info.world_size == 1:
        return tuple(x.contiguous() for x in xs)
    return _HeadExchange.apply(True, info, sizes, label, *xs)


def heads_to_pixels(ys: Sequence[Tensor], info: GroupInfo, sizes: Sequence[int], label: str) -> tuple[Tensor, ...]:
    """Whole-sequence heads -> pixel shards, the inverse of :func:`pixels_to_heads`.

    Args:
        ys: T tensors ``[B, h, N, D]`` (any strides), heads ``r*h ..`` of every pixel.
        info, sizes, label: as for :func:`pixels_to_heads`.

    Returns:
        T tensors ``[B, H, N_r, D]``, transposed views of one contiguous ``[B, N_r, T, H, D]``
        buffer (Note [head exchange layout]; for T = 1, ``y.transpose(1, 2)`` is contiguous);
        differentiable.
    """
    sizes = [int(s) for s in sizes]
    if info.world_size == 1:
        return tuple(ys)
    return _HeadExchange.apply(False, info, sizes, label, *ys)


def qkv_to_heads(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Optional[Tensor],
    info: GroupInfo,
    sizes: list[int],
    label: str,
    key_sizes: Optional[list[int]] = None,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """``[B, H, N_r, D]`` shards -> contiguous ``[B, h, N, D]`` whole-sequence heads ``r*h ..``.

    ``bias`` ``[B, H|1, N_r]`` -> ``[B, h|1, N]``. ``sizes``: every rank's N_r. One all-to-all for
    q, k and v together (label ``label + ".qkv"``, Note [head exchange layout]) and one for the
    bias (``label + ".bias"``). ``key_sizes``: every rank's key count K_r when k, v (and the bias)
    are ``[B, H, K_r, D]`` on a grid of their own (cross-attention); unless it equals ``sizes``, q
    travels alone (``label + ".q"``) and k, v together (``label + ".kv"``).
    """
    key_sizes = sizes if key_sizes is None else key_sizes
    if list(key_sizes) == list(sizes):
        q_h, k_h, v_h = pixels_to_heads((q, k, v), info, sizes, label + ".qkv")
    else:
        (q_h,) = pixels_to_heads((q,), info, sizes, label + ".q")
        k_h, v_h = pixels_to_heads((k, v), info, key_sizes, label + ".kv")
    sizes = key_sizes  # the bias is per key
    bias_h = None
    if bias is not None and bias.shape[1] == 1:
        bias_h = gather_pixels(bias[:, 0], info, sizes, label + ".bias")[:, None]  # [B, 1, N]
    elif bias is not None:
        # [B, H, N_r] -> [B, h, N]
        bias_h = all_to_all(bias, info, scatter_dim=1, gather_dim=2, gather_sizes=sizes,
                            label=label + ".bias")
    return q_h, k_h, v_h, bias_h


def gather_pixels(x: Tensor, info: GroupInfo, sizes: list[int], label: str) -> Tensor:
    """Per-key values ``[B, N_r]`` -> ``[B, N]`` on every rank (differentiable all-gather).

    Done as an all-to-all of ``x`` expanded to ``[B, P, N_r]`` (one copy per destination rank,
    ``(P - 1) * B * N_r`` elements sent); its adjoint, the reverse all-to-all followed by the
    expand's sum, is the reduce-scatter.
    """
    expanded = x[:, None, :].expand(-1, info.world_size, -1)  # [B, P, N_r]
    # [B, P, N_r] -> [B, 1, N]
    return all_to_all(expanded, info, scatter_dim=1, gather_dim=2, gather_sizes=sizes, label=label)[:, 0]
