"""What a block kernel can run: the capability table's vocabulary.

Every block kernel declares a :class:`Capability` (devices, dtypes, head dims, compute capability,
key bias, dropout, library) and answers :meth:`Capability.not_supported_reasons` for a
:class:`KernelInput` with the list of reasons it refuses it (empty: it runs). Selection
(:func:`hpattn_dist.kernels.dispatch.select_kernel`) reads nothing else, so a choice and its
reasons can be tested without a GPU: :class:`KernelInput` carries the CUDA compute capability,
queried through :func:`cuda_capability` (the one place to monkeypatch) or passed in.

Legend: B batch, H heads, N query rows, D head dim; ``sm X.Y`` a CUDA compute capability.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

Sm = tuple[int, int]


def cuda_capability(device: torch.device) -> Optional[Sm]:
    """Compute capability ``(major, minor)`` of a CUDA ``device``; None for any other device."""
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def sm_text(sm: Optional[Sm]) -> str:
    return "unknown" if sm is None else f"sm {sm[0]}.{sm[1]}"


@dataclass(frozen=True)
class KernelInput:
    """The facts about one attention call that decide which kernel may run it.

    Attributes:
        shape: q's shape ``[B, H, N, D]``.
        dtype, device: q's dtype and device.
        capability: CUDA compute capability of ``device`` (None off CUDA).
        has_bias: a key bias / mask is applied.
        dropout: dropout of the attention weights is applied.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    capability: Optional[Sm] = None
    has_bias: bool = False
    dropout: bool = False

    @classmethod
    def of(cls, q: Tensor, *, has_bias: bool = False, dropout: bool = False,
           capability: Optional[Sm] = None) -> "KernelInput":
        """The input ``q`` ``[B, H, N, D]``; ``capability`` None queries :func:`cuda_capability`."""
        if capability is None:
            capability = cuda_capability(q.device)
        return cls(tuple(q.shape), q.dtype, q.device, capability, has_bias, dropout)

    @property
    def head_dim(self) -> int:
        return self.shape[-1]

    def describe(self) -> str:
        """E.g. ``q (2, 4, 768, 64), torch.float16, cuda:0 (sm 8.0), with dropout``."""
        text = f"q {self.shape}, {self.dtype}, {self.device}"
        if self.device.type == "cuda":
            text += f" ({sm_text(self.capability)})"
        features = [name for name, on in (("a key bias", self.has_bias), ("dropout", self.dropout)) if on]
        return text + (f", with {' and '.join(features)}" if features else "")


Check = Callable[[KernelInput], Optional[str]]


@dataclass(frozen=True)
class Capability:
    """What one kernel supports; :meth:`not_supported_reasons` checks an input against it.

    Attributes:
        devices: device types (``"cpu"``, ``"cuda"``); empty means any.
        dtypes: accepted dtypes; empty means any floating dtype.
        dtype_min_sm: ``(dtype, sm)`` pairs: that dtype needs at least that compute capability.
        max_head_dim: largest D; None for no limit.
        head_dim_multiple: D must be a multiple of this (1: any).
        min_sm, max_sm: compute-capability range on CUDA (inclusive); None for open.
        bias, dropout: whether the kernel takes a key bias / dropout.
        library: None when the library behind the kernel is usable, else why not (called per check).
        checks: further rules, each returning a reason or None.
    """

    devices: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = ()
    dtype_min_sm: tuple[tuple[torch.dtype, Sm], ...] = ()
    max_head_dim: Optional[int] = None
    head_dim_multiple: int = 1
    min_sm: Optional[Sm] = None
    max_sm: Optional[Sm] = None
    bias: bool = False
    dropout: bool = False
    library: Optional[Callable[[], Optional[str]]] = None
    checks: tuple[Check, ...] = field(default=())

    def not_supported_reasons(self, inp: KernelInput) -> list[str]:
        """Every reason this kernel cannot run ``inp``; empty when it can."""
        reasons = []
        if self.library is not None:
            problem = self.library()
            if problem is not None:
                reasons.append(problem)
        if self.devices and inp.device.type not in self.devices:
            reasons.append(f"device {inp.device} (needs {' or '.join(self.devices)})")
        if self.dtypes and inp.dtype not in self.dtypes:
            names = " or ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"dtype {inp.dtype} (needs {names})")
        if inp.device.type == "cuda":
            reasons += self._capability_reasons(inp)
        d = inp.head_dim
        if self.max_head_dim is not None and d > self.max_head_dim:
            reasons.append(f"head dim {d} (needs <= {self.max_head_dim})")
        if d % self.head_dim_multiple:
            reasons.append(f"head dim {d} (needs a multiple of {self.head_dim_multiple})")
        if inp.has_bias and not self.bias:
            reasons.append("takes no key bias/mask")
        if inp.dropout and not self.dropout:
            reasons.append("takes no dropout")
        for check in self.checks:
            reason = check(inp)
            if reason is not None:
                reasons.append(reason)
        return reasons

    def _capability_reasons(self, inp: KernelInput) -> list[str]:
        sm = inp.capability
        needs_sm = self.min_sm is not None or self.max_sm is not None or self.dtype_min_sm
        if sm is None:
            return ["unknown CUDA compute capability"] if needs_sm else []
        reasons = []
        if (self.min_sm is not None and sm < self.min_sm) or (self.max_sm is not None and sm > self.max_sm):
            lo = "" if self.min_sm is None else sm_text(self.min_sm)
            hi = "" if self.max_sm is None else sm_text(self.max_sm)
            reasons.append(f"{sm_text(sm)} (needs {lo}{' to ' if lo and hi else ''}{hi}"
                           f"{' or newer' if lo and not hi else ''})")
        for dtype, min_sm in self.dtype_min_sm:
            if inp.dtype == dtype and sm < min_sm:
                reasons.append(f"{dtype} on {sm_text(sm)} (needs {sm_text(min_sm)} or newer)")
        return reasons
