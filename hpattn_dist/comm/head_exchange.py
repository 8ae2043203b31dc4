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

        pixels -> heads   send [P - 1 (dest), N_r, T, B, h, D]   recv [N - N_r (sources), T, B, h, D]
        heads -> pixels   send [N - N_r (dests), T, B, h, D]     recv [P - 1 (source), N_r, T, B, h, D]

    (this rank's own piece is not in them: Note [head exchange memory]).

    One copy packs the send buffer and one unpacks the receive buffer into the layout the next
    step reads fastest: contiguous ``[T, B, h, N, D]`` for the attention kernel (the CPU flash
    kernel is slower on the interleaved ``[N, T, B, h, D]`` view than the copy costs), and
    ``[B, N_r, H, D]`` for the output, so that the layer's ``out.transpose(1, 2).reshape(B, N_r,
    E)`` before ``out_proj`` is a view. The generic :func:`~hpattn_dist.comm.all_to_all.all_to_all`
    moves the same bytes but copies twice more (stack, pack, concatenate) and, with one output per
    tensor, its backward sums zero-filled gradients.

Note [head exchange memory]
    A rank's own piece (1/P of the data) never enters the all-to-all (its split is zero): it is
    copied from the input straight to its place in the result. Once the all-to-all has returned
    the send buffer is not read again, so it becomes the result when that is at least as large
    (always, with equal shards): an exchange holds one send/result buffer and a (P-1)/P receive
    buffer. Freeing the send buffer before allocating the result was not enough: gloo's worker
    thread may still hold it for a moment after the collective returns, and then three buffers
    were alive at the Ulysses peak.

    The backward of :func:`heads_to_pixels` returns the gradient of the attention output as a
    transposed view of ``[B, N, h, D]``: the CPU flash backward copies a ``grad_out`` in any other
    layout (one more tensor at the peak of the Ulysses backward), and returns its ``dq, dk, dv``
    in that layout too, so packing them is a plain copy.

    The registered op's backward (Note [ulysses op memory] in ``strategies/ops.py``) holds the
    forward's head-layout residuals until it returns, so it sends the three head gradients home
    with :func:`heads_to_pixels_released` instead: one tensor at a time, each released once packed,
    its own piece sent to itself, and received straight into its result ``[H, B, N_r, D]``
    (``[B, H, N_r, D]`` as a permuted view; no unpacking copy). At most one send buffer and one
    result are alive beyond the gradients themselves.

Note [backward exchanges on every rank]
    The backward of an exchange runs where autograd reaches it: on a rank where none of its inputs
    requires grad it would not run, and a peer's backward all-to-all would wait for that rank
    until the exchange timeout, or pair with its next collective of another size (gloo then aborts
    the process). The attention's exchanges run inside the registered ops (Note [ulysses op
    memory] in ``strategies/ops.py``), whose door agrees whether the call's output is
    differentiated at all (Note [gradients on every rank or none]) and which gradients any rank
    needs (``plan.grads_anywhere``): the door's backward then runs on every rank and sends the
    same tensors home everywhere (k and v whatever this rank needs, dbias when any rank needs it;
    a gradient this rank does not need is dropped).

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

__all__ = ["gather_pixels", "heads_to_pixels", "heads_to_pixels_released", "pixels_to_heads", "qkv_to_heads",
           "stacked"]


def _buffers(like: Tensor, send_elems: int, out_elems: int) -> tuple[Tensor, bool]:
    """``(flat buffer, reused)``: the send buffer, which also becomes the result (``reused``) when
    that is at least as large (Note [head exchange memory])."""
    reused = send_elems <= out_elems
    return like.new_empty(out_elems if reused else send_elems), reused


def _free(buf: Tensor) -> None:
    """Free a buffer of a completed exchange (its wait returned) now, not when the backend drops
    its own reference: gloo's worker thread may hold the send and receive buffers a moment
    longer, and the next buffer would then be allocated beside them (Note [head exchange
    memory]). Nothing reads it again (CUDA: the caching allocator reuses the block on the
    current stream, which the wait ordered after the collective)."""
    buf.untyped_storage().resize_(0)


