"""PyTorch's fused attention kernels that expose the log-sum-exp, and what each supports.

``F.scaled_dot_product_attention`` hides the lse that a ring merge needs, so these wrappers call
the ATen ops underneath it directly:

* CPU: ``_scaled_dot_product_flash_attention_for_cpu`` (fp64, fp32, bf16, fp16);
* CUDA: ``_scaled_dot_product_flash_attention`` (FlashAttention-2: fp16/bf16, sm 8.0+) and
  ``_scaled_dot_product_efficient_attention`` (memory-efficient: fp32/fp16, bf16 from sm 8.0;
  no float64 on either, so float64 on CUDA runs the ``manual`` kernel).

Their backward ops accept the FINAL output and lse of the whole attention, which is what the ring
needs (Note [bounded score tile] in ``manual.py`` explains the block backward formula). None of
them is called with an empty block: the CPU op dies with SIGFPE on zero keys.

Note [fused op arguments]
    Checked against torch 2.13's op schemas and the CUDA sources behind them; the tests replay
    every call under ``FakeTensorMode`` and check what the op receives.

    * Flash backward: ``cum_seq_q`` / ``cum_seq_k`` are None. ``_flash_attention_backward``
      takes the variable-length path whenever they are DEFINED tensors (even empty ones) and
      then demands int32 offsets; None means the dense call, as in sdpa's own autograd formula.
      ``max_q`` / ``max_k`` are the query and key lengths. ``logsumexp`` is read as a dense fp32
      ``[B, H, N_q]`` array with no shape check, so it is passed contiguous.
    * Efficient backward: the CUDA kernel reads ``out`` (viewed ``[B, N, H, D]``) with a row
      stride of ``H * D`` that it assumes rather than reads, so ``out`` is passed in that layout
      (``[B, N, H, D]``-contiguous, as the forward op returns it); any other layout gives wrong
      gradients without an error. ``logsumexp`` is padded to the forward's ``ceil(N_q / 32) * 32``
      rows (once per backward: Note [backward layouts] in ``dispatch.py``); ``attn_bias`` is
      None; ``grad_input_mask`` asks for dq, dk, dv only.
    * Both: ``dropout_p = 0``, ``is_causal = False``, ``out`` and ``grad_out`` in q's dtype (the
      kernels take one element type for all), philox seed/offset unused (read only with dropout),
      q/k/v with a unit last stride and 16-byte aligned storage, as :class:`BlockKernel` hands
      every fused op its tensors (Note [block layout] in ``dispatch.py``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from hpattn_dist.kernels.capability import Capability, KernelInput, sm_text

_aten = torch.ops.aten

#: Row padding of the memory-efficient kernel's lse (its ``kAlignLSE``).
EFFICIENT_LSE_ALIGN = 32


def contiguous(t: Tensor) -> Tensor:
    """``t.contiguous()``, spelled so that it also runs on fake CUDA tensors of a CPU build."""
    return t if t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)


def _bnhd(t: Tensor) -> Tensor:
    """``[B, H, N, D]`` view of a ``[B, N, H, D]``-contiguous tensor (no copy when already so)."""
    return contiguous(t.transpose(1, 2)).transpose(1, 2)


def _unused_rng(device: torch.device) -> Tensor:
    return torch.empty(0, dtype=torch.int64, device=device)


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
    """CUDA FlashAttention-2 block: ``(out [B, H, N_q, D] q.dtype, lse fp32 [B, H, N_q])``."""
    res = _aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, False, False, scale=scale
    )
    return res[0], res[1]


def cuda_flash_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Dense FlashAttention-2 block backward (Note [fused op arguments])."""
    unused = _unused_rng(q.device)
    dq, dk, dv = _aten._scaled_dot_product_flash_attention_backward(
        dout.to(q.dtype), q, k, v, out.to(q.dtype), contiguous(lse.float()),
        None, None, q.shape[2], k.shape[2], 0.0, False, unused, unused, scale=scale,
    )
    return dq, dk, dv


