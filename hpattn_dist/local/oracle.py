"""Dense single-device local attention: the float64 oracle of :mod:`hpattn_dist.local.attention`.

One ``[B, H, Nq, Nk]`` score matrix with the window mask, so O(Nq Nk) memory: for checking at small
nside, not for use. Legend: B batch, H heads, N pixels (NESTED; Nq queries and Nk keys when they
live on two grids), D head dim.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from hpattn_dist.healpix import npix2nside
from hpattn_dist.kernels import DropoutSpec, keep_mask
from hpattn_dist.local.windows import check_window, check_window_fits, window_cells
from hpattn_dist.masks import finite_or_zero, nonfinite_reads

__all__ = ["dense_local_attention", "window_mask"]


def window_mask(nside: int, window_nside: int, mode: str, device: torch.device | str = "cpu",
                key_nside: Optional[int] = None) -> Tensor:
    """Bool ``[Nq, Nk]``: ``[i, j]`` is True when key pixel ``j`` lies in query pixel ``i``'s window.

    Queries on the grid of ``nside``, keys on that of ``key_nside`` (default: the same grid); a
    pixel lies in cell ``pixel // c`` with its own grid's ``c``.
    """
    check_window(window_nside, mode)
    key_nside = nside if key_nside is None else key_nside
    c_q = check_window_fits(nside, window_nside)
    c_k = check_window_fits(key_nside, window_nside)
    cells = window_cells(window_nside, mode).to(device)  # [N_c, K]
    n_cells = cells.shape[0]
    cell_window = torch.zeros(n_cells, n_cells + 1, dtype=torch.bool, device=device)
    cell_window.scatter_(1, torch.where(cells >= 0, cells, n_cells), True)
    q_cell = torch.arange(12 * nside * nside, device=device) // c_q
    k_cell = torch.arange(12 * key_nside * key_nside, device=device) // c_k
    return cell_window[:, :n_cells][q_cell][:, k_cell]


def dense_local_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window_nside: int,
    mode: str,
    scale: Optional[float] = None,
    key_bias: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
) -> Tensor:
    """``softmax(q k^T * scale + key_bias, window-masked) v`` over a full field (or two).

    Args:
        q, k, v: ``[B, H, N, D]`` in NESTED order; for cross-attention q ``[B, H, Nq, D]`` on one
            grid and k, v ``[B, H, Nk, D]`` on another (the window grid divides both).
        window_nside, mode: the window (:mod:`hpattn_dist.local.windows`).
        scale: default ``D ** -0.5``.
        key_bias: optional ``[B, Hb, Nk]`` (``Hb`` 1 or H), ``-inf`` masks a key.
        dropout_p, dropout_seed: position-keyed dropout of the normalised weights.

    Returns:
        ``[B, H, N, D]`` in q's dtype; a query with no unmasked window key gets zeros, one that
        reads a NaN or an infinity NaN. Keys outside a query's window or masked reach no row,
        whatever they hold (Note [non-finite inputs] in ``hpattn_dist/masks.py``).
    """
    allowed = window_mask(npix2nside(q.shape[2]), window_nside, mode, q.device, npix2nside(k.shape[2]))
    # Note [non-finite inputs]: the rows reading a NaN or an infinity are NaN; the formula runs on
    # finite inputs (a row reading none of the zeroed entries is unchanged).
    nan_rows = nonfinite_reads(q, k, v, key_bias, allowed)  # [B, H, Nq]
    q, k, v = finite_or_zero(q), finite_or_zero(k), finite_or_zero(v)
    if key_bias is not None:
        allowed = allowed & ~torch.isneginf(key_bias)[:, :, None, :]  # [B, H|1, Nq, Nk]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-2, -1)) * scale  # [B, H, N, N]
    if key_bias is not None:
        s = s + torch.where(torch.isfinite(key_bias), key_bias, 0)[:, :, None, :].to(s.dtype)
    s = s.masked_fill(~allowed, float("-inf"))
    has_key = allowed.any(dim=-1, keepdim=True)  # by the keys allowed, not by the values
    w = torch.where(has_key, torch.softmax(torch.where(has_key, s, torch.zeros_like(s)), dim=-1),
                    torch.zeros_like(s))
    if dropout_p > 0:
        batch, heads, n_q, n_k = w.shape
        keep = keep_mask(DropoutSpec(dropout_p, dropout_seed), batch, heads, n_q, n_k, q.device)
        w = w * keep.to(w.dtype) / (1.0 - dropout_p)
    return torch.matmul(w, v).masked_fill(nan_rows[..., None], float("nan"))