def _scatter_heads_raw(xs: Sequence[Tensor], info: GroupInfo, sizes: list[int], label: str,
                       heads_minor: bool = False, separate: bool = False) -> list[Tensor]:
    """T x ``[B, H, N_r, D]`` -> T x ``[B, h, N, D]``: views of one contiguous ``[T, B, h, N, D]``,
    or with ``heads_minor`` transposed views of one ``[T, B, N, h, D]``, or with ``separate`` T
    contiguous tensors of their own (what a registered op may return, Note [ulysses op memory])."""
    p, r = info.world_size, info.rank
    n_r, n = sizes[r], sum(sizes)
    start, stop = sum(sizes[:r]), sum(sizes[: r + 1])
    batch, heads, _, head_dim = xs[0].shape
    h, t = heads // p, len(xs)
    unit = t * batch * h * head_dim
    if separate:
        buf, reused = xs[0].new_empty((p - 1) * n_r * unit), False
    else:
        buf, reused = _buffers(xs[0], (p - 1) * n_r * unit, n * unit)
    send = buf[: (p - 1) * n_r * unit].view(p - 1, n_r, t, batch, h, head_dim)
    for i, x in enumerate(xs):
        x_p = rearrange(x, "b (p h) n d -> p n b h d", p=p)
        send[:r, :, i].copy_(x_p[:r])
        send[r:, :, i].copy_(x_p[r + 1:])
    recv = all_to_all_flat(send.view(-1), [0 if j == r else n_r * unit for j in range(p)],
                           [0 if j == r else m * unit for j, m in enumerate(sizes)], info, label)
    del send
    if not reused:
        _free(buf)  # before the result is allocated
        buf = None if separate else recv.new_empty(n * unit)
    recv = rearrange(recv.view(n - n_r, t, batch, h, head_dim),
                     "n t b h d -> t b n h d" if heads_minor else "n t b h d -> t b h n d")
    if heads_minor:
        out = buf.view(t, batch, n, h, head_dim)
        out[:, :, :start].copy_(recv[:, :, :start])
        out[:, :, stop:].copy_(recv[:, :, start:])
        for i, x in enumerate(xs):
            out[i, :, start:stop].copy_(x[:, r * h: (r + 1) * h].transpose(1, 2))
        _free(recv)
        return [y.transpose(1, 2) for y in out.unbind(0)]
    outs = [recv.new_empty((batch, h, n, head_dim)) for _ in xs] if separate else \
        list(buf.view(t, batch, h, n, head_dim).unbind(0))
    for out, part, x in zip(outs, recv.unbind(0), xs):
        out[..., :start, :].copy_(part[..., :start, :])
        out[..., stop:, :].copy_(part[..., start:, :])
        out[:, :, start:stop].copy_(x[:, r * h: (r + 1) * h])
    _free(recv)
    return outs


def _gather_heads_raw(ys: Sequence[Tensor], info: GroupInfo, sizes: list[int], label: str) -> list[Tensor]:
    """T x ``[B, h, N, D]`` -> T x ``[B, H, N_r, D]`` (views of one ``[B, N_r, T, H, D]`` buffer)."""
    p, r = info.world_size, info.rank
    n_r = sizes[r]
    start, stop = sum(sizes[:r]), sum(sizes[: r + 1])
    batch, h, n, head_dim = ys[0].shape
    t = len(ys)
    unit = t * batch * h * head_dim
    buf, reused = _buffers(ys[0], (n - n_r) * unit, p * n_r * unit)
    send = buf[: (n - n_r) * unit].view(n - n_r, t, batch, h, head_dim)
    for i, y in enumerate(ys):
        y_n = rearrange(y, "b h n d -> n b h d")
        send[:start, i].copy_(y_n[:start])
        send[start:, i].copy_(y_n[stop:])
    recv = all_to_all_flat(send.view(-1), [0 if j == r else m * unit for j, m in enumerate(sizes)],
                           [0 if j == r else n_r * unit for j in range(p)], info, label)
    del send
    if not reused:
        _free(buf)
        buf = recv.new_empty(p * n_r * unit)
    recv = recv.view(p - 1, n_r, t, batch, h, head_dim)
    out = buf.view(batch, n_r, t, p * h, head_dim)
    out_p = rearrange(out, "b n t (p h) d -> p n t b h d", p=p)
    out_p[:r].copy_(recv[:r])
    out_p[r + 1:].copy_(recv[r:])
    for i, y in enumerate(ys):
        out_p[r, :, i].copy_(rearrange(y[:, :, start:stop], "b h n d -> n b h d"))
    _free(recv)
    return [y.transpose(1, 2) for y in out.unbind(2)]


class _HeadExchange(torch.autograd.Function):
    """One direction of the exchange; its backward is the other direction (the adjoint)."""

    @staticmethod
    def forward(ctx, to_heads: bool, heads_minor: bool, info: GroupInfo, sizes: list[int], label: str,
                *xs: Tensor) -> tuple[Tensor, ...]:
        if to_heads:
            ys = _scatter_heads_raw(xs, info, sizes, label, heads_minor=heads_minor)
        else:
            ys = _gather_heads_raw(xs, info, sizes, label)
        ctx.to_heads, ctx.info, ctx.sizes, ctx.label = to_heads, info, sizes, label
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        # An output left out of the loss arrives as zeros (autograd materialises it), not None.
        # The adjoint through apply, so that it is recorded under create_graph=True: double
        # backward is exact (Note [double backward] in hpattn_dist/double_backward.py). The
        # gradient of the attention output comes back in the layout the fused attention backward
        # reads without a copy (Note [head exchange memory]).
        back = _HeadExchange.apply(not ctx.to_heads, not ctx.to_heads, ctx.info, ctx.sizes,
                                   ctx.label + ".grad", *grads)
        return (None, None, None, None, None, *back)


