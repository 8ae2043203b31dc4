"""Refusing double backward by name, for autograd Functions whose backward is not differentiable.

Note [double backward]
    With ``create_graph=True`` autograd records the ops of each backward so that a gradient can be
    differentiated again (gradient penalties, Hessian-vector products). Our attention Functions
    (``_RingAttention``, ``_LocalAttention``) compute their backward from saved statistics (the
    final lse, ``delta = rowsum(dO * O)``) and, in the ring, with point-to-point exchanges that
    autograd cannot see; differentiating that backward gave wrong numbers with no error (46 % off
    at P = 1, 100 % at P = 2). Their backward is therefore decorated with
    :func:`refuse_double_backward`, which runs it without recording and hands back gradients that
    raise a ``RuntimeError`` naming the function as soon as a second differentiation reaches them.
    First-order gradients taken with ``create_graph=True`` keep working (and stay exact).

    Why not ``torch.autograd.function.once_differentiable``: its error node hangs on detached
    copies of the gradients, so ``torch.autograd.grad(..., inputs=k)`` prunes it and returns None
    or a partial sum without any error; and it attaches nothing when the incoming gradient does
    not require grad (a loss linear in the output), although the gradients still depend on q, k,
    v through the saved inputs. Our refusal node is an identity on the gradients whose graph
    edges go to the tensors the backward read (saved inputs, incoming gradients), so every
    second-order path towards an input of the Function passes through it.

    The pure communication Functions (all-to-all, head exchange, gather / scatter) need none of
    this: each backward applies the adjoint Function, which is differentiable in turn, so their
    second derivatives are exact.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["refuse_double_backward"]


class _Refuse(torch.autograd.Function):
    """Identity on ``grads`` whose backward raises; its graph edges go to ``anchors`` (the tensors
    the refused backward read: saved inputs and incoming gradients), so that a second
    differentiation towards any input of the refused Function passes through it."""

    @staticmethod
    def forward(ctx, message: str, n: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.message = message
        return tuple(t.view_as(t) for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grads: Tensor):
        raise RuntimeError(ctx.message)


def refuse_double_backward(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for an ``autograd.Function.backward`` that cannot be differentiated again.

    The Function must save (``ctx.save_for_backward``) the differentiable inputs its backward
    reads: they anchor the refusal in the graph.

    Args:
        what: the public name users call (``"ring_attention"``), for the error message.

    Returns:
        The decorator: the backward runs under ``torch.no_grad()``; when the graph is being
        recorded (``create_graph=True``), its tensor outputs come back attached to a node that
        raises ``RuntimeError("<what> does not support double backward ...")`` when a gradient of
        them is taken (Note [double backward]).
    """
    message = (
        f"{what} does not support double backward: its backward (explicit, from saved softmax "
        "statistics and communication) is not differentiable, so the gradient of a gradient "
        "through it cannot be computed. Take higher-order derivatives through the single-device "
        "SpatialSelfAttention(attn_backend='manual') instead (Note [double backward] in "
        "hpattn_dist/double_backward.py)."
    )

    def decorate(backward: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(backward)
        def wrapper(ctx: Any, *grads: Any) -> Any:
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if not torch.is_grad_enabled():  # a plain backward: nothing is recorded
                return outputs
            single = not isinstance(outputs, tuple)
            outs = (outputs,) if single else outputs
            slots = [i for i, o in enumerate(outs) if isinstance(o, Tensor)]
            anchors = [t for t in (*ctx.saved_tensors, *grads)
                       if isinstance(t, Tensor) and t.requires_grad]
            if not slots:
                return outputs
            if not anchors:  # nothing to hang the refusal on: refuse now rather than go silent
                raise RuntimeError(message)
            attached = _Refuse.apply(message, len(slots), *(outs[i] for i in slots), *anchors)
            result = list(outs)
            for i, t in zip(slots, attached):
                result[i] = t
            return result[0] if single else tuple(result)

        return wrapper

    return decorate
