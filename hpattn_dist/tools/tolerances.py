"""The allowed error of a result against its float64 reference, per dtype: the one definition used
by ``hpattn-dist verify``, the local-layer check and ``launch/gpu_check.py``.

Note [verify tolerances]
    ``ref`` is the float64 oracle value, ``got`` the value under test, ``s = max(1, max|ref|)``
    the scale of the compared tensor (parameter gradients sum over B * N pixels, so they are not
    of unit scale; ``s`` makes "at unit scale" hold for them too). Reported per quantity:
    ``max_abs = max|got - ref|`` and ``rel = max_abs / max|ref|``. A case passes when, for the
    output, the input gradient and every parameter gradient:

    ==========================  =====================================================
    dtype                       criterion (``t`` = ``tolerance_scale``)
    ==========================  =====================================================
    float64                     ``rel <= 1e-10 * t``
    float32                     ``max_abs <= 1e-5 * t * s``
    bfloat16, float16           ``|got - ref| <= 2.5e-2 * t * (s + |ref|)`` elementwise
    ==========================  =====================================================

    The float64 and float32 bounds are those of the numerics contract (DESIGN.md); the half
    precision bound is ``atol = rtol = 2.5e-2`` with ``atol`` taken at the tensor's scale.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["TOLERANCES", "describe_tolerances", "violation"]

#: Base tolerances of Note [verify tolerances], per dtype name: (kind, value).
TOLERANCES: dict[str, tuple[str, float]] = {
    "float64": ("rel", 1e-10),
    "float32": ("abs", 1e-5),
    "bfloat16": ("allclose", 2.5e-2),
    "float16": ("allclose", 2.5e-2),
}


def violation(got: Tensor, ref: Tensor, dtype_name: str, tolerance_scale: float = 1.0,
              ref_max: Optional[float] = None) -> float:
    """Largest ratio error / allowed error of Note [verify tolerances] over the elements
    (``<= 1`` passes; NaN or inf in ``got`` gives ``inf``).

    Args:
        got: the value under test, any shape and dtype.
        ref: the float64 reference, same shape.
        dtype_name: a key of :data:`TOLERANCES` (the dtype ``got`` was computed in).
        tolerance_scale: multiplies the tolerance (0: only exact results pass).
        ref_max: ``max|ref|`` of the whole tensor when ``ref`` is one rank's part of it
            (so every rank applies the same tolerance); default: of ``ref``.
    """
    if not bool(torch.isfinite(got).all()):
        return math.inf
    if ref.numel() == 0:
        return 0.0
    if ref_max is None:
        ref_max = float(ref.abs().max())
    err = (got.double() - ref).abs()
    kind, base = TOLERANCES[dtype_name]
    tol = base * tolerance_scale
    scale = max(1.0, ref_max)
    if kind == "rel":
        allowed = torch.full_like(err, tol * ref_max)
    elif kind == "abs":
        allowed = torch.full_like(err, tol * scale)
    else:
        allowed = tol * (scale + ref.abs())
    ratio = torch.where(allowed > 0, err / allowed.clamp_min(1e-300),
                        torch.where(err > 0, torch.full_like(err, math.inf), torch.zeros_like(err)))
    return float(ratio.max())


def describe_tolerances() -> str:
    """One line stating :data:`TOLERANCES`, for report headers."""
    words = {"rel": "rel<={:g}", "abs": "abs<={:g}*s", "allclose": "|err|<={:g}*(s+|ref|) per element"}
    return ", ".join(f"{name} {words[kind].format(value)}" for name, (kind, value) in TOLERANCES.items()) \
        + ", s=max(1,max|ref|) of the tensor"