def pixels_to_heads(xs: Sequence[Tensor], info: GroupInfo, sizes: Sequence[int], label: str,
                    heads_minor: bool = False) -> tuple[Tensor, ...]:
    """Pixel shards -> whole-sequence heads, for several tensors in one all-to-all.

    Args:
        xs: T tensors ``[B, H, N_r, D]`` of one dtype and shape (any strides), H divisible by P.
        info: the resolved group.
        sizes: every rank's N_i, in group-rank order (``sizes[r] == N_r``).
        label: counter label (``label + ".grad"`` for the backward).
        heads_minor: lay the result out as ``[T, B, N, h, D]`` (what a fused backward reads as
            ``grad_out`` without a copy, Note [head exchange memory]) instead of ``[T, B, h, N, D]``.

    Returns:
        T tensors ``[B, h, N, D]`` holding heads ``r*h .. r*h+h-1`` of every pixel, pixels in
        group-rank order, views of one buffer (contiguous unless ``heads_minor``); differentiable.
    """
    sizes = [int(s) for s in sizes]
    if info.world_size == 1:
        return tuple(x.contiguous() for x in xs)
    return _HeadExchange.apply(True, heads_minor, info, sizes, label, *xs)


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
    return _HeadExchange.apply(False, False, info, sizes, label, *ys)


def heads_to_pixels_released(ys: list[Tensor], info: GroupInfo, sizes: Sequence[int],
                             label: str) -> list[Tensor]:
    """:func:`heads_to_pixels` for tensors nobody else holds, at the least memory (Note [head
    exchange memory]); not differentiable.

    Args:
        ys: T tensors ``[B, h, N, D]`` (any strides); the list is emptied, and each tensor is
            released as soon as it is packed, so the caller must hold no other reference.
        info, sizes, label: as for :func:`pixels_to_heads` (one all-to-all per tensor, bytes to
            other ranks counted under ``label``).

    Returns:
        T tensors ``[B, H, N_r, D]``, each a permuted view of its own contiguous
        ``[H, B, N_r, D]`` buffer.
    """
    p, r = info.world_size, info.rank
    sizes = [int(s) for s in sizes]
    out = []
    while ys:
        y = ys.pop(0)
        batch, h, _, head_dim = y.shape
        if p == 1:
            out.append(y)
            continue
        piece = h * batch * head_dim
        send = y.new_empty(piece * sum(sizes))  # [P (dest), h, B, N_dest, D], own piece included
        start = 0
        for n_j, chunk in zip(sizes, send.split([piece * n for n in sizes])):
            chunk.view(h, batch, n_j, head_dim).copy_(y[:, :, start:start + n_j].transpose(0, 1))
            start += n_j
        del y, chunk
        recv = all_to_all_flat(send, [piece * n for n in sizes], [piece * sizes[r]] * p, info, label)
        _free(send)
        out.append(recv.view(p * h, batch, sizes[r], head_dim).transpose(0, 1))  # [B, H, N_r, D]
    return out


def stacked(ts: Sequence[Tensor]) -> Tensor:
    """``[T, *shape]`` over T tensors of one shape and dtype, contiguous (a send buffer): a view
    when they lie back to back in one contiguous buffer (the views :func:`pixels_to_heads`
    returns), else one copy into a new contiguous buffer (``torch.stack`` alone keeps the inputs'
    memory format: of two channels-last tensors it returns a non-contiguous stack, which gloo
    refuses to send)."""
    first = ts[0]
    step = first.numel()
    adjacent = first.is_contiguous() and all(
        t.is_contiguous() and t.dtype == first.dtype and t.shape == first.shape
        and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and t.storage_offset() == first.storage_offset() + i * step for i, t in enumerate(ts))
    if adjacent:
        return first.as_strided((len(ts), *first.shape), (step, *first.stride()))
    return torch.stack(tuple(ts), out=first.new_empty((len(ts), *first.shape)))


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
    """``[B, H, N_r, D]`` shards -> contiguous ``[B, h, N, D]`` whole-sequence heads ``r*h ..``,
    each in a buffer of its own (what a registered op may return, Note [ulysses op memory]); not
    differentiable.

    ``bias`` ``[B, H|1, N_r]`` -> ``[B, h|1, N]``. ``sizes``: every rank's N_r. One all-to-all for
    q, k and v together (label ``label + ".qkv"``, Note [head exchange layout]) and one for the
    bias (``label + ".bias"``). ``key_sizes``: every rank's key count K_r when k, v (and the bias)
    are ``[B, H, K_r, D]`` on a grid of their own (cross-attention); unless it equals ``sizes``, q
    travels alone (``label + ".q"``) and k, v together (``label + ".kv"``).
    """
    key_sizes = sizes if key_sizes is None else key_sizes

    def exchange(xs: tuple[Tensor, ...], sizes: list[int], label: str) -> Sequence[Tensor]:
        if info.world_size == 1:
            return [x.contiguous() for x in xs]
        return _scatter_heads_raw(xs, info, [int(n) for n in sizes], label, separate=True)

    if list(key_sizes) == list(sizes):
        q_h, k_h, v_h = exchange((q, k, v), sizes, label + ".qkv")
    else:
        (q_h,) = exchange((q,), sizes, label + ".q")
        k_h, v_h = exchange((k, v), key_sizes, label + ".kv")
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
