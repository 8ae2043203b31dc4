"""Block kernel from the ``flash_attn`` package (Dao-AILab), used when it is importable on CUDA.

flash_attn works in ``[B, N, H, D]`` layout; these wrappers take and return ``[B, H, N, D]``.
Its private ``_flash_attn_forward`` / ``_flash_attn_backward`` changed signature across releases,
so we go through :func:`flash_attn.flash_attn_func` with ``return_attn_probs=True`` (which returns
the lse in every 2.x release) for the forward, and the private backward by keyword.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
from torch import Tensor


def available() -> Optional[str]:
    """None when flash_attn can be used, else why not."""
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash_attn package is not installed"
    if not torch.cuda.is_available():
        return "flash_attn needs CUDA"
    return None


def forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``(out [B, H, N_q, D], lse fp32 [B, H, N_q])``."""
    from flash_attn import flash_attn_func

    out, lse, _ = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        dropout_p=0.0, softmax_scale=scale, causal=False, return_attn_probs=True,
    )
    return out.transpose(1, 2), lse[:, :, : q.shape[2]]


def backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    from flash_attn.flash_attn_interface import _flash_attn_backward

    def nhd(t: Tensor) -> Tensor:
        return t.transpose(1, 2).contiguous()

    dq, dk, dv = torch.empty_like(nhd(q)), torch.empty_like(nhd(k)), torch.empty_like(nhd(v))
    _flash_attn_backward(
        dout=nhd(dout), q=nhd(q), k=nhd(k), v=nhd(v), out=nhd(out), softmax_lse=lse.contiguous(),
        dq=dq, dk=dk, dv=dv, dropout_p=0.0, softmax_scale=scale, causal=False,
        window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
        deterministic=True, rng_state=None,
    )
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
