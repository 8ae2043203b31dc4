"""The single-device ``SpatialSelfAttention`` layer: the correctness oracle.

This is the layer users already have (its contract is the seed layer in ``shared/seed``): same
constructor, attribute and parameter names, q/k/v packing order and backends. Every distributed
strategy in :mod:`hpattn_dist` is checked against it, usually with ``attn_backend="manual"`` in
float64 on the full field.

Legend used in shape comments: B batch, N pixels, E embed dim, H heads, D head dim (E / H).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from hpattn_dist.masks import finite_or_zero, nonfinite_reads
from hpattn_dist.validation import check_layer_input

AttnBackend = Literal["auto", "sdpa", "manual"]
ATTN_BACKENDS: tuple[str, ...] = ("auto", "sdpa", "manual")

_SDPA_AVAILABLE = hasattr(F, "scaled_dot_product_attention")


def check_layer_args(embed_dim: int, num_heads: int, dropout: float, attn_backend: str) -> None:
    """Validate the constructor arguments shared by the oracle and the distributed layer.

    Raises:
        ValueError: ``embed_dim`` not divisible by ``num_heads``, non-positive sizes, ``dropout``
            outside ``[0, 1)`` or an unknown ``attn_backend``.
        RuntimeError: ``attn_backend="sdpa"`` on a PyTorch without SDPA.
    """
    if embed_dim <= 0 or num_heads <= 0:
        raise ValueError(
            f"embed_dim ({embed_dim}) and num_heads ({num_heads}) must be positive integers"
        )
    if embed_dim % num_heads != 0:
        raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if attn_backend not in ATTN_BACKENDS:
        raise ValueError(
            f"attn_backend must be one of {ATTN_BACKENDS}, got {attn_backend!r}"
        )
    if attn_backend == "sdpa" and not _SDPA_AVAILABLE:
        raise RuntimeError(
            "attn_backend='sdpa' requires PyTorch >= 2.0. "
            f"Current version: {torch.__version__}"
        )


class MultiHeadBase(nn.Module):
    """What the single-device attention layers share: the checked head split (``head_dim = E / H``,
    ``scale = head_dim ** -0.5``), the backend name and the dropout of the normalised weights."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float, attn_backend: str) -> None:
        super().__init__()
        check_layer_args(embed_dim, num_heads, dropout, attn_backend)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_backend = attn_backend
        self.dropout = nn.Dropout(dropout)
        self._dropout_p = dropout

    @property
    def dropout_p(self) -> float:
        """Dropout probability on the attention weights (applied in training mode only)."""
        return self._dropout_p


class SpatialSelfAttention(MultiHeadBase):
    """Multi-head self-attention over the pixels of a HEALPix field (single device).

    Every pixel attends to every other pixel: ``softmax(Q K^T / sqrt(D)) V`` per head, with a fused
    ``qkv_proj = Linear(E, 3E)`` and ``out_proj = Linear(E, E)``.

    Args:
        embed_dim: total model dimension ``E`` (divisible by ``num_heads``).
        num_heads: number of heads ``H``.
        dropout: dropout probability on the attention weights (training mode only). The softmax is
            normalised first, then dropped. Default: 0.0.
        bias: whether the projections have a bias. Default: True.
        attn_backend: ``"auto"`` (SDPA when available), ``"sdpa"`` or ``"manual"`` (explicit
            matmul-softmax-matmul, always available). Default: ``"auto"``. The distributed layer
            gives the same names the same meaning, per block, and takes ``"flash_attn"`` too
            (README, API reference, "Backend names").

    Shape:
        - Input ``x``: ``[B, N, E]``; optional ``key_mask``: bool ``[B, N]`` (True = attend).
        - Output: ``[B, N, E]``.

    A query whose keys are all masked gets a zero attention output (then ``out_proj``), never NaN;
    a query that reads a NaN or an infinity (its own, or an unmasked key's) a NaN one (Note
    [non-finite inputs] in ``masks.py``).

    Example:
        >>> attn = SpatialSelfAttention(embed_dim=64, num_heads=8)
        >>> x = torch.randn(4, 768, 64)
        >>> y = attn(x)
        >>> print(y.shape)
        torch.Size([4, 768, 64])
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        attn_backend: AttnBackend = "auto",
    ) -> None:
        super().__init__(embed_dim, num_heads, dropout, attn_backend)
        self.qkv_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def _use_sdpa(self) -> bool:
        if self.attn_backend == "manual":
            return False
        if self.attn_backend == "sdpa":
            return True
        return _SDPA_AVAILABLE

    def forward(self, x: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
        """Attend every pixel to every (unmasked) pixel.

        Args:
            x: ``[B, N, E]``.
            key_mask: optional bool ``[B, N]``; True marks keys that may be attended to.

        Returns:
            ``[B, N, E]``.
        """
        check_layer_input(x, self.embed_dim, key_mask, pixels="N")
        batch_size, num_points, _ = x.shape
        has_key = None
        qkv = self.qkv_proj(x)  # [B, N, 3E]
        qkv = qkv.reshape(batch_size, num_points, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, N, D]
        # Note [non-finite inputs] in masks.py: the rows reading a NaN or an infinity are NaN; the
        # formula runs on finite inputs (a row reading none of the zeroed entries is unchanged).
        nan_rows = nonfinite_reads(q, k, v, allowed=None if key_mask is None else key_mask[:, None, None, :])
        q, k, v = finite_or_zero(q), finite_or_zero(k), finite_or_zero(v)
        if key_mask is not None:
            # Note [fully masked queries]: softmax over no keys is 0/0 (SDPA and softmax give NaN,
            # whose backward poisons every gradient). We define the attention output of such a
            # query as zero: attend without the mask, then zero the result, so no NaN is created.
            has_key = key_mask.any(dim=-1)  # [B]
            key_mask = key_mask | ~has_key[:, None]

        if self._use_sdpa():
            dropout_p = self._dropout_p if self.training else 0.0
            attn_mask = None if key_mask is None else key_mask[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale  # [B, H, N, N]
            if key_mask is not None:
                attn = attn.masked_fill(~key_mask[:, None, None, :], float("-inf"))
            attn = F.softmax(attn, dim=-1)
            attn = self.dropout(attn)
            out = attn @ v  # [B, H, N, D]
        if has_key is not None:
            out = torch.where(has_key[:, None, None, None], out, torch.zeros_like(out))
        out = out.masked_fill(nan_rows[..., None], float("nan"))

        out = out.transpose(1, 2).reshape(batch_size, num_points, self.embed_dim)
        return self.out_proj(out)
