"""Key masks and key biases: the additive bias they fold into, and the keys a mask leaves.

Legend: B batch, H heads, N_r pixels (keys) on this rank, M_r keys left after compaction.

Note [non-finite inputs]
~~~~~~~~~~~~~~~~~~~~~~~~
Defined once, for every path (global, cross, windowed; ring, Ulysses, hybrid; the registered op
and the autograd executors) and every oracle (``oracle.py``, ``cross.py``, ``local/oracle.py``,
the tests' references): a query attends to its ALLOWED keys, those unmasked (``key_mask`` True,
``key_bias`` above ``-inf``) and, with a window, in its window. Its output is the explicit
softmax formula over exactly those keys, as PyTorch's SDPA computes it over the same keys:

* a NaN in the query, or in a key or value it attends to, makes its row NaN; an infinite score
  or value gives what the formula gives (NaN or +-inf);
* a key it does not attend to never reaches its row, whatever that key holds. A matmul would
  multiply the key's value by a zero weight (``0 * NaN = NaN``) and a bias would add ``-inf`` to
  its score (``NaN - inf = NaN``), so the kernels and oracles EXCLUDE such keys: their scores are
  set to ``-inf`` and their K/V rows to zero (:func:`zero_excluded_keys`); a window leaves them
  out altogether;
* a query with no allowed key gets zeros (Note [fully masked queries] in ``oracle.py``), whatever
  it holds;
* dropout drops normalised weights, so a dropped key it attends to still counts (its NaN value
  reaches the row through ``0 * NaN``, as in the formula).

Nothing is checked: non-finite inputs cost no pass over the data and no device read. Gradients
are the formula's where the output row is finite (keys a query does not attend to get none from
it); the gradients flowing from a non-finite row are not specified.
"""

from __future__ import annotations

import collections
import weakref
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from hpattn_dist.precision import acc_dtype

__all__ = ["MaskLayout", "key_bias_from_mask", "mask_layout", "unmasked_keys", "zero_excluded_keys"]


def zero_excluded_keys(t: Tensor, excluded: Optional[Tensor]) -> Tensor:
    """``t [B, H, N_k, D]`` with the rows of excluded keys (``excluded``: bool ``[B, H|1, N_k]``)
    set to zero, so that no zero weight multiplies a non-finite value (Note [non-finite inputs])."""
    return t if excluded is None else t.masked_fill(excluded[..., None], 0)


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
    device] in ``comm/agreement.py``). An in-place change bumps the version and is read again."""
    key = id(key_mask)
    hit = _LAYOUTS.get(key)
    if hit is not None and hit[0]() is key_mask and hit[1] == key_mask._version:
        _LAYOUTS.move_to_end(key)
        return hit[2]
    any_batch = key_mask.any(dim=0)  # [N_r]
    if bool(any_batch.all()):
        left = not bool(key_mask.all())
        layout = MaskLayout(None, key_mask.shape[1], left, left)
    else:
        kept = any_batch.nonzero().squeeze(1)
        layout = MaskLayout(kept, int(kept.numel()), not bool(key_mask[:, kept].all()), True)
    if len(_LAYOUTS) >= _MAX_LAYOUTS:
        _LAYOUTS.popitem(last=False)
    _LAYOUTS[key] = (weakref.ref(key_mask), key_mask._version, layout)
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
