"""The accumulation dtype rule shared by kernels, merge, strategies and masks.

Scores, softmax statistics, key biases and gradient accumulators are kept in ``acc_dtype`` of the
input dtype: float64 stays float64 (the oracle's precision), everything else (fp32, bf16, fp16)
accumulates in float32.

Note [autocast]
    ``torch.autocast`` would recast the kernels' own arithmetic: under CPU (or CUDA) autocast the
    manual kernel's fp32 score matmuls ran in bf16, its backward recomputed them against a
    forward lse built from those bf16 scores, and an in-place fp32 accumulation (``baddbmm_``)
    refuses bf16 operands. The library computes in its declared precision instead: the block
    kernels (:class:`~hpattn_dist.kernels.dispatch.BlockKernel`, whatever executor calls them:
    ring, Ulysses, hybrid, windows, registered op or autograd Function, forward or backward) and
    the merge run with autocast off (:func:`declared_precision`); their inputs keep the dtype the
    caller's autocast gave them (bf16 q, k, v from a bf16 projection), the statistics and
    accumulators are fp32, the output has q's dtype. So under autocast the layer is at least as
    accurate as the single-device layer under the same autocast
    (``tests/distributed/test_autocast.py``), with one exception that is not autocast's: a fused
    kernel returns its block gradients in the inputs' dtype, so the ring (and hybrid's ring) adds
    P bf16-rounded block gradients where the single-device fused kernel rounds once (dq, dk, dv
    up to 1.25x the single-device error at P = 2, measured; the forward's merge is as accurate).
    Running the fused blocks in fp32 would cost fp32 copies of q, dout, out and each K/V block.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch

__all__ = ["DTYPES", "acc_dtype", "declared_precision"]

_F = TypeVar("_F", bound=Callable[..., Any])

#: The floating dtypes by name (configs, command lines, reports).
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32,
    "bfloat16": torch.bfloat16, "float16": torch.float16,
}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of ``dtype``: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def declared_precision(fn: _F) -> _F:
    """Run ``fn`` with autocast off on the device of its first tensor argument (Note [autocast])."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), None)
        if device is None or not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
            return fn(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
