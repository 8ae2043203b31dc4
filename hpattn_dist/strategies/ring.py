"""The ring executor: exact global attention over a pixel dimension sharded across ranks.

:func:`run_ring` executes an :class:`~hpattn_dist.strategies.plan.AttentionPlan` over its
``ring_group``: for ``strategy="ring"`` on the caller's shards, for ``"hybrid"`` on the heads the
Ulysses exchange produced (Note [hybrid schedule]).

Legend: B batch, H heads, D head dim, P ranks in the group, r this rank, N_r pixels on rank r
(ranks may differ by any amount, zero included), N = sum of N_r.

Note [ring schedule]
    Forward: rank r starts with its own K/V block and, at step s = 0..P-1, holds the block of rank
    ``r - s (mod P)``. The block for step s+1 is posted before step s is computed (Note [double
    buffering] in ``comm/ring.py``); K and V travel in ONE buffer ``[2, B, H, N_src, D]``, the key
    bias (if any) beside it. Each step's ``(out, lse)`` is merged into fp32 accumulators (Note
    [stable merge]). P - 1 K/V exchanges per forward.

    Backward: the same K/V rotation. The gradient of block ``j`` accumulates (fp32) on the ranks
    it visits, travelling one step behind the block: rank r adds its contribution to the
    accumulator received from rank r-1 and passes it to rank r+1; after P steps it arrives home.
    P - 1 K/V exchanges and P dK/dV exchanges (2x bytes in fp32 for bf16 inputs). dQ stays local.
    No forward is recomputed: each block uses the saved FINAL lse and ``delta = rowsum(dO * O)``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from hpattn_dist.comm.groups import GroupInfo
from hpattn_dist.comm.ring import PendingExchange, RingExchanger
from hpattn_dist.double_backward import refuse_double_backward
from hpattn_dist.kernels import DropoutSpec
from hpattn_dist.masks import unmasked_keys
from hpattn_dist.merge import merge_into
from hpattn_dist.precision import acc_dtype
from hpattn_dist.strategies.plan import AttentionPlan

__all__ = ["run_ring"]


class _RingAttention(torch.autograd.Function):
    """Shard table (this rank r; ``M_r <= N_r`` keys remain after dropping fully masked ones):

    =========  ======================  ==========================================
    tensor     local shape             meaning
    =========  ======================  ==========================================
    q          ``[B, H, N_r, D]``      this rank's queries
    k, v       ``[B, H, M_r, D]``      this rank's (unmasked) keys and values
    bias       ``[B, H|1, M_r]``       additive key bias (-inf = masked), or None
    k_index    ``[M_r]`` int64         global pixel of each key (dropout only), or None
    out        ``[B, H, N_r, D]``      softmax(q K_all^T scale + bias_all) V_all
    lse        ``[B, H, N_r]`` fp32    log-sum-exp of this rank's score rows
    =========  ======================  ==========================================
    """

    @staticmethod
    def forward(
        ctx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        bias: Optional[Tensor],
        k_index: Optional[Tensor],
        plan: AttentionPlan,
    ) -> Tensor:
        info, kernel, scale, kv_sizes = plan.ring_group, plan.kernel, plan.scale, plan.kv_sizes
        dropout_p, seed, q_offset, head_offset = plan.dropout_p, plan.seed, plan.q_offset, plan.head_offset
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        p = info.world_size
        acc = acc_dtype(q.dtype)
        out = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
        ring = _BlockRing(info, kv_sizes)

        block = _KeyBlock(torch.stack((k, v)), bias, k_index)  # kv: [2, B, H, M_r, D]
        for step in range(p):
            pending, next_block = ring.post_next(step, block, "ring.forward")
            spec = _dropout_spec(dropout_p, seed, q_offset, block.index, head_offset)
            if block.size > 0:
                block_out, block_lse = kernel.forward(q, block.kv[0], block.kv[1], scale, block.bias, spec)
                merge_into(out, lse, block_out, block_lse)
            if pending is not None:
                pending.wait()
                block = next_block

        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, bias, k_index, out, lse)
        ctx.plan = plan
        ctx.bias_needs_grad = bias is not None and ctx.needs_input_grad[3]
        return out

    @staticmethod
    @refuse_double_backward("ring_attention")
    def backward(ctx, dout: Tensor):
        q, k, v, bias, k_index, out, lse = ctx.saved_tensors
        plan = ctx.plan
        info, kernel, scale, kv_sizes = plan.ring_group, plan.kernel, plan.scale, plan.kv_sizes
        r, p = info.rank, info.world_size
        acc = acc_dtype(q.dtype)
        dout = dout.contiguous()
        delta = (dout.to(acc) * out.to(acc)).sum(dim=-1)  # [B, H, N_r]
        need_dbias = ctx.bias_needs_grad
        ring = _BlockRing(info, kv_sizes)

        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        block = _KeyBlock(torch.stack((k, v)), bias, k_index)
        pending_grad: Optional[PendingExchange] = None
        grads: list[Optional[Tensor]] = []
        for step in range(p):
            src = (r - step) % p
            pending_kv, next_block = ring.post_next(step, block, "ring.backward.kv")
            block_grads = None
            if block.size > 0:
                spec = _dropout_spec(plan.dropout_p, plan.seed, plan.q_offset, block.index, plan.head_offset)
                dq_b, dk_b, dv_b, dbias_b = kernel.backward(
                    dout, q, block.kv[0], block.kv[1], out, lse, delta, scale, block.bias, spec, need_dbias
                )
                dq += dq_b
                block_grads = (dk_b, dv_b, dbias_b)
            if pending_grad is None:
                grads = _grad_buffers(block, acc, need_dbias, zero=True)
            else:
                pending_grad.wait()  # the accumulator of block `src`, from rank r - 1
            if block_grads is not None:
                dkv, dbias = grads
                dk_b, dv_b, dbias_b = block_grads
                dkv[0] += dk_b
                dkv[1] += dv_b
                if dbias is not None:
                    dbias += dbias_b if dbias.shape[1] == dbias_b.shape[1] else dbias_b.sum(1, keepdim=True)
            if p > 1:
                # Pass the accumulator of block `src` on; receive the one of block `src - 1`.
                incoming_shape = _KeyBlock.empty_like(block, kv_sizes[(src - 1) % p])
                incoming = _grad_buffers(incoming_shape, acc, need_dbias, zero=False)
                pending_grad = ring.exchanger.post(grads, incoming, "ring.backward.dkv")
                grads = incoming
            if pending_kv is not None:
                pending_kv.wait()
                block = next_block

        if pending_grad is not None:
            pending_grad.wait()
        dkv, dbias = grads
        dbias_out = dbias.to(bias.dtype) if need_dbias else None
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), dbias_out, None, None


class _KeyBlock:
    """The tensors that travel together around the ring: K/V in one buffer, bias and key index."""

    def __init__(self, kv: Tensor, bias: Optional[Tensor], index: Optional[Tensor]) -> None:
        self.kv, self.bias, self.index = kv, bias, index

    @property
    def size(self) -> int:
        return self.kv.shape[3]

    def buffers(self) -> list[Optional[Tensor]]:
        return [self.kv, self.bias, self.index]

    @staticmethod
    def empty_like(block: "_KeyBlock", n: int) -> "_KeyBlock":
        """Uninitialised buffers shaped like ``block`` but holding ``n`` keys."""
        kv = block.kv.new_empty((*block.kv.shape[:3], n, block.kv.shape[4]))
        bias = None if block.bias is None else block.bias.new_empty((*block.bias.shape[:2], n))
        index = None if block.index is None else block.index.new_empty((n,))
        return _KeyBlock(kv, bias, index)


class _BlockRing:
    """Rotates key blocks one rank forward per step (Note [ring schedule])."""

    def __init__(self, info: GroupInfo, kv_sizes: tuple[int, ...]) -> None:
        self.info, self.kv_sizes = info, kv_sizes
        self.exchanger = RingExchanger(info) if info.world_size > 1 else None

    def post_next(
        self, step: int, block: _KeyBlock, label: str
    ) -> tuple[Optional[PendingExchange], Optional[_KeyBlock]]:
        """Post the transfer of the block needed at ``step + 1`` (None after the last step)."""
        r, p = self.info.rank, self.info.world_size
        if self.exchanger is None or step == p - 1:
            return None, None
        nxt = _KeyBlock.empty_like(block, self.kv_sizes[(r - step - 1) % p])
        return self.exchanger.post(block.buffers(), nxt.buffers(), label), nxt


def _grad_buffers(block: _KeyBlock, acc: torch.dtype, need_dbias: bool, zero: bool) -> list[Optional[Tensor]]:
    """fp32 (fp64) gradient accumulators ``[dKV, dbias]`` shaped like ``block``."""
    make = torch.zeros if zero else torch.empty
    dkv = make(block.kv.shape, dtype=acc, device=block.kv.device)
    dbias = make(block.bias.shape, dtype=acc, device=block.kv.device) if need_dbias else None
    return [dkv, dbias]


def _dropout_spec(dropout_p: float, seed: int, q_offset: int, k_index: Optional[Tensor],
                  head_offset: int = 0) -> Optional[DropoutSpec]:
    if dropout_p <= 0.0:
        return None
    return DropoutSpec(dropout_p, seed, q_offset=q_offset, h_offset=head_offset, k_index=k_index)


def run_ring(plan: AttentionPlan, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
             key_mask: Optional[Tensor]) -> Tensor:
    """Execute ``plan`` over its ring group (Note [ring schedule]).

    ``q``: ``[B, h, N_i, D]``, this ring member's queries; ``k, v``: ``[B, h, K_i, D]``, its keys
    (``K_i = N_i`` but for cross-attention, Note [cross-grid plan]); ``bias``: ``[B, h|1, K_i]`` in
    the accumulation dtype or None; ``key_mask``: bool ``[B, K_i]`` when the mask travels as a mask
    (its fully masked keys are dropped, Note [masked key compaction]). Returns ``[B, h, N_i, D]``
    in q's dtype.
    """
    kept = unmasked_keys(key_mask) if plan.mask_travels else None
    if not plan.use_bias:
        bias = None
    k_index = None
    if plan.dropout_p > 0:
        local_index = torch.arange(k.shape[2], device=k.device) if kept is None else kept
        k_index = local_index + plan.k_offset
    if kept is not None:
        k, v = k.index_select(2, kept), v.index_select(2, kept)
        bias = None if bias is None else bias.index_select(2, kept)
    return _RingAttention.apply(q, k, v, bias, k_index, plan)
