"""Ring attention: exact global attention over a pixel dimension sharded across ranks.

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

Note [ring memory]
    What a rank holds, in units of one ``[B, H, N_r, D]`` tensor of the input dtype (a = 1 for
    fp32/fp64 accumulators, 2 for bf16/fp16; other ranks' blocks in units of their N_src):

    * saved for the backward: q (1), K/V ONCE (2), out (1), lse. K/V are copied at most once:
      strided k, v (the layer's views of its packed projection) are stacked into the send buffer
      and that is saved; contiguous k, v are saved as given, and when adjacent in one buffer (the
      Ulysses heads of hybrid attention) the send buffer is a view of them.
    * backward, while a block is computed (the peak): dout (1), dq (a), the block computed on (2)
      and the next one in flight (2, except at the last step, so none at P = 2), the dK/dV
      accumulators leaving and arriving (2a + 2a, double-buffered like K/V) and the kernel's
      dq_b, dk_b, dv_b (3, one step's only: each is dropped once added).

    Attention alone in fp32: 4 + 1 + 1 + 2 + 2 + 4 + 3 = 17 at P >= 3, 15 at P = 2; the layer
    adds its output (1): 18 and 16. DeepSpeed-Ulysses holds 9 there (q, k, v, out, dout, dq, dk,
    dv and the output), so the double-buffered ring needs 2x (1.8x at P = 2): the blocks and
    accumulators in flight are the price of hiding both trips behind compute. Nothing else is
    held: no K/V block allocated for its shape alone, no earlier step's results, no second K/V.

    A key bias ``[B, H|1, N_src]`` adds tensors of its own size only: its block beside K/V (computed
    on, in flight), the dbias accumulators beside dK/dV and the kernel's block dbias. The kernel a
    bias selects where no fused kernel takes one (the manual kernel on CPU) adds its score tiles
    (and a zeroed copy of the block's K/V where they are not known finite: Note [bounded score
    tile]).

    The dK/dV trip (and dbias with it) runs only when some rank needs those gradients. Whether
    k, v or the bias require grad is each rank's own business (a caller may detach k on one rank
    only), and a rank that skipped the trip while its neighbour waits for it would pair the
    neighbour's receive with its next message, so the door (``plan_attention``) adds the two bits
    to its one agreement and every rank takes the same decision (``plan.grads_anywhere``); a rank that
    needs none itself still passes the others' accumulators on.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from hpattn_dist.comm.groups import GroupInfo
from hpattn_dist.comm.head_exchange import stacked
from hpattn_dist.comm.ring import PendingExchange, RingExchanger
from hpattn_dist.double_backward import refuse_double_backward
from hpattn_dist.kernels import DropoutSpec
from hpattn_dist.kernels.dispatch import block_layout
from hpattn_dist.masks import key_bias_from_mask, unmasked_keys
from hpattn_dist.merge import merge_into
from hpattn_dist.precision import acc_dtype
from hpattn_dist.strategies.plan import AttentionPlan

__all__ = ["folded_bias", "ring_backward", "ring_forward"]


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

    ``plan.grads_anywhere``: ``(kv, bias)``, whether ANY rank of the group needs the gradient of
    its k/v (resp. its bias), agreed at the door (Note [ring memory]).
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
        q_in, q = q, q.contiguous()
        p = info.world_size
        acc = acc_dtype(q.dtype)
        # The first block's result is the accumulator: merging into a row with no key yet takes
        # the block as it is (Note [stable merge]), so starting from zeros would only cost memory.
        out: Optional[Tensor] = None
        lse: Optional[Tensor] = None
        ring = _BlockRing(info, kv_sizes)

        kv, saved_kv = _kv_buffer(k, v, p)  # Note [ring memory]: K/V are held once
        block = _KeyBlock(kv, bias, k_index)  # kv: [2, B, H, M_r, D]
        del kv
        nan_rows = kernel.nan_rows(q)  # once per call, not per block
        for step in range(p):
            pending, next_block = ring.post_next(step, block, "ring.forward")
            spec = _dropout_spec(dropout_p, seed, q_offset, block.index, head_offset)
            if block.size > 0:
                block_out, block_lse = kernel.forward(q, block.kv[0], block.kv[1], scale, block.bias, spec,
                                                      nan_rows=nan_rows)
                if out is None:
                    out, lse = block_out.to(acc), block_lse.to(acc)
                else:
                    merge_into(out, lse, block_out, block_lse)
                del block_out, block_lse
            if pending is not None:
                pending.wait()
                block = next_block
        del block, next_block
        if out is None:  # no key anywhere
            out = torch.zeros(q.shape, dtype=acc, device=q.device)
            lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)

        out = out.to(q.dtype)
        ctx.save_for_backward(q, *saved_kv, bias, k_index, out, lse)
        ctx.kv_stacked = len(saved_kv) == 1
        # Copies saved instead of the inputs cannot anchor a double-backward refusal in the graph.
        ctx.saved_inputs_incomplete = ctx.kv_stacked or q is not q_in
        ctx.plan = plan
        kv_grad, bias_grad = plan.grads_anywhere
        ctx.dkv_travels = bool(kv_grad or bias_grad) and p > 1
        ctx.dbias_travels = bias is not None and bool(bias_grad)
        return out

    @staticmethod
    @refuse_double_backward("ring_attention")
    def backward(ctx, dout: Tensor):
        if ctx.kv_stacked:
            q, kv, bias, k_index, out, lse = ctx.saved_tensors
        else:
            q, k, v, bias, k_index, out, lse = ctx.saved_tensors
            kv = _kv_buffer(k, v, ctx.plan.ring_group.world_size)[0]
            del k, v
        plan = ctx.plan
        info, kernel, scale, kv_sizes = plan.ring_group, plan.kernel, plan.scale, plan.kv_sizes
        r, p = info.rank, info.world_size
        acc = acc_dtype(q.dtype)
        kv_dtype, kv_shape = kv[0].dtype, (2, *kv[0].shape)
        bias_shape = None if bias is None else bias.shape
        # Once per call, not per block (Note [block layout]): the op's backward hands in the
        # caller's q as it was given; a transposed dout (the layer's [B, N_r, H, D] memory) stays.
        q, dout = block_layout(q), block_layout(dout)
        # rowsum(dout * out) [B, H, N_r]; the fused kernels compute it themselves.
        delta = None if kernel.fused_backward is not None else (dout.to(acc) * out.to(acc)).sum(dim=-1)
        travels, need_dbias = ctx.dkv_travels, ctx.dbias_travels
        ring = _BlockRing(info, kv_sizes)
        # Every block reads the same dout, q, out and lse: in the kernel's layout once (Note
        # [backward layouts] in kernels/dispatch.py).
        dout_k, q_k, out_k, lse_k = kernel.prepare_backward(dout, q, out, lse)

        dq: Optional[Tensor] = None
        # One rank: the gradients of the own (only) block are the result as they come.
        local_grads: Optional[tuple[Tensor, Tensor, Optional[Tensor]]] = None
        block = _KeyBlock(kv, bias, k_index)
        del kv
        pending_grad: Optional[PendingExchange] = None
        grads: list[Optional[Tensor]] = []
        for step in range(p):
            src = (r - step) % p
            pending_kv, next_block = ring.post_next(step, block, "ring.backward.kv")
            block_grads = None
            if block.size > 0:
                spec = _dropout_spec(plan.dropout_p, plan.seed, plan.q_offset, block.index, plan.head_offset)
                dq_b, dk_b, dv_b, dbias_b = kernel.backward(
                    dout_k, q_k, block.kv[0], block.kv[1], out_k, lse_k, delta, scale, block.bias, spec,
                    need_dbias,
                )
                # One block (P = 1, the local attention of Ulysses): its dq is the result.
                dq = (dq_b if p == 1 else dq_b.to(acc)) if dq is None else dq.add_(dq_b)
                block_grads = (dk_b, dv_b, dbias_b)
                del dq_b, dk_b, dv_b, dbias_b  # Note [ring memory]: one step's results at a time
            if p == 1:
                local_grads = block_grads
            elif travels:
                if pending_grad is None:
                    grads = _grad_buffers(kv_shape, bias_shape, kv_sizes[src], acc, q.device,
                                          need_dbias, zero=True)
                else:
                    pending_grad.wait()  # the accumulator of block `src`, from rank r - 1
                if block_grads is not None:
                    dkv, dbias = grads
                    dk_b, dv_b, dbias_b = block_grads
                    dkv[0] += dk_b
                    dkv[1] += dv_b
                    if dbias is not None:
                        dbias += dbias_b if dbias.shape[1] == dbias_b.shape[1] else dbias_b.sum(1, keepdim=True)
                    del dk_b, dv_b, dbias_b, dkv, dbias
                block_grads = None
                # Pass the accumulator of block `src` on; receive the one of block `src - 1`.
                incoming = _grad_buffers(kv_shape, bias_shape, kv_sizes[(src - 1) % p], acc,
                                         q.device, need_dbias, zero=False)
                pending_grad = ring.exchanger.post(grads, incoming, "ring.backward.dkv")
                grads = incoming
                del incoming
            if pending_kv is not None:
                pending_kv.wait()
                block = next_block
        del block, next_block

        if pending_grad is not None:
            pending_grad.wait()
        if dq is None:
            dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        need_k, need_v, need_bias = ctx.needs_input_grad[1:4]
        dk = dv = dbias = None
        if travels:
            dkv, dbias = grads
            dk, dv = dkv[0], dkv[1]
        elif local_grads is not None:
            dk, dv, dbias = local_grads
        elif p == 1:  # no key on this rank (all masked)
            dk = dv = torch.zeros(kv_shape[1:], dtype=acc, device=q.device)
        elif need_k or need_v or need_bias:
            raise RuntimeError(
                "ring_attention backward: the plan said no rank needs the K/V/bias gradient, but "
                "this rank's inputs require it (grad mode or requires_grad changed after planning)"
            )
        if dbias is None and need_bias:
            dbias = torch.zeros(bias_shape, dtype=acc, device=q.device)
        elif dbias is not None and dbias.shape[1] != bias_shape[1]:
            dbias = dbias.sum(1, keepdim=True)
        return (dq.to(q.dtype), dk.to(kv_dtype) if need_k else None,
                dv.to(kv_dtype) if need_v else None, dbias.to(bias.dtype) if need_bias else None,
                None, None)


class _KeyBlock:
    """The tensors that travel together around the ring: K/V in one buffer, bias and key index."""

    def __init__(self, kv: "Tensor | tuple[Tensor, Tensor]", bias: Optional[Tensor], index: Optional[Tensor]) -> None:
        self.kv, self.bias, self.index = kv, bias, index  # kv: [2, B, H, n, D], or (k, v) at P = 1

    @property
    def size(self) -> int:
        return self.kv[0].shape[2]

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


def _kv_buffer(k: Tensor, v: Tensor, p: int) -> tuple["Tensor | tuple[Tensor, Tensor]", tuple[Tensor, ...]]:
    """``(kv [2, B, H, M, D], tensors to save)``: the send buffer of the own block and what the
    backward needs to rebuild it, with K/V held once (Note [ring memory]). A ring of one
    (``p = 1``, the local attention of Ulysses) sends nothing: ``kv = (k, v)``, no copy.

    k, v adjacent in one contiguous buffer (the heads of :func:`pixels_to_heads`): kv is a view,
    save k, v. Otherwise one stack makes kv; it is what is saved if k or v was not contiguous
    (the layer's views of its fused projection: their copies would be a second K/V), else k and
    v are saved as given and kv lives while the own block is the current one.
    """
    if p == 1:
        return (k, v), (k, v)
    kv = stacked((k, v))
    return kv, ((k, v) if k.is_contiguous() and v.is_contiguous() else (kv,))


def _grad_buffers(kv_shape: torch.Size, bias_shape: Optional[torch.Size], n: int, acc: torch.dtype,
                  device: torch.device, need_dbias: bool, zero: bool) -> list[Optional[Tensor]]:
    """fp32 (fp64) gradient accumulators ``[dKV [2, B, H, n, D], dbias [B, H|1, n]]`` of a block
    of ``n`` keys."""
    make = torch.zeros if zero else torch.empty
    dkv = make((*kv_shape[:3], n, kv_shape[4]), dtype=acc, device=device)
    dbias = make((*bias_shape[:2], n), dtype=acc, device=device) if need_dbias else None
    return [dkv, dbias]


def _dropout_spec(dropout_p: float, seed: int, q_offset: int, k_index: Optional[Tensor],
                  head_offset: int = 0) -> Optional[DropoutSpec]:
    if dropout_p <= 0.0:
        return None
    return DropoutSpec(dropout_p, seed, q_offset=q_offset, h_offset=head_offset, k_index=k_index)


# --- The Function run inside the registered ops (Note [attention as one op] in strategies/ops.py)


class _Ctx:
    """Stands in for an autograd ctx when the ring Function's forward/backward run inside the op."""

    def __init__(self, plan: AttentionPlan, saved: tuple = (), has_bias: bool = False) -> None:
        self.plan, self.saved_tensors = plan, saved
        # The dK/dV accumulators (and dbias beside them) travel home when some rank needs them
        # (agreed at the door, Note [ring memory]); dbias is computed wherever any rank needs it,
        # since for U > 1 every Ulysses rank holds part of each key's gradient.
        kv_grad, bias_grad = plan.grads_anywhere
        bias_grad = has_bias and bias_grad
        self.needs_input_grad = (True, kv_grad, kv_grad, bias_grad, False, False)
        self.kv_stacked = False
        self.dkv_travels = (kv_grad or bias_grad) and plan.ring_group.world_size > 1
        self.dbias_travels = bias_grad

    def save_for_backward(self, *tensors: Optional[Tensor]) -> None:
        self.saved_tensors = tensors


def folded_bias(plan: AttentionPlan, k: Tensor, mask: Optional[Tensor], key_bias: Optional[Tensor],
                 bias_h: Optional[Tensor] = None) -> Optional[Tensor]:
    """The one additive bias ``[B, H|1, M]`` (accumulation dtype, -inf at masked keys) the ring
    Function reads: the key bias in head layout where it travelled (``bias_h``, the mask already
    folded in), else folded here from the key mask and ``key_bias``; None where the plan applies none."""
    if bias_h is not None:
        return bias_h
    return key_bias_from_mask(k, mask, key_bias) if plan.use_bias else None


def _ring_inputs(plan: AttentionPlan, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor]):
    """What the ring Function takes: compacted keys and bias (Note [masked key compaction]), key indices."""
    kept = unmasked_keys(mask) if plan.mask_travels else None
    k_index = None
    if plan.dropout_p > 0:
        k_index = (torch.arange(k.shape[2], device=k.device) if kept is None else kept) + plan.k_offset
    if kept is not None:
        k, v = k.index_select(2, kept), v.index_select(2, kept)
        bias = None if bias is None else bias.index_select(2, kept)
    return k, v, bias, k_index, kept


