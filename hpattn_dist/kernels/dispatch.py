"""One dispatch point from a requested backend name to a block kernel.

Every block kernel computes attention of a query block against ONE key/value block and returns
``(out, lse)``; its backward takes the FINAL output / lse of the whole attention. The strategies
(ring, Ulysses, hybrid) only ever call :func:`select_kernel` and the returned :class:`BlockKernel`.

Backends:
    ``"manual"``      explicit matmul-softmax, chunked (always available; the only one that takes a
                      key bias or dropout).
    ``"sdpa"``        PyTorch's fused kernels: the flash op for CPU; flash or memory-efficient on
                      CUDA. Falls back to ``manual`` (with one warning per reason) when a key bias
                      or dropout is requested.
    ``"flash_attn"``  the flash_attn package on CUDA (fp16 / bf16); an error when it cannot be used.
    ``"auto"``        flash_attn when usable, else sdpa, else manual; falls back silently.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from hpattn_dist.kernels import flash_attn as _flash_attn
from hpattn_dist.kernels import sdpa as _sdpa
from hpattn_dist.kernels.dropout import DropoutSpec
from hpattn_dist.kernels.manual import manual_backward, manual_forward
from hpattn_dist.precision import acc_dtype

KERNEL_BACKENDS: tuple[str, ...] = ("auto", "sdpa", "manual", "flash_attn")

FusedForward = Callable[[Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]
FusedBackward = Callable[..., tuple[Tensor, Tensor, Tensor]]

_reported: set[str] = set()


def _report_once(message: str) -> None:
    if message not in _reported:
        _reported.add(message)
        warnings.warn(message, stacklevel=3)


@dataclass(frozen=True)
class BlockKernel:
    """A resolved block kernel.

    Attributes:
        name: ``"manual"``, ``"sdpa:cpu_flash"``, ``"sdpa:cuda_flash"``,
            ``"sdpa:cuda_efficient"`` or ``"flash_attn"``.
        fused_forward / fused_backward: the fused ops, None for ``manual``.
    """

    name: str
    fused_forward: Optional[FusedForward] = None
    fused_backward: Optional[FusedBackward] = None

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        scale: float,
        bias: Optional[Tensor] = None,
        dropout: Optional[DropoutSpec] = None,
    ) -> tuple[Tensor, Tensor]:
        """``(out [B, H, N_q, D], lse [B, H, N_q])``; lse in ``acc_dtype(q.dtype)``.

        ``out`` is in the kernel's output dtype (q.dtype for fused kernels, the accumulation dtype
        for ``manual``); an empty key block gives zero output and ``lse = -inf``.
        """
        acc = acc_dtype(q.dtype)
        if k.shape[2] == 0 or q.shape[2] == 0:
            out = torch.zeros(q.shape, dtype=acc, device=q.device)
            lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
            return out, lse
        if self.fused_forward is None:
            return manual_forward(q, k, v, scale, bias, dropout)
        out, lse = self.fused_forward(q, k, v, scale)
        # The fused CPU op returns out = 0, lse = 0 for a query row holding NaN, where softmax
        # attention gives NaN; restore NaN so non-finite inputs propagate as in the oracle.
        nan_rows = torch.isnan(q).any(dim=-1)  # [B, H, N_q]
        out = out.masked_fill(nan_rows[..., None], float("nan"))
        return out, lse.to(acc).masked_fill(nan_rows, float("nan"))

    def backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        delta: Tensor,
        scale: float,
        bias: Optional[Tensor] = None,
        dropout: Optional[DropoutSpec] = None,
        need_dbias: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """Block gradients ``(dq, dk, dv, dbias)`` given the final ``out`` (q.dtype), ``lse`` and
        ``delta = rowsum(dout * out)`` (both ``[B, H, N_q]`` in the accumulation dtype)."""
        if k.shape[2] == 0 or q.shape[2] == 0:
            acc = acc_dtype(q.dtype)
            dbias = k.new_zeros(k.shape[:3], dtype=acc) if need_dbias else None
            return q.new_zeros(q.shape, dtype=acc), k.new_zeros(k.shape, dtype=acc), \
                v.new_zeros(v.shape, dtype=acc), dbias
        if self.fused_backward is None:
            return manual_backward(dout, q, k, v, lse, delta, scale, bias, dropout, need_dbias)
        lse_kernel = lse if q.dtype == torch.float64 else lse.float()
        dq, dk, dv = self.fused_backward(dout, q, k, v, out, lse_kernel, scale)
        return dq, dk, dv, None


MANUAL = BlockKernel("manual")
_CPU_FLASH = BlockKernel("sdpa:cpu_flash", _sdpa.cpu_flash_forward, _sdpa.cpu_flash_backward)
_CUDA_FLASH = BlockKernel("sdpa:cuda_flash", _sdpa.cuda_flash_forward, _sdpa.cuda_flash_backward)
_CUDA_EFFICIENT = BlockKernel(
    "sdpa:cuda_efficient", _sdpa.cuda_efficient_forward, _sdpa.cuda_efficient_backward
)
_FLASH_ATTN = BlockKernel("flash_attn", _flash_attn.forward, _flash_attn.backward)


def check_backend_name(backend: str) -> None:
    """Raise ``ValueError`` unless ``backend`` is one of :data:`KERNEL_BACKENDS`."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"backend must be one of {KERNEL_BACKENDS}, got {backend!r}")


