"""Ulysses (head-parallel) attention: all-to-all to whole heads, local full attention, and back.

Legend: B batch, H heads, D head dim, P ranks in the group, r this rank, h = H / P heads per rank,
N_r pixels on rank r (ranks may differ, zero included), N = sum of N_r.

Note [ulysses schedule]
    Forward::

        q, k, v [B, H, N_r, D]
            --one all-to-all (scatter heads, gather pixels)--> 3 x [B, h, N, D]   heads r*h .. r*h+h-1
            --local attention over all N keys (one block, same kernel dispatch as the ring)-->
        out [B, h, N, D] --all-to-all (scatter pixels, gather heads)--> [B, H, N_r, D]

    Both all-to-alls pack and unpack with one copy each (Note [head exchange layout] in
    ``comm/head_exchange.py``).

    Pixels arrive in group-rank order, so the global pixel index of a key is its position in the
    gathered sequence, exactly as in :func:`~hpattn_dist.strategies.ring.ring_attention`; with the
    head offset ``r * h`` the position-keyed dropout mask (Note [position-keyed dropout]) is the
    ring's, so results do not depend on the strategy or on P.

    A key bias ``[B, H, N_r]`` travels like q (-> ``[B, h, N]``); a head-shared bias ``[B, 1, N_r]``
    is all-gathered to ``[B, 1, N]`` (:func:`gather_pixels`).

    Backward: autograd through the two all-to-alls (Note [all-to-all adjoint]) and the local
    attention Function, whose backward uses the saved final lse (no recomputation).

Communication per rank (bytes, itemsize s; exact formulas in :mod:`hpattn_dist.strategies.auto`):
forward ``s * B * D * (3 * (H - h) * N_r + h * (N - N_r))``, backward
``s * B * D * ((H - h) * N_r + 3 * h * (N - N_r))``; with equal shards each is
``4 * (P - 1) / P * B * H * N_r * D * s``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from hpattn_dist.comm.all_to_all import all_to_all
from hpattn_dist.comm.groups import GroupInfo, dtype_code, resolve_group, validated_signature
from hpattn_dist.comm.head_exchange import heads_to_pixels, pixels_to_heads
from hpattn_dist.kernels import BlockKernel, DropoutSpec, acc_dtype, resolve_dropout_seed, select_kernel
from hpattn_dist.validation import check_dropout_p, check_qkv, key_bias_from_mask

__all__ = ["check_heads_divisible", "gather_heads", "gather_pixels", "local_attention",
           "scatter_heads", "ulysses_attention"]


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


def check_heads_divisible(heads: int, group_size: int, what: str, group_name: str = "group") -> None:
    """Raise ``ValueError`` naming both numbers unless ``heads`` is divisible by ``group_size``."""
    if heads % group_size != 0:
        raise ValueError(
            f"{what}: the number of heads H={heads} is not divisible by the size of {group_name} "
            f"P={group_size}; head parallelism needs H % P == 0 (use strategy='ring', or a "
            f"Ulysses degree that divides {heads})"
        )


def scatter_heads(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Optional[Tensor],
    info: GroupInfo,
    sizes: list[int],
    label: str,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """``[B, H, N_r, D]`` shards -> contiguous ``[B, h, N, D]`` whole-sequence heads ``r*h ..``.

    ``bias`` ``[B, H|1, N_r]`` -> ``[B, h|1, N]``. ``sizes``: every rank's N_r. One all-to-all for
    q, k and v together (label ``label + ".qkv"``, Note [head exchange layout]) and one for the
    bias (``label + ".bias"``).
    """
    q_h, k_h, v_h = pixels_to_heads((q, k, v), info, sizes, label + ".qkv")
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


def gather_heads(out_h: Tensor, info: GroupInfo, sizes: list[int], label: str) -> Tensor:
    """``[B, h, N, D]`` -> ``[B, H, N_r, D]`` (pixels scattered by ``sizes``, heads gathered), a
    transposed view of a contiguous ``[B, N_r, H, D]`` (Note [head exchange layout])."""
    return heads_to_pixels((out_h,), info, sizes, label)[0]


def ulysses_attention(
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
    dropout_seed: Optional[int] = None,
) -> Tensor:
    r"""Exact softmax attention over every rank's pixels, computed head-parallel (DeepSpeed-Ulysses).

    Same contract and shard layout as :func:`~hpattn_dist.strategies.ring.ring_attention`; see
    Note [ulysses schedule] for the algorithm. Differentiable w.r.t. q, k, v and ``key_bias``.

    Args:
        q, k, v: this rank's shard ``[B, H, N_r, D]``; ``N_r`` may differ between ranks (zero too).
            H must be divisible by P.
        group: the process group that shards the pixels (None = WORLD, or a single process when
            torch.distributed is not initialised).
        backend: block kernel, ``"auto" | "sdpa" | "manual" | "flash_attn"``.
        dropout_p: attention-weight dropout in ``[0, 1)``, position-keyed (same mask as the ring).
        scale: score scale, default ``D ** -0.5``.
        key_mask: optional bool ``[B, N_r]``, True = this key may be attended to.
        key_bias: optional float ``[B, N_r]`` or ``[B, H, N_r]`` added to every score of that key.
        dropout_seed: seed of the dropout mask; None draws one. Group rank 0's value is used.

    Returns:
        ``[B, H, N_r, D]`` in the dtype of ``q``.

    Raises:
        ValueError: (on every rank) H not divisible by P, naming both; ranks that disagree on B,
            H, D, dtype, masking or dropout; bad shapes, dtypes, ``dropout_p`` or ``backend``.

    Communication: one small all-gather (shapes), then two all-to-alls forward (q/k/v in, out
    back) and two backward; bytes per rank in the module docstring.
    """
    info = resolve_group(group)
    with validated_signature(info, "ulysses_attention") as sig:
        check_qkv(q, k, v, scale)
        check_dropout_p(dropout_p)
        bias = key_bias_from_mask(q, key_mask, key_bias)
        batch, heads, n_local, head_dim = q.shape
        check_heads_divisible(heads, info.world_size, "ulysses_attention")
        kernel = select_kernel(backend, q, has_bias=bias is not None, dropout=dropout_p > 0)
        sig.set(
            {
                "B": batch, "H": heads, "D": head_dim, "dtype": dtype_code(q.dtype),
                "bias_heads": -1 if bias is None else bias.shape[1],
                "dropout_ppm": int(round(dropout_p * 1e6)),
            },
            (n_local, resolve_dropout_seed(dropout_p, dropout_seed)),
            q.device,
        )
    sizes = [row[0] for row in sig.per_rank]
    seed = sig.per_rank[0][1]  # group rank 0's seed: every rank drops alike
    scale = head_dim**-0.5 if scale is None else float(scale)
    q_h, k_h, v_h, bias_h = scatter_heads(q, k, v, bias, info, sizes, "ulysses")
    heads_local = heads // info.world_size
    out_h = local_attention(q_h, k_h, v_h, bias_h, kernel, scale, float(dropout_p), seed,
                            head_offset=info.rank * heads_local)
    return gather_heads(out_h, info, sizes, "ulysses.out")