def ring_forward(plan: AttentionPlan, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
                  mask: Optional[Tensor]):
    """``[B, h, M, D]`` -> ``(out, lse)``: the ring Function's forward, run as it is; ``bias``
    from :func:`_folded_bias`."""
    k_c, v_c, bias, k_index, _ = _ring_inputs(plan, k, v, bias, mask)
    ctx = _Ctx(plan)
    out = _RingAttention.forward(ctx, q, k_c, v_c, bias, k_index, plan)
    return out, ctx.saved_tensors[-1]  # lse is saved last


def ring_backward(plan: AttentionPlan, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
                   mask: Optional[Tensor], out: Tensor, lse: Tensor):
    """The ring Function's backward from the saved ``out, lse``: ``(dq, dk, dv, dbias)``, dK/dV
    (and dbias ``[B, H|1, M]``, None unless some rank needs it) scattered to all keys."""
    k_c, v_c, bias_c, k_index, kept = _ring_inputs(plan, k, v, bias, mask)
    ctx = _Ctx(plan, (q, k_c, v_c, bias_c, k_index, out, lse), has_bias=bias_c is not None)
    with torch.no_grad():
        dq, dk_c, dv_c, dbias_c = _RingAttention.backward(ctx, dout)[:4]
    if dk_c is None:  # no rank needs dK/dV (the op's outputs are tensors all the same)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    elif kept is None:
        dk, dv = dk_c, dv_c
    else:
        dk, dv = torch.zeros_like(k).index_copy_(2, kept, dk_c), torch.zeros_like(v).index_copy_(2, kept, dv_c)
    if dbias_c is not None and kept is not None:
        dbias_c = dbias_c.new_zeros(bias.shape).index_copy_(2, kept, dbias_c)
    return dq, dk, dv, dbias_c
