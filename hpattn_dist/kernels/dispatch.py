"""One dispatch point from a requested backend name to a block kernel: the capability table.

Every block kernel computes attention of a query block against ONE key/value block and returns
``(out, lse)``; its backward takes the FINAL output / lse of the whole attention. The strategies
(ring, Ulysses, hybrid) only ever call :func:`select_kernel` and the returned :class:`BlockKernel`.

:data:`KERNEL_TABLE` lists every kernel in order of preference, each with its
:class:`~hpattn_dist.kernels.capability.Capability`; :func:`select_kernel` decides from that table
alone (the reasons a kernel refuses an input: :func:`refusals`). Backend names:

    ``"manual"``      explicit matmul-softmax, chunked (runs anything; the only kernel that takes
                      a key bias or dropout).
    ``"sdpa"``        PyTorch's fused kernels (``sdpa:cpu_flash``, ``sdpa:cuda_flash``,
                      ``sdpa:cuda_efficient``): the first that accepts the input; when none does
                      (a key bias, dropout, float64 on CUDA, an old GPU...) the ``manual`` kernel,
                      with one warning naming every candidate's reasons.
    ``"flash_attn"``  the flash_attn package (Note [flash_attn versions] in ``flash_attn.py``);
                      a ``ValueError`` listing its reasons when it cannot run the input, a warning
                      and the ``manual`` kernel when only a key bias or dropout stands in the way.
    ``"auto"``        the first kernel of the table that accepts the input; silent.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from hpattn_dist.kernels import flash_attn as _flash_attn
from hpattn_dist.kernels import sdpa as _sdpa
from hpattn_dist.kernels.capability import Capability, KernelInput, Sm
from hpattn_dist.kernels.dropout import DropoutSpec
from hpattn_dist.kernels.manual import manual_backward, manual_forward
from hpattn_dist.masks import nonfinite_reads, nonfinite_rows
from hpattn_dist.precision import acc_dtype, declared_precision

KERNEL_BACKENDS: tuple[str, ...] = ("auto", "sdpa", "manual", "flash_attn")

FusedForward = Callable[[Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]
FusedBackward = Callable[..., tuple[Tensor, Tensor, Tensor]]

_reported: set[str] = set()


def block_layout(t: Tensor) -> Tensor:
    """``t`` in the layout every fused block kernel reads: itself when its last dim is dense (unit
    stride) and its storage 16-byte aligned, else a contiguous copy.

    Note [block layout]
        The fused ops read the head dim as dense rows whatever strides they are given: the CPU
        flash forward and backward return silently wrong results for a q, k, v or out whose last
        stride is not 1 (``base[..., ::2]``, or a ``[B, H, D, N]`` buffer viewed as ``[B, H, N,
        D]``), and the CUDA kernels also need 16-byte aligned rows. So :class:`BlockKernel`, the
        one door every kernel call passes (ring, Ulysses, hybrid, windows, forward and backward,
        autograd Function or registered op), hands the fused ops their tensors through this
        function; no kernel sees a caller's raw view. The executors apply it once per call to what
        they reuse at every block (q, dout), so the kernel's own check finds nothing to copy.
        The manual kernel reads any strides (its matmuls do).
    """
    if t.stride(-1) == 1 and (t.storage_offset() * t.element_size()) % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


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
        capability: what the kernel supports (the default: anything, with bias and dropout).
        prepare: ``(dout, q, out, lse) -> the same in the backward's layout`` (Note [backward
            layouts]); None when the backward reads them as they are.
    """

    name: str
    fused_forward: Optional[FusedForward] = None
    fused_backward: Optional[FusedBackward] = None
    capability: Capability = Capability(bias=True, dropout=True)
    prepare: Optional[Callable[..., tuple[Tensor, ...]]] = None

    @property
    def backend(self) -> str:
        """The backend name this kernel belongs to (``"sdpa"`` for ``"sdpa:cuda_flash"``)."""
        return self.name.split(":")[0]

    def not_supported_reasons(self, inp: KernelInput) -> list[str]:
        """Every reason this kernel refuses ``inp``; empty when it runs it."""
        return self.capability.not_supported_reasons(inp)

    @declared_precision
    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        scale: float,
        bias: Optional[Tensor] = None,
        dropout: Optional[DropoutSpec] = None,
        *,
        nan_rows: Optional[Tensor] = None,
        key_bad: Optional[Tensor] = None,
        finite: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """``(out [B, H, N_q, D], lse [B, H, N_q])``; lse in ``acc_dtype(q.dtype)``.

        ``out`` is in the kernel's output dtype (q.dtype for fused kernels, the accumulation dtype
        for ``manual``); an empty key block gives zero output and ``lse = -inf``; a row that reads
        a non-finite value NaN output and ``lse = NaN`` (Note [non-finite inputs]). ``nan_rows``:
        :meth:`nan_rows` of q, for a caller that runs several blocks of the same queries (the
        ring builds it once per call, not once per block); ``key_bad``: the caller's bool
        ``[B, H, N_k]`` of keys whose k or v is not finite (windows find it once per call and
        view it like their keys); else found here. ``finite``: the caller knows that no row
        reads a non-finite value (:func:`~hpattn_dist.masks.known_finite`), so none is marked.
        """
        acc = acc_dtype(q.dtype)
        if k.shape[2] == 0 or q.shape[2] == 0:
            out = torch.zeros(q.shape, dtype=acc, device=q.device)
            lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
            return out, lse
        if self.fused_forward is None:
            out, lse = manual_forward(q, k, v, scale, bias, dropout)
        else:
            out, lse = self.fused_forward(block_layout(q), block_layout(k), block_layout(v), scale)
            lse = lse.to(acc)
        # Rows that read a NaN or an infinity are NaN, out and lse, whatever the kernel made of
        # them (the CPU flash op: zeros and lse 0 for a row of -inf or NaN scores): Note
        # [non-finite inputs]. Both are fresh outputs of the kernel, so filled in place.
        if finite:
            return out, lse
        bad = nonfinite_reads(q, k, v, bias, key_bad=key_bad, q_bad=nan_rows)  # [B, H, N_q]
        return out.masked_fill_(bad.unsqueeze(-1), float("nan")), lse.masked_fill_(bad, float("nan"))

    def nan_rows(self, q: Tensor) -> Tensor:
        """Bool ``[B, H, N_q]``: the query rows holding a NaN or an infinity, which
        :meth:`forward` makes NaN wherever they have a key (Note [non-finite inputs])."""
        return nonfinite_rows(q)

    def prepare_backward(self, dout: Tensor, q: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, ...]:
        """``(dout, q, out, lse)`` in the layout and dtype this kernel's backward reads them in.

        Note [backward layouts]
            A ring's backward calls the block backward once per key block with the SAME dout, q,
            out and lse. The fused kernels want them in their own layout (flash_attn:
            ``[B, N, H, D]`` memory in q's dtype; the memory-efficient kernel: out in that layout
            and lse padded to 32 rows; every fused kernel: a contiguous fp32 lse), which their
            wrappers make with a copy when given anything else. Prepared once per backward
            here, they are read in place by every block; :meth:`backward` takes them as given.
        """
        if self.prepare is None:
            return dout, q, out, lse
        return self.prepare(dout, q, out, lse if q.dtype == torch.float64 else lse.float())

    @declared_precision
    def backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        delta: Optional[Tensor],
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
        dq, dk, dv = self.fused_backward(*(block_layout(t) for t in (dout, q, k, v, out)), lse_kernel, scale)
        return dq, dk, dv, None


