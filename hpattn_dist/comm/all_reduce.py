"""Autograd-aware all-reduces over a process group, for statistics over sharded pixels.

Layers whose output depends on a sum over ALL pixels (batch / instance / group norm statistics,
global pooling) sum their local partial sums with :func:`all_reduce_sum`. Its result is
replicated: every rank of the group holds the same value.

Note [replicated activations]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A tensor replicated over the sequence-parallel group (the sum above, a pooled ``[B, C]`` vector,
a parameter) carries, on rank r, the gradient of rank r's share of the loss only; the full
gradient is the SUM over ranks (the convention of :mod:`hpattn_dist.grad_sync` for replicated
parameters, which :func:`~hpattn_dist.grad_sync.sync_gradients` completes). So the adjoint of

    y = sum_q x_q            (forward: all-reduce, y replicated)

is ``dx_r = sum_q dy_q`` (backward: the same all-reduce of the gradients), which hands every
rank the full gradient of the loss with respect to ``y``. Backward calls the same Function, so
double backward works too. As with every collective in autograd, every rank of the group must
run the backward through a given call (with a zero gradient if its loss does not depend on it).

Communication is recorded (:func:`hpattn_dist.comm.counters.record`) as the ring algorithm's
payload, ``2 (P - 1) / P`` times the buffer, like every all-reduce of this library; nothing is
sent or recorded with one rank. Waits are bounded by the exchange timeout (Note [exchange
timeout] in :mod:`hpattn_dist.comm.groups`).
"""

from __future__ import annotations


import torch
import torch.distributed as dist
from torch import Tensor

from hpattn_dist.comm.counters import record
from hpattn_dist.comm.groups import GroupInfo, nbytes
from hpattn_dist.comm.waits import run_collective

__all__ = ["all_reduce_", "all_reduce_sum"]


def all_reduce_(t: Tensor, info: GroupInfo, op: "dist.ReduceOp" = dist.ReduceOp.SUM,
                label: str = "all_reduce.stats") -> Tensor:
    """Reduce ``t`` in place over the group (no autograd) and return it.

    Args:
        t: a contiguous tensor, same shape and dtype on every rank (on the CUDA device for NCCL).
        info: the group (:func:`hpattn_dist.comm.groups.resolve_group`).
        op: ``dist.ReduceOp.SUM``, ``MAX``, ``MIN``, ...
        label: counter label.

    Raises:
        ExchangeError: the collective failed or did not finish within the exchange timeout.
    """
    if info.world_size == 1:
        return t
    run_collective(info, label, "the all_reduce",
                   lambda: dist.all_reduce(t, op=op, group=info.group, async_op=True), t.device)
    record(label, 2 * (info.world_size - 1) * nbytes(t) // info.world_size)
    return t


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks of the group; the result is replicated.

    ============  ===========  =============================================
    tensor        local shape  formula
    ============  ===========  =============================================
    x (input)     ``[*]``      rank r's partial value ``x_r``
    y (output)    ``[*]``      ``y = sum_q x_q``, the same on every rank
    dx            ``[*]``      ``dx_r = sum_q dy_q`` (Note [replicated activations])
    ============  ===========  =============================================
    """

    @staticmethod
    def forward(ctx, x: Tensor, info: GroupInfo, label: str) -> Tensor:
        ctx.info, ctx.label = info, label
        return all_reduce_(x.clone(memory_format=torch.contiguous_format), info, label=label)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        return _AllReduceSum.apply(grad_y, ctx.info, ctx.label + ".backward"), None, None


def all_reduce_sum(x: Tensor, info: GroupInfo, label: str = "all_reduce.stats") -> Tensor:
    """``sum_q x_q`` over the ranks of the group, on every rank, differentiably.

    Args:
        x: rank r's partial sum ``[*]``; same shape and dtype on every rank.
        info: the group (:func:`hpattn_dist.comm.groups.resolve_group`).
        label: counter label of the forward; the backward records under ``label + ".backward"``.

    Returns:
        ``[*]``, a new tensor (``x`` itself with one rank), replicated over the group; its
        backward is the same all-reduce of the gradients (Note [replicated activations]).

    Raises:
        ExchangeError: as :func:`all_reduce_`.
    """
    if info.world_size == 1:
        return x
    return _AllReduceSum.apply(x, info, label)
