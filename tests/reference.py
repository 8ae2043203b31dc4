"""Float64 explicit attention: the reference every kernel and strategy test compares against.

Deliberately naive (one ``[B, H, N_q, N_k]`` score matrix, ``torch.softmax``), so that it is
obviously correct; use it only at test sizes. Legend: B batch, H heads, N_q queries, N_k keys,
D head dim.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from hpattn_dist.kernels import DropoutSpec, keep_mask


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: Optional[float] = None,
    key_bias: Optional[Tensor] = None,
    dropout: Optional[DropoutSpec] = None,
) -> Tensor:
    """``softmax(q k^T * scale + key_bias) v`` in float64, differentiable w.r.t. every input.

    Args:
        q: ``[B, H, N_q, D]``; k, v: ``[B, H, N_k, D]`` (any floating dtype; computed in float64).
        scale: score multiplier, default ``D ** -0.5``.
        key_bias: optional ``[B, N_k]``, ``[B, 1, N_k]`` or ``[B, H, N_k]`` added to every score of
            that key; ``-inf`` masks the key. A query row with every key masked gets a zero output
            and zero gradients (never NaN).
        dropout: optional spec of the WHOLE score matrix (offsets of its first query / key / head);
            weights are normalised first, then multiplied by
            ``keep_mask(dropout, ...) / (1 - dropout.p)``.

    Returns:
        ``[B, H, N_q, D]`` float64.
    """
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-2, -1)) * scale  # [B, H, N_q, N_k]
    if key_bias is not None:
        bias = key_bias.double()
        s = s + (bias[:, None, None, :] if bias.dim() == 2 else bias[:, :, None, :])
    has_key = torch.isfinite(s).any(dim=-1, keepdim=True)  # [B, H, N_q, 1]
    s = torch.where(has_key, s, torch.zeros_like(s))  # softmax of a fully masked row: no NaN
    w = torch.softmax(s, dim=-1) * has_key
    if dropout is not None:
        batch, heads, n_q, n_k = w.shape
        keep = keep_mask(dropout, batch, heads, n_q, n_k, w.device)
        w = w * keep.double() / (1.0 - dropout.p)
    return torch.matmul(w, v)
