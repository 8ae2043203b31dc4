"""PyTorch's fused attention kernels that expose the log-sum-exp.

``F.scaled_dot_product_attention`` hides the lse that a ring merge needs, so these wrappers call
the ATen ops underneath it directly:

* CPU: ``_scaled_dot_product_flash_attention_for_cpu`` (fp64, fp32, bf16, fp16);
* CUDA: ``_scaled_dot_product_flash_attention`` (fp16/bf16, head dim <= 256, multiple of 8) and
  ``_scaled_dot_product_efficient_attention`` (fp32 and the rest).

Their backward ops accept the FINAL output and lse of the whole attention, which is what the ring
needs (Note [bounded score tile] in ``manual.py`` explains the block backward formula).
None of them is called with an empty block: the CPU op dies with SIGFPE on zero keys.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_aten = torch.ops.aten


def cpu_flash_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``(out [B, H, N_q, D] in q.dtype, lse [B, H, N_q] fp32, fp64 for fp64 input)``."""
    out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    return out, lse


def cpu_flash_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of one block given the final ``out`` (q.dtype) and ``lse``."""
    return _aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, False, scale=scale
    )


def cuda_flash_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """CUDA FlashAttention-2 block: ``(out, lse fp32 [B, H, N_q])``."""
    res = _aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    return res[0], res[1]


def cuda_flash_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    empty = torch.empty(0, dtype=torch.int64, device=q.device)
    dq, dk, dv = _aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, empty, empty, q.shape[2], k.shape[2], 0.0, False,
        empty, empty, scale=scale,
    )
    return dq, dk, dv


def cuda_efficient_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """CUDA memory-efficient block: ``(out, lse fp32 [B, H, N_q])`` (the op pads lse rows)."""
    res = _aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)
    return res[0], res[1][:, :, : q.shape[2]]


def cuda_efficient_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    empty = torch.empty(0, dtype=torch.int64, device=q.device)
    dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, None, out, lse.contiguous(), empty, empty, 0.0, [True, True, True, False],
        False, scale=scale,
    )
    return dq, dk, dv


def cuda_flash_supports(q: Tensor) -> Optional[str]:
    """None when the CUDA flash kernel applies to ``q``, else the reason it does not."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (flash needs float16 or bfloat16)"
    d = q.shape[-1]
    if d > 256 or d % 8:
        return f"head dim {d} (flash needs <= 256 and a multiple of 8)"
    return None
