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
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from hpattn_dist.comm.groups import GroupInfo, agree_on_shapes, dtype_code, offsets, resolve_group
from hpattn_dist.comm.ring import PendingExchange, RingExchanger
from hpattn_dist.kernels import BlockKernel, DropoutSpec, acc_dtype, draw_seed, select_kernel
from hpattn_dist.merge import merge_into
from hpattn_dist.validation import check_dropout_p, check_qkv, key_bias_from_mask


class _RingAttention(torch.autograd.Function):
    """Shard table (this rank r):

    =========  ======================  ==========================================
    tensor     local shape             meaning
    =========  ======================  ==========================================
    q, k, v    ``[B, H, N_r, D]``      this rank's pixels
    bias       ``[B, H|1, N_r]``       additive key bias (-inf = masked), or None
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
        info: GroupInfo,
        kernel: BlockKernel,
        scale: float,
        dropout_p: float,
        seed: int,
        sizes: list[int],
    ) -> Tensor:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        r, p = info.rank, info.world_size
        starts = offsets(sizes)
        acc = acc_dtype(q.dtype)
        out = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
        exchanger = RingExchanger(info) if p > 1 else None

        kv = torch.stack((k, v))  # [2, B, H, N_r, D]
        cur_kv, cur_bias = kv, bias
        for step in range(p):
            src = (r - step) % p
            pending, next_kv, next_bias = _post_next_block(exchanger, step, cur_kv, cur_bias, sizes,
                                                           "ring.forward")
            spec = _dropout_spec(dropout_p, seed, starts[r], starts[src])
            block_out, block_lse = kernel.forward(q, cur_kv[0], cur_kv[1], scale, cur_bias, spec)
            merge_into(out, lse, block_out, block_lse)
            if pending is not None:
                pending.wait()
                cur_kv, cur_bias = next_kv, next_bias

        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.info, ctx.kernel, ctx.scale = info, kernel, scale
        ctx.dropout_p, ctx.seed, ctx.sizes = dropout_p, seed, sizes
        ctx.bias_needs_grad = bias is not None and ctx.needs_input_grad[3]
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, bias, out, lse = ctx.saved_tensors
        info, kernel, scale, sizes = ctx.info, ctx.kernel, ctx.scale, ctx.sizes
        r, p = info.rank, info.world_size
        starts = offsets(sizes)
        acc = acc_dtype(q.dtype)
        dout = dout.contiguous()
        delta = (dout.to(acc) * out.to(acc)).sum(dim=-1)  # [B, H, N_r]
        need_dbias = ctx.bias_needs_grad
        exchanger = RingExchanger(info) if p > 1 else None

        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        cur_kv, cur_bias = torch.stack((k, v)), bias
        pending_grad: Optional[PendingExchange] = None
        recv_dkv: Optional[Tensor] = None
        recv_dbias: Optional[Tensor] = None
        for step in range(p):
            src = (r - step) % p
            pending_kv, next_kv, next_bias = _post_next_block(exchanger, step, cur_kv, cur_bias, sizes,
                                                              "ring.backward.kv")
            spec = _dropout_spec(ctx.dropout_p, ctx.seed, starts[r], starts[src])
            dq_b, dk_b, dv_b, dbias_b = kernel.backward(
                dout, q, cur_kv[0], cur_kv[1], out, lse, delta, scale, cur_bias, spec, need_dbias
            )
            dq += dq_b
            if pending_grad is None:
                dkv = torch.zeros(cur_kv.shape, dtype=acc, device=q.device)
                dbias = _zeros_like_bias(bias, sizes[src]) if need_dbias else None
            else:
                pending_grad.wait()
                dkv, dbias = recv_dkv, recv_dbias
            dkv[0] += dk_b
            dkv[1] += dv_b
            if dbias is not None:
                dbias += dbias_b if dbias.shape[1] == dbias_b.shape[1] else dbias_b.sum(1, keepdim=True)
            if exchanger is not None:
                home = (r - step - 1) % p  # the block whose accumulator arrives next
                recv_dkv = dkv.new_empty((2, *q.shape[:2], sizes[home], q.shape[3]))
                recv_dbias = _zeros_like_bias(bias, sizes[home]) if need_dbias else None
                pending_grad = exchanger.post([dkv, dbias], [recv_dkv, recv_dbias], "ring.backward.dkv")
            if pending_kv is not None:
                pending_kv.wait()
                cur_kv, cur_bias = next_kv, next_bias

        if pending_grad is not None:
            pending_grad.wait()
            dkv, dbias = recv_dkv, recv_dbias
        dbias_out = dbias.to(bias.dtype) if need_dbias else None
        return (dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), dbias_out,
                None, None, None, None, None, None)


def _post_next_block(
    exchanger: Optional[RingExchanger],
    step: int,
    cur_kv: Tensor,
    cur_bias: Optional[Tensor],
    sizes: list[int],
    label: str,
) -> tuple[Optional[PendingExchange], Optional[Tensor], Optional[Tensor]]:
    """Post the transfer of the block needed at ``step + 1`` (None after the last step)."""
    if exchanger is None or step == exchanger.info.world_size - 1:
        return None, None, None
    r, p = exchanger.info.rank, exchanger.info.world_size
    n_next = sizes[(r - step - 1) % p]
    next_kv = cur_kv.new_empty((*cur_kv.shape[:3], n_next, cur_kv.shape[4]))
    next_bias = None if cur_bias is None else cur_bias.new_empty((*cur_bias.shape[:2], n_next))
    pending = exchanger.post([cur_kv, cur_bias], [next_kv, next_bias], label)
    return pending, next_kv, next_bias


def _zeros_like_bias(bias: Tensor, n: int) -> Tensor:
    return bias.new_zeros((*bias.shape[:2], n))


def _dropout_spec(dropout_p: float, seed: int, q_offset: int, k_offset: int) -> Optional[DropoutSpec]:
    if dropout_p <= 0.0:
        return None
    return DropoutSpec(dropout_p, seed, q_offset, k_offset)


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: Optional[dist.ProcessGroup] = None,
    *,
    backend: str = "auto",
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    key_mask: Optional[Tensor] = None,
    key_bias: Optional[Tensor] = None,
) -> Tensor:
    r"""Exact softmax attention of this rank's queries over the keys of EVERY rank in ``group``.

    Computes, for this rank's shard, ``softmax(Q K^T * scale + bias) V`` where K and V are the
    concatenation (in group-rank order) of every rank's ``k`` and ``v``. Differentiable w.r.t.
    ``q``, ``k``, ``v`` and ``key_bias``. See Note [ring schedule] for the algorithm.

    Args:
        q, k, v: this rank's shard ``[B, H, N_r, D]``; ``N_r`` may differ between ranks (zero too).
        group: the process group that shards the pixels (None = WORLD, or a single process when
            torch.distributed is not initialised).
        backend: block kernel, ``"auto" | "sdpa" | "manual" | "flash_attn"``
            (see :mod:`hpattn_dist.kernels.dispatch`).
        dropout_p: attention-weight dropout probability in ``[0, 1)``; weights are normalised
            first, then dropped (Note [position-keyed dropout]: the mask does not depend on P).
        scale: score scale, default ``D ** -0.5``.
        key_mask: optional bool ``[B, N_r]``, True = this key may be attended to. A query with no
            unmasked key anywhere gets a zero output and zero gradients (PyTorch's SDPA returns NaN
            there).
        key_bias: optional float ``[B, N_r]`` or ``[B, H, N_r]`` added to every score of that key.

    Returns:
        ``[B, H, N_r, D]`` in the dtype of ``q``.

    Raises:
        ValueError: bad shapes, dtypes, devices, ``dropout_p`` or ``backend``; a group this process
            is not in; or (on every rank) ranks that disagree on B, H, D, dtype or masking.

    Communication: one 56-byte ``all_gather`` (shapes) plus P - 1 K/V transfers of
    ``2 * B * H * N_src * D`` elements per forward; the backward adds P - 1 K/V transfers and P
    fp32 dK/dV transfers.
    """
    check_qkv(q, k, v, scale)
    check_dropout_p(dropout_p)
    info = resolve_group(group)
    bias = key_bias_from_mask(q, key_mask, key_bias)
    batch, heads, n_local, head_dim = q.shape
    sizes = agree_on_shapes(
        info,
        q.device,
        {
            "B": batch, "H": heads, "D": head_dim, "dtype": dtype_code(q.dtype),
            "bias_heads": -1 if bias is None else bias.shape[1],
            "dropout_ppm": int(round(dropout_p * 1e6)),
        },
        n_local,
        "ring_attention",
    )
    kernel = select_kernel(backend, q, has_bias=bias is not None, dropout=dropout_p > 0)
    seed = draw_seed() if dropout_p > 0 else 0
    scale = head_dim**-0.5 if scale is None else float(scale)
    return _RingAttention.apply(q, k, v, bias, info, kernel, scale, float(dropout_p), seed, sizes)