def cuda_flash_prepare(dout: Tensor, q: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, ...]:
    """Note [backward layouts]: dout and out in q's dtype, lse contiguous fp32."""
    return dout.to(q.dtype), q, out.to(q.dtype), contiguous(lse.float())


def cuda_efficient_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """CUDA memory-efficient block: ``(out, lse fp32 [B, H, N_q])`` (the op pads lse rows)."""
    res = _aten._scaled_dot_product_efficient_attention(
        q, k, v, None, True, 0.0, False, scale=scale
    )
    return res[0], res[1].narrow(2, 0, q.shape[2])


def cuda_efficient_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Memory-efficient block backward (Note [fused op arguments])."""
    n_q = q.shape[2]
    lse_rows = lse if lse.shape[2] == _padded_rows(n_q) and lse.is_contiguous() else _padded_lse(lse)
    unused = _unused_rng(q.device)
    dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
        dout.to(q.dtype), q, k, v, None, _bnhd(out.to(q.dtype)), lse_rows, unused, unused, 0.0,
        [True, True, True, False], False, scale=scale,
    )
    return dq, dk, dv


def _padded_rows(n_q: int) -> int:
    return n_q + (-n_q % EFFICIENT_LSE_ALIGN)


def _padded_lse(lse: Tensor) -> Tensor:
    """``[B, H, N_q]`` -> contiguous fp32 ``[B, H, ceil(N_q / 32) * 32]`` (the forward's rows)."""
    return contiguous(F.pad(lse.float(), (0, _padded_rows(lse.shape[2]) - lse.shape[2])))


def cuda_efficient_prepare(dout: Tensor, q: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, ...]:
    """Note [backward layouts]: dout in q's dtype, out ``[B, N, H, D]``-contiguous, lse padded;
    :func:`cuda_efficient_backward` takes an lse of the padded length as it is."""
    return dout.to(q.dtype), q, _bnhd(out.to(q.dtype)), _padded_lse(lse)


# --- capabilities (torch 2.13: aten/src/ATen/native/transformers/cuda/sdp_utils.cpp, flash_api.cpp)


def _cuda_build_problem() -> Optional[str]:
    if torch.version.hip is not None:
        return "ROCm build (its fused kernels' limits are not tabulated here)"
    return None


def _flash_backward_head_dim(inp: KernelInput) -> Optional[str]:
    """torch refuses FlashAttention training with 192 < D <= 224 on sm 8.6-8.9 and 12.x."""
    sm, d = inp.capability, inp.head_dim
    if sm is None or not 192 < d <= 224:
        return None
    if (8, 6) <= sm <= (8, 9) or (12, 0) <= sm <= (12, 1):
        return f"head dim {d} on {sm_text(sm)} (its backward needs D <= 192 or D > 224 there)"
    return None


def _efficient_head_dim(inp: KernelInput) -> Optional[str]:
    """D must be a multiple of the kernel's GEMM alignment (torch's ``minimum_gemm_alignment``)."""
    sm = inp.capability
    if sm is None:
        return None
    half = inp.dtype in (torch.float16, torch.bfloat16)
    align = (8 if half else 4) if sm >= (8, 0) else (8 if half else 1) if sm >= (7, 0) else 1
    if inp.head_dim % align:
        return f"head dim {inp.head_dim} (needs a multiple of {align} for {inp.dtype} on {sm_text(sm)})"
    return None


CPU_FLASH = Capability(
    devices=("cpu",), dtypes=(torch.float64, torch.float32, torch.bfloat16, torch.float16),
)
CUDA_FLASH = Capability(
    devices=("cuda",), dtypes=(torch.float16, torch.bfloat16), min_sm=(8, 0), max_sm=(12, 1),
    max_head_dim=256, head_dim_multiple=8, library=_cuda_build_problem,
    checks=(_flash_backward_head_dim,),
)
CUDA_EFFICIENT = Capability(
    devices=("cuda",), dtypes=(torch.float16, torch.bfloat16, torch.float32),
    dtype_min_sm=((torch.bfloat16, (8, 0)),), min_sm=(5, 0), max_sm=(12, 1),
    library=_cuda_build_problem, checks=(_efficient_head_dim,),
)
