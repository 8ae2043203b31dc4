"""Attention over keys that are all on this process: one block, as an autograd Function.

What the Ulysses executor runs after its head exchange (Note [ulysses schedule]): the block
kernel's forward, and a backward from the saved final lse (no recomputation).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from hpattn_dist.double_backward import refuse_double_backward
from hpattn_dist.kernels.dispatch import BlockKernel
from hpattn_dist.kernels.dropout import DropoutSpec
from hpattn_dist.precision import acc_dtype

__all__ = ["local_attention"]


class _LocalAttention(torch.autograd.Function):
    """Attention of queries over keys that are ALL on this process (one block).

    =========  =====================  ==========================================
    tensor     local shape            meaning
    =========  =====================  ==========================================
    q, k, v    ``[B, h, N, D]``       heads ``h_offset ..``, every pixel
    bias       ``[B, h|1, N]``        additive key bias (-inf = masked), or None
    out        ``[B, h, N, D]``       ``softmax(q k^T scale + bias) v``
    lse        ``[B, h, N]`` (acc)    log-sum-exp of the score rows (saved)
    =========  =====================  ==========================================
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], kernel: BlockKernel,
                scale: float, spec: Optional[DropoutSpec]) -> Tensor:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = kernel.forward(q, k, v, scale, bias, spec)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.kernel, ctx.scale, ctx.spec = kernel, scale, spec
        ctx.need_dbias = bias is not None and ctx.needs_input_grad[3]
        return out

    @staticmethod
    @refuse_double_backward("ulysses_attention (its local attention)")
    def backward(ctx, dout: Tensor):
        q, k, v, bias, out, lse = ctx.saved_tensors
        acc = acc_dtype(q.dtype)
        # dout arrives as a transposed view of [B, N, h, D] (Note [head exchange memory]): every
        # kernel reads it in place; copy only a last dim that is not dense.
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        # rowsum(dout * out) [B, h, N]: the fused kernels compute it themselves, and at the peak
        # of the backward it would be the one tensor DeepSpeed-Ulysses does not hold.
        delta = None if ctx.kernel.fused_backward is not None else \
            (dout.to(acc) * out.to(acc)).sum(dim=-1)
        dq, dk, dv, dbias = ctx.kernel.backward(
            dout, q, k, v, out, lse, delta, ctx.scale, bias, ctx.spec, ctx.need_dbias
        )
        if ctx.need_dbias:
            if dbias.shape[1] != bias.shape[1]:
                dbias = dbias.sum(1, keepdim=True)
            dbias = dbias.to(bias.dtype)
        else:
            dbias = None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias, None, None, None


def local_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Optional[Tensor],
    kernel: BlockKernel,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    head_offset: int = 0,
) -> Tensor:
    """Differentiable attention over keys held entirely by this process (no communication).

    ``q, k, v``: ``[B, h, N, D]`` whose pixel dim is the WHOLE sequence and whose first head is
    global head ``head_offset`` (for the dropout mask); ``bias``: ``[B, h|1, N]`` in the
    accumulation dtype or None; ``kernel``: from :func:`~hpattn_dist.kernels.select_kernel`.
    Returns ``[B, h, N, D]`` in q's dtype.
    """
    spec = DropoutSpec(dropout_p, seed, 0, 0, head_offset) if dropout_p > 0 else None
    return _LocalAttention.apply(q, k, v, bias, kernel, scale, spec)
