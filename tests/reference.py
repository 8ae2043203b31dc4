"""Float64 explicit attention: the reference every kernel and strategy test compares against.

Deliberately naive (one ``[B, H, N_q, N_k]`` score matrix, ``torch.softmax``), so that it is
obviously correct; use it only at test sizes. Legend: B batch, H heads, N_q queries, N_k keys,
D head dim.

The dropout keep-mask is re-implemented here from its definition (Note [position-keyed dropout]
in ``hpattn_dist/kernels/dropout.py``), in numpy unsigned integers, and once more per element
in plain Python (:func:`keep_one`) to check the numpy version: the package's ``keep_mask`` is
code under test, never called here. ``DropoutSpec`` is only read as a record of numbers.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from hpattn_dist.kernels import DropoutSpec

_M32 = 0xFFFFFFFF


def lowbias32(x: int) -> int:
    """Wellons' ``lowbias32`` on one unsigned 32-bit Python int."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    x ^= x >> 16
    return x


def keep_one(p: float, seed: int, b: int, h: int, i: int, j: int) -> bool:
    """Whether score ``(b, h, i, j)`` (global indices) is kept: the definition, element by element."""
    x = lowbias32(seed)
    for coordinate in (b, h, i, j):
        x = lowbias32(x ^ coordinate)
    return x >= int(p * 2**32)


def _lowbias32_np(x: np.ndarray) -> np.ndarray:
    """:func:`lowbias32` on uint64 arrays holding 32-bit values (products < 2^64: no overflow)."""
    m = np.uint64(_M32)
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & m
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x846CA68B)) & m
    return x ^ (x >> np.uint64(16))


def reference_keep_mask(spec: DropoutSpec, batch: int, heads: int, n_q: int, n_k: int) -> Tensor:
    """Bool keep-mask ``[B, H, N_q, N_k]`` of the block ``spec`` describes (its first head, query
    and key at ``spec.h_offset``, ``spec.q_offset``, ``spec.k_offset``, or keys ``spec.k_index``)."""
    u = np.uint64
    b = np.arange(batch, dtype=u)[:, None, None, None]
    h = (spec.h_offset + np.arange(heads, dtype=u))[None, :, None, None]
    i = (spec.q_offset + np.arange(n_q, dtype=u))[None, None, :, None]
    if spec.k_index is None:
        j = spec.k_offset + np.arange(n_k, dtype=u)
    else:
        j = spec.k_index.cpu().numpy().astype(u)
    x = _lowbias32_np(np.array(spec.seed & _M32, dtype=u))
    for coordinate in (b, h, i, j[None, None, None, :]):
        x = _lowbias32_np(x ^ coordinate)
    return torch.from_numpy(x >= u(int(spec.p * 2**32)))


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: Optional[float] = None,
    key_bias: Optional[Tensor] = None,
    dropout: Optional[DropoutSpec] = None,
    allowed: Optional[Tensor] = None,
) -> Tensor:
    """``softmax(q k^T * scale + key_bias) v`` in float64, differentiable w.r.t. every input,
    over each query's ALLOWED keys only (Note [non-finite inputs] in ``hpattn_dist/masks.py``).

    Args:
        q: ``[B, H, N_q, D]``; k, v: ``[B, H, N_k, D]`` (any floating dtype; computed in float64).
        scale: score multiplier, default ``D ** -0.5``.
        key_bias: optional ``[B, N_k]``, ``[B, 1, N_k]`` or ``[B, H, N_k]`` added to every score of
            that key; ``-inf`` masks the key. A query row with every key masked gets a zero output
            and zero gradients (never NaN).
        dropout: optional spec of the WHOLE score matrix (offsets of its first query / key / head);
            weights are normalised first, then multiplied by
            ``reference_keep_mask(dropout, ...) / (1 - dropout.p)``.
        allowed: optional bool ``[N_q, N_k]`` (or broadcastable to ``[B, H, N_q, N_k]``): the keys
            each query may attend to at all (a window).

    Returns:
        ``[B, H, N_q, D]`` float64. A key a query does not attend to (``-inf`` bias, not allowed)
        takes no part in its row, not even as ``0 * value``. A row with an allowed key is NaN
        when its query, or the key, value or bias of a key it attends to, holds a NaN or an
        infinity (then no other value is asserted of it); the formula runs on the rest.
    """
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    shape = (*q.shape[:3], k.shape[2])  # [B, H, N_q, N_k]
    attend = torch.ones(shape, dtype=torch.bool) if allowed is None else allowed.expand(shape)
    key_ok = torch.isfinite(k).all(dim=-1) & torch.isfinite(v).all(dim=-1)  # [B, H, N_k]
    bias = None
    if key_bias is not None:
        bias = key_bias.double()
        bias = bias[:, None, None, :] if bias.dim() == 2 else bias[:, :, None, :]  # [B, H|1, 1, N_k]
        attend = attend & (bias != float("-inf"))
        key_ok = key_ok & ~(torch.isnan(bias) | (bias == float("inf")))[:, :, 0, :]
        bias = torch.where(torch.isfinite(bias), bias, 0.0)
    has_key = attend.any(dim=-1)  # [B, H, N_q]: by the keys, not their values
    nan_row = (has_key & ~torch.isfinite(q).all(dim=-1)) | (attend & ~key_ok[:, :, None, :]).any(dim=-1)
    q, k, v = (torch.where(torch.isfinite(t), t, 0.0) for t in (q, k, v))
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~attend, float("-inf"))
    w = torch.softmax(torch.where(has_key[..., None], s, torch.zeros_like(s)), dim=-1)
    w = torch.where(has_key[..., None], w, torch.zeros_like(w))
    if dropout is not None:
        batch, heads, n_q, n_k = w.shape
        keep = reference_keep_mask(dropout, batch, heads, n_q, n_k).to(w.device)
        w = w * keep.double() / (1.0 - dropout.p)
    return torch.matmul(w, v).masked_fill(nan_row[..., None], float("nan"))


def reference_with_grads(data: dict, dropout: Optional[DropoutSpec] = None) -> dict:
    """Float64 forward and gradients of the whole attention of ``data`` (``q, k, v`` ``[B, H, N, D]``,
    ``dout``, optional ``bias`` ``[B, N]`` / ``[B, H, N]`` and bool ``mask`` ``[B, N]``, folded into
    the key bias): ``{"out", "dq", "dk", "dv", "dbias"}`` (``dbias`` None without a bias)."""
    q, k, v = (data[x].clone().requires_grad_() for x in ("q", "k", "v"))
    bias_leaf = None if data["bias"] is None else data["bias"].clone().requires_grad_()
    bias = bias_leaf
    if data["mask"] is not None:
        mask = data["mask"]
        bias = torch.zeros(mask.shape, dtype=torch.float64) if bias is None else bias
        bias = bias.masked_fill(~(mask if bias.dim() == 2 else mask[:, None, :]), float("-inf"))
    out = reference_attention(q, k, v, key_bias=bias, dropout=dropout)
    out.backward(data["dout"])
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad,
            "dbias": None if bias_leaf is None else bias_leaf.grad}
