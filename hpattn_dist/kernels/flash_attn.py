"""Block kernel from the ``flash_attn`` package (Dao-AILab), used when it is importable on CUDA.

flash_attn works in ``[B, N, H, D]`` layout; these wrappers take and return ``[B, H, N, D]``.
The forward goes through the public :func:`flash_attn.flash_attn_func` with
``return_attn_probs=True`` (which returns the lse in every 2.x release); the backward calls the
private ``flash_attn.flash_attn_interface._flash_attn_backward`` by keyword.

Note [flash_attn versions]
    Supported: flash_attn 2.6 to 2.8 (:data:`SUPPORTED`); others are refused at selection with
    the version in the reason. The private backward changed its window argument within that
    range: through 2.6.x it takes ``window_size`` (a ``(left, right)`` tuple), from 2.7.0 on
    ``window_size_left`` and ``window_size_right``. We read which from its parameter names
    (from the registered op's schema where it is a ``torch.library`` custom op, whose Python
    signature is only ``*args, **kwargs``) and refuse, at selection, a signature that has
    neither or that lacks any other argument we pass. Releases before 2.7.3 carry kernels for
    sm 8.0 to 9.0 only (:data:`MAX_SM_BEFORE`): a newer GPU is refused at selection with that
    reason (and ``"auto"`` takes the next kernel) instead of failing inside the package.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from hpattn_dist.kernels.capability import Capability, KernelInput, sm_text
from hpattn_dist.kernels.sdpa import contiguous

#: Supported flash_attn releases: ``SUPPORTED[0] <= (major, minor) <= SUPPORTED[1]``.
SUPPORTED = ((2, 6), (2, 8))

#: ``(release, sm)``: releases before ``release`` run on compute capabilities up to ``sm`` only.
MAX_SM_BEFORE = ((2, 7, 3), (9, 0))

#: Backward arguments we pass besides the window (Note [flash_attn versions]).
_BACKWARD_ARGS = ("dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "dropout_p",
                  "softmax_scale", "causal", "alibi_slopes", "deterministic")


def _parameter_names(fn: Callable) -> tuple[str, ...]:
    """Parameter names of ``fn``, read from the op schema for a ``torch.library`` custom op."""
    overload = getattr(fn, "_opoverload", None)
    if overload is not None:
        return tuple(arg.name for arg in overload._schema.arguments)
    return tuple(inspect.signature(fn).parameters)


def backward_window_style(fn: Callable) -> Optional[str]:
    """``"left_right"`` (2.6.3+), ``"tuple"`` (up to 2.6.2) or None (unknown signature)."""
    names = set(_parameter_names(fn))
    if not set(_BACKWARD_ARGS) <= names:
        return None
    if {"window_size_left", "window_size_right"} <= names:
        return "left_right"
    if "window_size" in names:
        return "tuple"
    return None


def _version(text: str) -> Optional[tuple[int, int]]:
    parts = text.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def _release(text: str) -> Optional[tuple[int, int, int]]:
    """``"2.7.2.post1"`` -> ``(2, 7, 2)``; None when unreadable."""
    parts = text.split(".")
    try:
        patch = "".join(c for c in (parts[2] if len(parts) > 2 else "0").split("+")[0] if c.isdigit()) or "0"
        return int(parts[0]), int(parts[1]), int(patch.lstrip("0") or "0")
    except (IndexError, ValueError):
        return None


@functools.lru_cache(maxsize=1)
def installed_release() -> Optional[tuple[int, int, int]]:
    """The installed flash_attn's ``(major, minor, patch)``, None when absent or unreadable."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        return _release(str(importlib.import_module("flash_attn").__version__))
    except Exception:  # noqa: BLE001 - a broken CUDA extension raises anything
        return None


@functools.lru_cache(maxsize=1)
def library_problem() -> Optional[str]:
    """None when a supported flash_attn is importable, else why not (cached per process)."""
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash_attn package is not installed"
    try:
        package = importlib.import_module("flash_attn")
        interface = importlib.import_module("flash_attn.flash_attn_interface")
    except Exception as err:  # noqa: BLE001 - a broken CUDA extension raises anything
        return f"flash_attn fails to import ({type(err).__name__}: {err})"
    text = str(getattr(package, "__version__", "unknown"))
    version = _version(text)
    lo, hi = SUPPORTED
    if version is None or not lo <= version <= hi:
        return (f"flash_attn {text} is not supported (needs {lo[0]}.{lo[1]} to {hi[0]}.{hi[1]}; "
                "Note [flash_attn versions])")
    backward = getattr(interface, "_flash_attn_backward", None)
    if backward is None or backward_window_style(backward) is None:
        names = () if backward is None else _parameter_names(backward)
        return f"flash_attn {text}: unknown _flash_attn_backward signature {names}"
    return None


