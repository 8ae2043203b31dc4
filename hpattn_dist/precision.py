"""The accumulation dtype rule shared by kernels, merge, strategies and masks.

Scores, softmax statistics, key biases and gradient accumulators are kept in ``acc_dtype`` of the
input dtype: float64 stays float64 (the oracle's precision), everything else (fp32, bf16, fp16)
accumulates in float32.
"""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "acc_dtype"]

#: The floating dtypes by name (configs, command lines, reports).
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32,
    "bfloat16": torch.bfloat16, "float16": torch.float16,
}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of ``dtype``: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
