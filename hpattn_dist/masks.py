"""Key masks and key biases: the additive bias they fold into, and the keys a mask leaves.

Legend: B batch, H heads, N_r pixels (keys) on this rank, M_r keys left after compaction.

Note [non-finite inputs]
~~~~~~~~~~~~~~~~~~~~~~~~
Defined once, for every path (global, cross, windowed; ring, Ulysses, hybrid; the registered ops;
every block kernel) and every oracle (``oracle.py``, ``cross.py``,
``local/oracle.py``, the tests' references): a query attends to its ALLOWED keys, those unmasked
(``key_mask`` True, ``key_bias`` above ``-inf``) and, with a window, in its window.

* A query with no allowed key gets zeros, whatever it holds (Note [fully masked queries] in
  ``oracle.py``).
* Otherwise its row is NaN when anything it reads is not finite: its query, or the key, the
  value or the bias of an allowed key holds a NaN or an infinity (dropout aside: a dropped key
  still counts). Else every score and value it reads is finite, and its row is the explicit
  softmax formula over exactly its allowed keys, as PyTorch's SDPA computes it over them.
* A key it does not attend to never reaches its row, whatever that key holds. A matmul would
  multiply the key's value by a zero weight (``0 * NaN = NaN``) and a bias would add ``-inf`` to
  its score (``NaN - inf = NaN``), so such keys are EXCLUDED: the manual kernel sets their scores
  to ``-inf`` and their K/V rows to zero (:func:`zero_excluded_keys`), the oracles mask their
  scores after zeroing every non-finite entry (:func:`finite_or_zero`), and a window leaves them
  out altogether.

Why infinities make a row NaN rather than "what the formula gives": on infinite scores the
formula's value depends on how it is evaluated, and no kernel follows one evaluation. A row whose
scores are all ``-inf`` is ``0 / 0`` in ``torch.softmax`` (NaN) but zeros in SDPA's math backend
(its safe softmax) and in the manual kernel; PyTorch's CPU flash kernel returns zeros with
``lse = 0`` for such a row (and for a row whose scores are all NaN), which a ring merge would then
weigh as a block of real keys; and ``0 * inf`` decides whether a key of weight zero with an
infinite value spoils a row, which a fused kernel may or may not compute. Which rows read a
non-finite value is known from the inputs alone, so every kernel follows the same rule at the
same cost: :func:`nonfinite_reads` per block (two reductions over q, k and
v, no score read, no device-to-host read), whose rows get NaN output and NaN lse; the online
merge carries a NaN lse to the final row (Note [stable merge] in ``merge.py``). Windows find
the flags of their queries and keys once per call and read them like the keys, and skip them
where the inputs are known finite (Note [known finite inputs]). The oracles
compute the formula on inputs whose non-finite entries are zeroed (:func:`finite_or_zero`; a row
that reads none of them is unchanged) and set the rows :func:`nonfinite_reads` names to NaN.

Finite inputs whose scores overflow the accumulation dtype (``|q| |k|`` near its largest
value) are not covered: their rows are unspecified. Gradients are the formula's where the
output row is finite (keys a query does not attend to get none from it; a query with no allowed
key gives none, whatever it holds); the gradients flowing from a NaN row are not specified.
"""

from __future__ import annotations

import collections
import math
import weakref
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from hpattn_dist.precision import acc_dtype

__all__ = ["MaskLayout", "finite_or_zero", "key_bias_from_mask", "known_finite", "mask_layout",
           "nonfinite_reads", "nonfinite_rows", "unmasked_keys", "zero_excluded_keys"]


def zero_excluded_keys(t: Tensor, excluded: Optional[Tensor]) -> Tensor:
    """``t [B, H, N_k, D]`` with the rows of excluded keys (``excluded``: bool ``[B, H|1, N_k]``)
    set to zero, so that no zero weight multiplies a non-finite value (Note [non-finite inputs]).
    ``t`` itself, no copy, when it is known finite (:func:`known_finite`): a zero weight times a
    finite value is already zero, and the copy would be two ``[B, H, N_k, D]`` tensors beside a
    block kernel's K and V."""
    if excluded is None or known_finite(t):
        return t
    return t.masked_fill(excluded[..., None], 0)


def nonfinite_rows(t: Tensor) -> Tensor:
    """Bool ``[..., N]``: the rows of ``t [..., N, D]`` holding a NaN or an infinity (their max or
    min is not finite: two reductions, no temporary of ``t``'s size; ``aminmax`` is several times
    slower on CPU)."""
    if t.shape[-1] == 0:
        return torch.zeros(t.shape[:-1], dtype=torch.bool, device=t.device)
    t = t.detach()
    return (torch.isfinite(t.amax(dim=-1)) & torch.isfinite(t.amin(dim=-1))).logical_not()  # (~: not on fake CUDA)