def _backward_head_dim(inp: KernelInput) -> Optional[str]:
    """flash_attn's backward takes 192 < D <= 224 only on sm 8.0 and sm 9.0."""
    sm, d = inp.capability, inp.head_dim
    if sm is not None and 192 < d <= 224 and sm not in ((8, 0), (9, 0)):
        return f"head dim {d} on {sm_text(sm)} (its backward needs sm 8.0 or 9.0 there)"
    return None


def _release_sm(inp: KernelInput) -> Optional[str]:
    """Releases before 2.7.3 run sm 8.0 to 9.0 only (Note [flash_attn versions])."""
    release, (before, max_sm) = installed_release(), MAX_SM_BEFORE
    if inp.capability is None or release is None or release >= before or inp.capability <= max_sm:
        return None
    return (f"{sm_text(inp.capability)} (flash_attn {'.'.join(map(str, release))} runs sm 8.0 to "
            f"{max_sm[0]}.{max_sm[1]}; {'.'.join(map(str, before))} or newer for this GPU)")


CAPABILITY = Capability(
    devices=("cuda",), dtypes=(torch.float16, torch.bfloat16), min_sm=(8, 0), max_head_dim=256,
    head_dim_multiple=8,  # the private backward gets unpadded heads
    library=lambda: library_problem(), checks=(_backward_head_dim, _release_sm),
)


def forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``(out [B, H, N_q, D], lse fp32 [B, H, N_q])``."""
    from flash_attn import flash_attn_func

    out, lse, _ = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        dropout_p=0.0, softmax_scale=scale, causal=False, return_attn_probs=True,
    )
    return out.transpose(1, 2), lse.narrow(2, 0, q.shape[2])


def prepare_backward(dout: Tensor, q: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, ...]:
    """Note [backward layouts] in ``dispatch.py``: dout, q and out as ``[B, N, H, D]`` memory in
    q's dtype (seen as ``[B, H, N, D]``), lse contiguous fp32."""
    def bnhd(t: Tensor) -> Tensor:
        return contiguous(t.to(q.dtype).transpose(1, 2)).transpose(1, 2)

    return bnhd(dout), bnhd(q), bnhd(out), contiguous(lse.float())


def backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Block gradients through the private backward (Note [flash_attn versions])."""
    from flash_attn.flash_attn_interface import _flash_attn_backward

    def nhd(t: Tensor) -> Tensor:  # no copy for what prepare_backward made
        return contiguous(t.to(q.dtype).transpose(1, 2))

    q_n, k_n, v_n = nhd(q), nhd(k), nhd(v)
    dq, dk, dv = torch.empty_like(q_n), torch.empty_like(k_n), torch.empty_like(v_n)
    kwargs: dict[str, Any] = dict(
        dout=nhd(dout), q=q_n, k=k_n, v=v_n, out=nhd(out), softmax_lse=contiguous(lse.float()),
        dq=dq, dk=dk, dv=dv, dropout_p=0.0, softmax_scale=scale, causal=False,
        # The deterministic backward zero-fills an fp32 dq accumulator per split
        # ([nsplits, B, N, H, D]): only when the user asked for deterministic algorithms.
        alibi_slopes=None, deterministic=torch.are_deterministic_algorithms_enabled(),
    )
    names = _parameter_names(_flash_attn_backward)
    style = backward_window_style(_flash_attn_backward)
    if style == "left_right":
        kwargs.update(window_size_left=-1, window_size_right=-1)
    elif style == "tuple":
        kwargs.update(window_size=(-1, -1))
    else:
        raise RuntimeError(f"unknown flash_attn _flash_attn_backward signature {names}")
    if "softcap" in names:
        kwargs["softcap"] = 0.0
    if "rng_state" in names:
        kwargs["rng_state"] = None
    _flash_attn_backward(**kwargs)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
