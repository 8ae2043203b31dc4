"""Explicit matmul-softmax block kernel, chunked over queries (any dtype, any device).

Note [bounded score tile]
    A call never materialises more than about ``TILE_ELEMENTS`` scores at a time: queries are
    processed in chunks of ``max(1, TILE_ELEMENTS // (B * H * N_k))`` rows, and each chunk's
    softmax and gradient work in place, so the forward holds one score tile and the backward two
    (three with dropout); the gradient accumulators are updated in place (``baddbmm_``), with no
    ``[B, H, N_k, D]`` temporary. Peak extra memory is therefore ``O(TILE_ELEMENTS + N_k * D)``
    rather than ``O(N_q * N_k)``: 8 MiB of fp32 tiles in the backward (and, with a key bias over
    K/V that are not known finite, a copy of the block's K/V whose excluded rows are zeroed, Note
    [non-finite inputs] in ``masks.py``) are the difference from a fused kernel's peak where this
    kernel runs instead (a key bias, dropout: Note [ulysses op memory] in ``strategies/ops.py``). Smaller tiles slow the
    CPU loop down (Python per chunk).

Scores, softmax statistics and accumulators use ``acc_dtype(q.dtype)``: float64 for float64
inputs, float32 otherwise.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from hpattn_dist.kernels.dropout import DropoutSpec, keep_mask
from hpattn_dist.masks import zero_excluded_keys
from hpattn_dist.precision import acc_dtype

TILE_ELEMENTS = 1 << 20


def _query_chunk(batch: int, heads: int, n_k: int) -> int:
    return max(1, TILE_ELEMENTS // max(1, batch * heads * n_k))


def _scores(q_c: Tensor, k_t: Tensor, scale: float, bias: Optional[Tensor],
            excluded: Optional[Tensor]) -> Tensor:
    s = torch.matmul(q_c, k_t).mul_(scale)  # [B, H, C, N_k]
    if bias is not None:
        # -inf where excluded, also for a NaN query (NaN + -inf is NaN): Note [non-finite inputs]
        s.add_(bias[:, :, None, :]).masked_fill_(excluded[:, :, None, :], float("-inf"))
    return s


def _excluded(bias: Optional[Tensor]) -> Optional[Tensor]:
    """Keys no query of the block attends to, ``[B, H|1, N_k]`` (Note [non-finite inputs])."""
    return None if bias is None else torch.isneginf(bias)


def manual_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    bias: Optional[Tensor] = None,
    dropout: Optional[DropoutSpec] = None,
) -> tuple[Tensor, Tensor]:
    """Attention of a query block against one key/value block.

    Args:
        q: ``[B, H, N_q, D]``; k, v: ``[B, H, N_k, D]``.
        scale: score multiplier.
        bias: optional additive key bias ``[B, H or 1, N_k]`` in the accumulation dtype
            (``-inf`` masks a key).
        dropout: optional position-keyed dropout of the normalised weights.

    Returns:
        ``(out, lse)``: ``out`` ``[B, H, N_q, D]`` in the accumulation dtype, normalised within
        this block; ``lse`` ``[B, H, N_q]``, ``-inf`` for rows with no unmasked key (their ``out``
        is zero).
    """
    acc = acc_dtype(q.dtype)
    batch, heads, n_q, _ = q.shape
    n_k = k.shape[2]
    excluded = _excluded(bias)
    k_t = zero_excluded_keys(k.to(acc), excluded).transpose(-2, -1)
    v_a = zero_excluded_keys(v.to(acc), excluded)
    out = torch.empty(q.shape, dtype=acc, device=q.device)
    lse = torch.empty((batch, heads, n_q), dtype=acc, device=q.device)
    chunk = _query_chunk(batch, heads, n_k)
    for start in range(0, n_q, chunk):
        stop = min(start + chunk, n_q)
        s = _scores(q[:, :, start:stop].to(acc), k_t, scale, bias, excluded)
        row_max = s.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        p = s.sub_(row_max).exp_()  # in place: one score tile at a time (Note [bounded score tile])
        denom = p.sum(dim=-1, keepdim=True)
        lse[:, :, start:stop] = (row_max + torch.log(denom)).squeeze(-1)
        p.div_(torch.where(denom > 0, denom, torch.ones_like(denom)))
        if dropout is not None:
            keep = keep_mask(dropout.shifted(q=start), batch, heads, stop - start, n_k, q.device)
            p.mul_(keep).mul_(1.0 / (1.0 - dropout.p))
            del keep
        out[:, :, start:stop] = torch.matmul(p, v_a)
        del s, p
    return out, lse


def manual_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lse: Tensor,
    delta: Tensor,
    scale: float,
    bias: Optional[Tensor] = None,
    dropout: Optional[DropoutSpec] = None,
    need_dbias: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Gradients of one block given the FINAL row statistics of the whole attention.

    With ``P = exp(S - lse)`` (``lse`` over all keys, not just this block), the block's
    contribution is ``dV = (P*M)^T dO``, ``dS = P * (dO V^T * M - delta)``, ``dQ = dS K scale``,
    ``dK = dS^T Q scale`` where ``M`` is the dropout keep-mask over ``1 - p`` and
    ``delta = rowsum(dO * O)`` with the final output ``O``.

    Args:
        dout: ``[B, H, N_q, D]``; q ``[B, H, N_q, D]``; k, v ``[B, H, N_k, D]``.
        lse, delta: ``[B, H, N_q]`` in the accumulation dtype.
        need_dbias: also return the key-bias gradient ``[B, H, N_k]``.

    Returns:
        ``(dq, dk, dv, dbias)`` in the accumulation dtype; ``dbias`` is None unless asked for.
    """
    acc = acc_dtype(q.dtype)
    batch, heads, n_q, _ = q.shape
    n_k = k.shape[2]
    excluded = _excluded(bias)
    k_a, v_a = (zero_excluded_keys(t.to(acc), excluded) for t in (k, v))
    k_t = k_a.transpose(-2, -1)
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    dbias = torch.zeros((batch, heads, n_k), dtype=acc, device=q.device) if need_dbias else None
    chunk = _query_chunk(batch, heads, n_k)
    for start in range(0, n_q, chunk):
        stop = min(start + chunk, n_q)
        q_c = q[:, :, start:stop].to(acc)
        do_c = dout[:, :, start:stop].to(acc)
        lse_c = lse[:, :, start:stop, None]
        finite = torch.isfinite(lse_c)
        # In place: two score tiles at a time (three with dropout), Note [bounded score tile].
        p = _scores(q_c, k_t, scale, bias, excluded).sub_(torch.where(finite, lse_c, torch.zeros_like(lse_c))).exp_()
        p.masked_fill_(~finite, 0.0)
        dp = torch.matmul(do_c, v_a.transpose(-2, -1))
        if dropout is not None:
            keep = keep_mask(dropout.shifted(q=start), batch, heads, stop - start, n_k, q.device)
            factor = 1.0 / (1.0 - dropout.p)
            _accumulate(dv, (p * keep).mul_(factor).transpose(-2, -1), do_c)
            dp.mul_(keep).mul_(factor)
            del keep
        else:
            _accumulate(dv, p.transpose(-2, -1), do_c)
        ds = dp.sub_(delta[:, :, start:stop, None]).mul_(p)
        del p
        dq[:, :, start:stop] = torch.matmul(ds, k_a).mul_(scale)
        # A row with no key (lse -inf) gives no gradient, whatever its query holds: its ds is
        # zero, and 0 * inf would be NaN (Note [non-finite inputs] in masks.py).
        _accumulate(dk, ds.transpose(-2, -1), q_c.masked_fill(~finite, 0.0), scale)
        if dbias is not None:
            dbias += ds.sum(dim=-2)
        del ds, dp
    return dq, dk, dv, dbias


def _accumulate(acc: Tensor, a: Tensor, b: Tensor, scale: float = 1.0) -> None:
    """``acc += (a @ b) * scale`` for ``acc [B, H, M, D]`` without a ``[B, H, M, D]`` temporary."""
    batch, heads = acc.shape[:2]
    acc.view(batch * heads, *acc.shape[2:]).baddbmm_(
        a.reshape(batch * heads, *a.shape[2:]), b.reshape(batch * heads, *b.shape[2:]), alpha=scale)