def known_finite(*tensors: Tensor, biases: Sequence[Optional[Tensor]] = ()) -> bool:
    """True when every entry of ``tensors`` is finite and no entry of ``biases`` (additive key
    biases, None for none) is NaN or ``+inf`` (``-inf`` masks a key): then no row reads a
    non-finite value (Note [non-finite inputs]) and a caller may skip :func:`nonfinite_reads`.

    Note [known finite inputs]
        Decided on the host, so only for plain CPU tensors, where reading a value is no
        device-to-host transfer (Note [agreement off the device] in ``comm/agreement.py``):
        anything else (a device, meta or fake tensor) answers False, and the caller finds the
        rows as the Note says. One sum per tensor (a NaN or an infinity makes it NaN or
        infinite), a fraction of :func:`nonfinite_rows`' two row reductions; a finite tensor
        whose sum overflows also answers False, which only costs the per-row search.
    """
    biases = [b for b in biases if b is not None]
    if any(type(t) is not Tensor or t.device.type != "cpu" for t in (*tensors, *biases)):
        return False
    if not all(math.isfinite(t.detach().sum().item()) for t in tensors if t.numel()):
        return False
    return all(bool((b.detach() < float("inf")).all()) for b in biases)  # False at NaN and +inf


def nonfinite_reads(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None,
                    allowed: Optional[Tensor] = None, key_bad: Optional[Tensor] = None,
                    q_bad: Optional[Tensor] = None) -> Tensor:
    """Bool ``[B, H, N_q]``: the query rows that Note [non-finite inputs] makes NaN (a row with an
    allowed key that reads a NaN or an infinity).

    Args:
        q: ``[B, H, N_q, D]``; k, v: ``[B, H, N_k, D]``.
        bias: optional additive key bias ``[B, H|1, N_k]``: ``-inf`` excludes the key, NaN and
            ``+inf`` are non-finite values read.
        allowed: optional bool, broadcastable to ``[B, H, N_q, N_k]``: the keys each query may
            attend to (a window); None: every key (a block kernel's case, where the cost is two
            reductions over q, k and v and no ``N_q x N_k`` tensor).
        key_bad: optional bool ``[B, H, N_k]``, the keys whose k or v is not finite, where the
            caller has it (windowed attention finds it once per call, not in every window).
        q_bad: optional bool ``[B, H, N_q]``, :func:`nonfinite_rows` of q, where the caller has it
            (the ring finds it once per call, not for every block).
    """
    if q_bad is None:
        q_bad = nonfinite_rows(q)
    if key_bad is None:
        key_bad = nonfinite_rows(k) | nonfinite_rows(v)  # [B, H, N_k]
    attend = allowed
    if bias is not None:
        key_bad = key_bad | (bias < float("inf")).logical_not()  # NaN or +inf (-inf excludes the key)
        kept = torch.isneginf(bias).logical_not()[:, :, None, :]  # [B, H|1, 1, N_k]
        attend = kept if attend is None else attend & kept
    if attend is None:
        reads = key_bad.any(dim=-1, keepdim=True)  # [B, H, 1]
        q_rows = q_bad if k.shape[2] else torch.zeros(q.shape[:3], dtype=torch.bool, device=q.device)
    else:
        reads = (attend & key_bad[:, :, None, :]).any(dim=-1)  # [B, H, N_q or 1]
        q_rows = q_bad & attend.any(dim=-1)
    return (q_rows | reads).expand(q.shape[:3])


def finite_or_zero(t: Tensor) -> Tensor:
    """``t`` with its NaN and infinite entries set to zero (an oracle's input, Note [non-finite
    inputs]); differentiable, with zero gradient at those entries."""
    return torch.where(torch.isfinite(t), t, torch.zeros((), dtype=t.dtype, device=t.device))


