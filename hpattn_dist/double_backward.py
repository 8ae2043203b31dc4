"""Refusing double backward by name, for autograd Functions whose backward is not differentiable.

Note [double backward]
    With ``create_graph=True`` autograd records the ops of each backward so that a gradient can be
    differentiated again (gradient penalties, Hessian-vector products). Our attention Functions
    (``_RingAttention`` and the registered ops' backwards) compute their backward from saved statistics (the
    final lse, ``delta = rowsum(dO * O)``) and, in the ring, with point-to-point exchanges that
    autograd cannot see; differentiating that backward gave wrong second derivatives (or None)
    with no error. Their backward is therefore decorated with
    :func:`refuse_double_backward`: it runs without recording, and its gradients raise a
    ``RuntimeError`` naming the function as soon as a second differentiation reaches them.
    First-order gradients taken with ``create_graph=True`` keep working (and stay exact).

    Why not ``torch.autograd.function.once_differentiable``: its error node hangs on detached
    copies of the gradients, so ``torch.autograd.grad(..., inputs=k)`` prunes it and returns None
    or a partial sum without any error; and it attaches nothing when the incoming gradient does
    not require grad (a loss linear in the output), although the gradients still depend on q, k,
    v through the saved inputs. Our refusal node computes the gradients (it runs the backward as
    its own forward, so they are fresh tensors, not views) and its graph edges go to the tensors
    the backward read (saved inputs, incoming gradients), so every second-order path towards an
    input of the Function passes through it.

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
    """Runs a refused backward as its forward; its own backward raises. Its graph edges go to
    ``anchors`` (the tensors the refused backward read: saved inputs and incoming gradients), so
    that a second differentiation towards any input of the refused Function passes through it.
    The gradients are created here, not aliased: no copy, and no custom-Function views."""

    @staticmethod
    def forward(ctx, message: str, compute: Callable[[], tuple], *anchors: Tensor) -> tuple:
        ctx.message = message
        return compute()

    @staticmethod
    def backward(ctx, *grads: Tensor):
        raise RuntimeError(ctx.message)


def refuse_double_backward(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for an ``autograd.Function.backward`` that cannot be differentiated again.

    The Function must save (``ctx.save_for_backward``) the differentiable inputs its backward
    reads: they anchor the refusal in the graph. A Function that saves copies instead (to hold
    less memory) sets ``ctx.saved_inputs_incomplete = True``; its backward then refuses as soon as
    it runs under ``create_graph=True``.

    Args:
        what: the public name users call (``"ring_attention"``), for the error message.

    Returns:
        The decorator. When the graph is being recorded (``create_graph=True``), the backward
        runs inside a node that raises ``RuntimeError("<what> does not support double
        backward ...")`` when a gradient of its outputs is taken (Note [double backward]); else
        it runs as it is. Its outputs must be new tensors or None.
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
            if not torch.is_grad_enabled():  # a plain backward: nothing is recorded
                return backward(ctx, *grads)
            anchors = [t for t in (*ctx.saved_tensors, *grads)
                       if isinstance(t, Tensor) and t.requires_grad]
            # Nothing to hang the refusal on, or the Function saved copies in place of some inputs
            # (so a second-order path towards them would bypass the refusal): refuse now rather
            # than go silent.
            if not anchors or getattr(ctx, "saved_inputs_incomplete", False):
                raise RuntimeError(message)
            return _Refuse.apply(message, lambda: backward(ctx, *grads), *anchors)

        return wrapper

    return decorate