MANUAL = BlockKernel("manual")

#: Every kernel, in order of preference ("auto" takes the first that accepts the input).
KERNEL_TABLE: tuple[BlockKernel, ...] = (
    BlockKernel("flash_attn", _flash_attn.forward, _flash_attn.backward, _flash_attn.CAPABILITY,
                _flash_attn.prepare_backward),
    BlockKernel("sdpa:cuda_flash", _sdpa.cuda_flash_forward, _sdpa.cuda_flash_backward,
                _sdpa.CUDA_FLASH, _sdpa.cuda_flash_prepare),
    BlockKernel("sdpa:cuda_efficient", _sdpa.cuda_efficient_forward, _sdpa.cuda_efficient_backward,
                _sdpa.CUDA_EFFICIENT, _sdpa.cuda_efficient_prepare),
    BlockKernel("sdpa:cpu_flash", _sdpa.cpu_flash_forward, _sdpa.cpu_flash_backward, _sdpa.CPU_FLASH),
    MANUAL,
)


def check_backend_name(backend: str, name: str = "backend") -> None:
    """Raise ``ValueError`` naming ``name`` unless ``backend`` is one of :data:`KERNEL_BACKENDS`."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"{name} must be one of {KERNEL_BACKENDS}, got {backend!r}")


def kernel_by_name(name: str) -> BlockKernel:
    """The kernel of :data:`KERNEL_TABLE` called ``name`` (e.g. ``"sdpa:cuda_flash"``)."""
    for kernel in KERNEL_TABLE:
        if kernel.name == name:
            return kernel
    raise ValueError(f"no kernel {name!r}; kernels: {[k.name for k in KERNEL_TABLE]}")


def candidates(backend: str) -> tuple[BlockKernel, ...]:
    """The kernels ``backend`` may use, in order of preference."""
    check_backend_name(backend)
    if backend == "auto":
        return KERNEL_TABLE
    return tuple(k for k in KERNEL_TABLE if k.backend == backend)


def refusals(backend: str, inp: KernelInput) -> dict[str, list[str]]:
    """``{kernel name: reasons it refuses inp}`` for every candidate of ``backend``."""
    return {k.name: k.not_supported_reasons(inp) for k in candidates(backend)}


def _format(reasons: dict[str, list[str]]) -> str:
    return "; ".join(f"{name}: {', '.join(why)}" for name, why in reasons.items())


def select_kernel(
    backend: str,
    q: Tensor,
    *,
    has_bias: bool = False,
    dropout: bool = False,
    capability: Optional[Sm] = None,
) -> BlockKernel:
    """Resolve ``backend`` for inputs like ``q`` ``[B, H, N, D]`` from :data:`KERNEL_TABLE`.

    Args:
        backend: one of :data:`KERNEL_BACKENDS`.
        q: the query block (only its shape, dtype and device are read).
        has_bias, dropout: whether the calls apply a key bias / dropout.
        capability: CUDA compute capability of ``q.device``; None queries it
            (:func:`hpattn_dist.kernels.capability.cuda_capability`).

    Raises:
        ValueError: unknown backend name, or ``"flash_attn"`` requested where it cannot run (the
            message names the input's shape, dtype, device and every reason).
    """
    check_backend_name(backend)
    if backend == "manual":
        return MANUAL
    inp = KernelInput.of(q, has_bias=has_bias, dropout=dropout, capability=capability)
    reasons = refusals(backend, inp)
    for kernel in candidates(backend):
        if not reasons[kernel.name]:
            return kernel
    # Only "sdpa" and "flash_attn" get here ("auto" ends with the manual kernel).
    if backend == "flash_attn":
        plain = KernelInput(inp.shape, inp.dtype, inp.device, inp.capability)
        if any(refusals(backend, plain).values()):
            raise ValueError(f"backend='flash_attn' cannot run {inp.describe()}: {_format(reasons)}")
    # The warning names the input without its shape, so that it is given once per kind of call.
    features = [n for n, on in (("a key bias/mask", has_bias), ("dropout", dropout)) if on]
    what = f"{inp.dtype} on {inp.device}" + (f" with {' and '.join(features)}" if features else "")
    _report_once(f"backend={backend!r} has no kernel for {what} ({_format(reasons)}); "
                 "using the 'manual' kernel for these calls")
    return MANUAL