def key_bias_from_mask(
    q: Tensor, key_mask: Optional[Tensor], key_bias: Optional[Tensor]
) -> Optional[Tensor]:
    """Fold ``key_mask`` and ``key_bias`` into one additive score bias ``[B, H or 1, N_local]``.

    Args:
        q: ``[B, H, N_local, D]`` (for shapes, dtype and device).
        key_mask: optional bool ``[B, N_local]``, True = the key may be attended to.
        key_bias: optional float ``[B, N_local]`` or ``[B, H, N_local]``.

    Returns:
        None when both are None; otherwise the bias in the accumulation dtype, ``-inf`` at masked
        keys (differentiable w.r.t. ``key_bias``).
    """
    if key_mask is None and key_bias is None:
        return None
    batch, heads, n_local, _ = q.shape
    acc = acc_dtype(q.dtype)
    bias = None
    if key_bias is not None:
        if not isinstance(key_bias, Tensor) or not key_bias.is_floating_point():
            raise ValueError("key_bias must be a floating-point tensor [B, N_local] or [B, H, N_local]")
        if key_bias.device != q.device:
            raise ValueError(f"key_bias is on {key_bias.device} but q is on {q.device}")
        if tuple(key_bias.shape) == (batch, n_local):
            bias = key_bias[:, None, :].to(acc)
        elif tuple(key_bias.shape) == (batch, heads, n_local):
            bias = key_bias.to(acc)
        else:
            raise ValueError(
                f"key_bias must have shape [B, N_local] = {(batch, n_local)} or [B, H, N_local] = "
                f"{(batch, heads, n_local)}, got {tuple(key_bias.shape)}"
            )
    if key_mask is not None:
        if not isinstance(key_mask, Tensor) or key_mask.dtype != torch.bool:
            raise ValueError(f"key_mask must be a bool tensor, got {getattr(key_mask, 'dtype', type(key_mask))}")
        if tuple(key_mask.shape) != (batch, n_local):
            raise ValueError(
                f"key_mask must have shape [B, N_local] = {(batch, n_local)}, got {tuple(key_mask.shape)}"
            )
        if key_mask.device != q.device:
            raise ValueError(f"key_mask is on {key_mask.device} but q is on {q.device}")
        if bias is None:
            bias = torch.zeros((batch, 1, n_local), dtype=acc, device=q.device)
        bias = bias.masked_fill(~key_mask[:, None, :], float("-inf"))
    return bias.contiguous()


class MaskLayout(NamedTuple):
    """What a key mask's VALUES decide: ``kept`` (indices ``[M_r]`` of the keys unmasked in some
    batch element, None when every key is), ``n_kept`` (M_r), ``left`` (whether a kept key is
    masked in some batch element, so a bias is still needed after compaction) and ``any_masked``
    (whether any entry is False)."""

    kept: Optional[Tensor]
    n_kept: int
    left: bool
    any_masked: bool


_LAYOUTS: "collections.OrderedDict[int, tuple]" = collections.OrderedDict()
_MAX_LAYOUTS = 16


def mask_layout(key_mask: Tensor) -> MaskLayout:
    """:class:`MaskLayout` of a bool ``[B, N_r]`` mask, cached by the mask tensor's identity and
    version: a mask passed again unchanged (a land mask) is read once, not on every call (its
    values decide shapes, so reading them is a device-to-host transfer; Note [agreement off the
    device] in ``comm/agreement.py``). An in-place change bumps the version and is read again.

    A mask on the CPU is read on every call, never cached: reading it stops no device, and a write
    that bypasses the version counter (``mask.data[...] = ...``, the numpy array a mask was made
    from with ``torch.from_numpy``) would otherwise leave the old values' layout in use, a silent
    wrong result. On a device such a write is not seen: pass the new values as a new tensor."""
    if not _cached_by_version(key_mask):
        return _read_layout(key_mask)
    key = id(key_mask)
    hit = _LAYOUTS.get(key)
    if hit is not None and hit[0]() is key_mask and hit[1] == key_mask._version:
        _LAYOUTS.move_to_end(key)
        return hit[2]
    layout = _read_layout(key_mask)
    if len(_LAYOUTS) >= _MAX_LAYOUTS:
        _LAYOUTS.popitem(last=False)
    _LAYOUTS[key] = (weakref.ref(key_mask), key_mask._version, layout)
    return layout


def _cached_by_version(key_mask: Tensor) -> bool:
    """Whether :func:`mask_layout` caches ``key_mask``'s layout: only off the CPU, where reading it
    would stop the host until the device caught up."""
    return key_mask.device.type != "cpu"


def _read_layout(key_mask: Tensor) -> MaskLayout:
    """:class:`MaskLayout` of a bool ``[B, N_r]`` mask, read from its values."""
    any_batch = key_mask.any(dim=0)  # [N_r]
    if bool(any_batch.all()):
        left = not bool(key_mask.all())
        layout = MaskLayout(None, key_mask.shape[1], left, left)
    else:
        kept = any_batch.nonzero().squeeze(1)
        layout = MaskLayout(kept, int(kept.numel()), not bool(key_mask[:, kept].all()), True)
    return layout


def unmasked_keys(key_mask: Optional[Tensor]) -> Optional[Tensor]:
    """Indices ``[M_r]`` of the local keys unmasked in at least one batch element, or None when
    every key is (so nothing can be dropped); :func:`mask_layout`'s, cached.

    Note [masked key compaction]
        A key masked in EVERY batch element receives zero weight from every query, so it is
        removed before the ring starts: it is neither sent nor computed, and its gradient is zero
        (``index_select``'s backward scatters zeros there). Keys masked in only some batch elements
        stay, with ``-inf`` bias where masked. A rank whose keys are all masked sends nothing.
    """
    return None if key_mask is None else mask_layout(key_mask).kept