def _sdpa_kernel(q: Tensor) -> BlockKernel:
    if q.device.type == "cpu":
        return _CPU_FLASH
    if q.device.type == "cuda":
        return _CUDA_FLASH if _sdpa.cuda_flash_supports(q) is None else _CUDA_EFFICIENT
    return MANUAL


def _flash_attn_refusals(q: Tensor) -> list[str]:
    reasons = []
    unavailable = _flash_attn.available()
    if unavailable is not None:
        reasons.append(unavailable)
    if q.device.type != "cuda":
        reasons.append(f"device {q.device} (needs cuda)")
    dtype_or_dim = _sdpa.cuda_flash_supports(q)
    if dtype_or_dim is not None:
        reasons.append(dtype_or_dim)
    return reasons


def select_kernel(backend: str, q: Tensor, *, has_bias: bool = False, dropout: bool = False) -> BlockKernel:
    """Resolve ``backend`` for inputs like ``q`` ``[B, H, N, D]``.

    Raises:
        ValueError: unknown backend name, or ``"flash_attn"`` requested where it cannot run (the
            message lists every reason and the input's shape, dtype and device).
    """
    check_backend_name(backend)
    needs_manual = [r for r, on in (("a key bias/mask", has_bias), ("dropout", dropout)) if on]
    if backend == "manual":
        return MANUAL
    if backend == "flash_attn":
        reasons = _flash_attn_refusals(q)
        if reasons:
            raise ValueError(
                "backend='flash_attn' cannot run on q of shape "
                f"{tuple(q.shape)}, {q.dtype}, {q.device}: " + "; ".join(reasons)
            )
        if needs_manual:
            _report_once(f"backend='flash_attn' does not take {' or '.join(needs_manual)}; "
                         "using the 'manual' kernel for these calls")
            return MANUAL
        return _FLASH_ATTN
    if needs_manual:
        if backend == "sdpa":
            _report_once(f"backend='sdpa' has no lse-returning kernel with {' or '.join(needs_manual)}; "
                         "using the 'manual' kernel for these calls")
        return MANUAL
    if backend == "auto" and not _flash_attn_refusals(q):
        return _FLASH_ATTN
    kernel = _sdpa_kernel(q)
    if kernel is MANUAL and backend == "sdpa":
        _report_once(f"backend='sdpa' has no fused kernel on {q.device.type}; using 'manual'")
    return kernel
