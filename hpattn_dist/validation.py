"""Argument checks shared by the functional APIs and the layers.

Every check raises ``ValueError`` (``TypeError`` for wrong types) naming the argument and the
offending shapes, dtypes or values. These are LOCAL checks: run them inside
:func:`hpattn_dist.comm.agreement.validated_signature` (the strategies do so in
:func:`hpattn_dist.strategies.plan.plan_attention`) so that a rank whose checks fail makes every
rank of the group raise the same error instead of leaving its peers blocked in the next collective
(Note [fail together] in ``comm/agreement.py``); the same block checks cross-rank agreement.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def check_dropout_p(dropout_p: float, name: str = "dropout_p") -> None:
    """``dropout_p`` must be a real number in ``[0, 1)`` (not a bool, not NaN).

    Raises:
        ValueError: naming ``name`` and the value.
    """
    if (isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float))
            or not 0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"{name} must be a float in [0, 1), got {dropout_p!r}")


# The dtypes the kernels and the exchanges compute in (Note [fail together]: anything else, a
# float8 format, must be refused here, inside the agreement, not by a kernel on some ranks only).
ATTENTION_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

_QKV_DIMS = ("B (batch)", "H (heads)", "N_local (pixels)", "D (head dim)")


def check_qkv(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], *, cross: bool = False) -> None:
    """q, k, v must be floating ``[B, H, N_local, D]`` tensors (:data:`ATTENTION_DTYPES`) with equal B, H, N_local, D, dtype
    and device; ``scale`` None or a positive finite number. ``cross``: q's N_local (queries) may
    differ from that of k and v (keys, which must still agree with each other).

    Raises:
        TypeError: q, k or v is not a tensor.
        ValueError: wrong rank; a dtype not in :data:`ATTENTION_DTYPES` (a float8 format); shapes that differ (the message names the
            dims that differ, e.g. ``H (heads): q 2, k 4, v 2``); no head or a head dim of 0; mixed
            dtypes or devices; meta tensors; bad ``scale``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, N_local, D], got {tuple(t.shape)}")
        if t.dtype not in ATTENTION_DTYPES:
            raise ValueError(f"{name} must be a floating-point tensor of dtype float64, float32, float16 or "
                             f"bfloat16, got {t.dtype}")
    dims = [i for i in range(4) if not (cross and i == 2 and k.shape[2] == v.shape[2])]
    if any(not q.shape[i] == k.shape[i] == v.shape[i] for i in dims):
        differ = [
            f"{_QKV_DIMS[i]}: q {q.shape[i]}, k {k.shape[i]}, v {v.shape[i]}"
            for i in dims if not q.shape[i] == k.shape[i] == v.shape[i]
        ]
        what = ("q [B, H, Nq_local, D], k and v [B, H, Nk_local, D] must agree in B, H and D (k and v "
                "in Nk_local too)" if cross else "q, k and v must have the same shape [B, H, N_local, D]")
        raise ValueError(
            what + "; they differ in "
            + "; ".join(differ)
            + f" (q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)})"
        )
    if q.shape[1] == 0 or q.shape[3] == 0:  # B = 0 and N_local = 0 are fine: nothing to attend
        raise ValueError(f"q, k and v need H >= 1 heads and a head dim D >= 1, got H {q.shape[1]}, D {q.shape[3]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type == "meta":
        raise ValueError("q, k and v are meta tensors (shapes without data): the attention exchanges "
                         "their data between ranks, so it runs on a real device")
    if scale is not None and not (
        isinstance(scale, (int, float)) and not isinstance(scale, bool)
        and math.isfinite(scale) and scale > 0
    ):
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")


def check_layer_input(
    x: Tensor, embed_dim: int, key_mask: Optional[Tensor] = None, pixels: str = "N_local",
    name: str = "x", dim_name: str = "embed_dim", weight: Optional[Tensor] = None,
) -> None:
    """The layer's input: a floating ``[B, N_local, E]`` tensor with ``E == embed_dim``, and an
    optional bool ``key_mask [B, N_local]`` on the same device. ``pixels`` names the pixel dim in
    messages (``"N"`` for the single-device layer), ``name`` the input and ``dim_name`` its
    feature dim (a cross-attention layer has two inputs). ``weight``: the projection ``x`` meets
    first; outside ``torch.autocast`` ``x`` must have its dtype and device.

    Raises:
        TypeError: ``x`` is not a tensor.
        ValueError: naming ``x`` or ``key_mask`` and the expected and actual shape / dtype.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != embed_dim:
        raise ValueError(f"{name} must have shape [B, {pixels}, {dim_name}={embed_dim}], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if weight is not None and (x.device.type != weight.device.type or (
            x.dtype != weight.dtype and not _autocast_on(x.device))):
        raise ValueError(f"{name} is {x.dtype} on {x.device} but the layer's weights are {weight.dtype} on "
                         f"{weight.device} (outside torch.autocast the projection needs one dtype and device)")
    if key_mask is not None:
        expected = (x.shape[0], x.shape[1])
        if not isinstance(key_mask, Tensor) or key_mask.dtype != torch.bool or tuple(key_mask.shape) != expected:
            got = (f"{key_mask.dtype} {tuple(key_mask.shape)}" if isinstance(key_mask, Tensor)
                   else type(key_mask).__name__)
            raise ValueError(f"key_mask must be a bool tensor of shape [B, {pixels}] = {expected}, got {got}")
        if key_mask.device != x.device:
            raise ValueError(f"key_mask is on {key_mask.device} but {name} is on {x.device}")


def _autocast_on(device: torch.device) -> bool:
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


def check_heads_divisible(heads: int, group_size: int, what: str, group_name: str = "group") -> None:
    """Raise ``ValueError`` naming both numbers unless ``heads`` is divisible by ``group_size``."""
    if heads % group_size != 0:
        raise ValueError(
            f"{what}: the number of heads H={heads} is not divisible by the size of {group_name} "
            f"P={group_size}; head parallelism needs H % P == 0 (use strategy='ring', or a "
            f"Ulysses degree that divides {heads})"
        )
