"""Cross-grid attention layers: queries on a target grid, keys and values on a source grid.

:class:`SpatialCrossAttention` is the single-device oracle, in the style of the seed layer
(``shared/seed``): a query projection on the target grid, ONE fused key/value projection on the
source grid (``kv_proj = Linear(kv_dim, 2E)``, split like the seed's ``qkv_proj`` by
``reshape(B, N, 2, H, D)``), heads of ``D = E / H``, scale ``D ** -0.5``, dropout on the normalised
weights, backends ``auto | sdpa | manual``, and an output projection.
:class:`DistributedSpatialCrossAttention` has the same parameters and ``state_dict``; each rank
passes its own contiguous range of the target grid AND its own contiguous range of the source
grid (the two are sharded independently, any sizes per rank), and gets the oracle's output for
its target pixels. Encoders (fine data grid -> coarse latent grid) and decoders (back) are both
this layer.

With ``window_nside`` both layers are the locality option for mappers: the two grids are NESTED
HEALPix grids and a target pixel attends only to the source pixels whose cell of the
``window_nside`` grid lies in its own cell's window (``mode="cell"``: its parent cell;
``"neighbourhood"``: that cell and its neighbours). The oracle masks a dense score matrix
(:func:`~hpattn_dist.local.oracle.dense_local_attention`); the distributed layer moves only the
source rows some local target pixel can see (Note [local attention plan] in
:mod:`hpattn_dist.local.attention`).

Legend: B batch, Nq target pixels (queries), Nk source pixels (keys), Nq_r / Nk_r those on group
rank r, E embed dim, E_kv source feature dim (``kv_dim``), H heads, D head dim (E / H).
"""

from __future__ import annotations

from typing import Optional, Unpack

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from hpattn_dist.attention_spec import AttentionSpec
from hpattn_dist.comm.agreement import fail_together
from hpattn_dist.comm.groups import resolve_group
from hpattn_dist.distributed_layer import DistributedAttentionLayer, LayerOptions
from hpattn_dist.kernels import resolve_dropout_seed
from hpattn_dist.local.oracle import dense_local_attention
from hpattn_dist.local.windows import check_window
from hpattn_dist.masks import finite_or_zero, key_bias_from_mask, nonfinite_reads
from hpattn_dist.oracle import AttnBackend, MultiHeadBase
from hpattn_dist.replicas import LayerRef, layer_label
from hpattn_dist.strategies.api import attend
from hpattn_dist.validation import check_layer_input

__all__ = ["DistributedSpatialCrossAttention", "SpatialCrossAttention"]

_SDPA_AVAILABLE = hasattr(F, "scaled_dot_product_attention")


class SpatialCrossAttention(MultiHeadBase):
    """Multi-head cross-attention from the pixels of one grid to those of another (single device).

    Every target pixel attends to every source pixel: ``softmax(Q K^T / sqrt(D) + bias) V`` per
    head, with ``Q = q_proj(x_q)``, ``[K, V] = kv_proj(x_kv)``, then ``out_proj``.

    Args:
        embed_dim: model dimension ``E`` of the target grid's features and of the output
            (divisible by ``num_heads``).
        num_heads: number of heads ``H``.
        kv_dim: feature dimension of the source grid (default: ``embed_dim``).
        dropout: dropout probability on the attention weights (training mode only), applied after
            the softmax normalisation. Default: 0.0.
        bias: whether the projections have a bias. Default: True.
        attn_backend: ``"auto"`` (SDPA when available), ``"sdpa"`` or ``"manual"``.
        window_nside: None (every target pixel sees every source pixel), or the resolution of the
            window grid (a power of two dividing both grids' nsides): then the oracle computes the
            dense window-masked softmax in the input's dtype, with dropout keyed by (target pixel,
            source pixel) as the distributed layer does (Note [position-keyed dropout]).
        mode: the window, ``"cell"`` or ``"neighbourhood"`` (:mod:`hpattn_dist.local.windows`).

    Shape:
        - ``x_q``: ``[B, Nq, E]``; ``x_kv``: ``[B, Nk, E_kv]``.
        - Optional ``key_mask``: bool ``[B, Nk]`` (True = attend); optional ``key_bias``: float
          ``[B, Nk]`` or ``[B, H, Nk]`` added to every score of that key (e.g. the log of each
          source pixel's area, a quadrature weight).
        - Output: ``[B, Nq, E]``.

    A query whose keys are all masked gets a zero attention output (then ``out_proj``), never NaN.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        kv_dim: Optional[int] = None,
        dropout: float = 0.0,
        bias: bool = True,
        attn_backend: AttnBackend = "auto",
        *,
        window_nside: Optional[int] = None,
        mode: str = "neighbourhood",
    ) -> None:
        super().__init__(embed_dim, num_heads, dropout, attn_backend)
        if window_nside is not None:
            window_nside = check_window(window_nside, mode)
        self.window_nside, self.mode = window_nside, mode
        kv_dim = embed_dim if kv_dim is None else kv_dim
        if isinstance(kv_dim, bool) or not isinstance(kv_dim, int) or kv_dim <= 0:
            raise ValueError(f"kv_dim must be None or a positive int, got {kv_dim!r}")
        self.kv_dim = kv_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.kv_proj = nn.Linear(kv_dim, 2 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kv_dim={self.kv_dim}, "
                f"dropout={self.dropout_p}, attn_backend={self.attn_backend!r}" + (
                    "" if self.window_nside is None else f", window_nside={self.window_nside}, mode={self.mode!r}"))

    def _project(self, x_q: Tensor, x_kv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``q [B, H, Nq, D]`` and ``k, v [B, H, Nk, D]`` (views, as the seed splits heads)."""
        batch, n_q, _ = x_q.shape
        n_k = x_kv.shape[1]
        q = self.q_proj(x_q).reshape(batch, n_q, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv_proj(x_kv).reshape(batch, n_k, 2, self.num_heads, self.head_dim)
        k, v = (t.transpose(1, 2) for t in kv.unbind(2))
        return q, k, v

    def forward(self, x_q: Tensor, x_kv: Tensor, key_mask: Optional[Tensor] = None,
                key_bias: Optional[Tensor] = None) -> Tensor:
        """Attend every target pixel to every (unmasked) source pixel.

        Args:
            x_q: ``[B, Nq, E]`` target-grid features; x_kv: ``[B, Nk, E_kv]`` source-grid features.
            key_mask: optional bool ``[B, Nk]``; key_bias: optional float ``[B, Nk]`` or ``[B, H, Nk]``.

        Returns:
            ``[B, Nq, E]``.
        """
        check_layer_input(x_q, self.embed_dim, pixels="Nq", name="x_q")
        check_layer_input(x_kv, self.kv_dim, key_mask, pixels="Nk", name="x_kv", dim_name="kv_dim")
        if x_q.shape[0] != x_kv.shape[0]:
            raise ValueError(f"x_q and x_kv must have the same batch size, got {x_q.shape[0]} and {x_kv.shape[0]}")
        batch, n_q, _ = x_q.shape
        q, k, v = self._project(x_q, x_kv)
        n_k = k.shape[2]
        if self.window_nside is not None:
            dropout_p = self._dropout_p if self.training else 0.0
            out = dense_local_attention(
                q, k, v, window_nside=self.window_nside, mode=self.mode, scale=self.scale,
                key_bias=key_bias_from_mask(k, key_mask, key_bias), dropout_p=dropout_p,
                dropout_seed=resolve_dropout_seed(dropout_p, None),
            ).to(x_q.dtype)  # [B, H, Nq, D]
            return self.out_proj(out.transpose(1, 2).reshape(batch, n_q, self.embed_dim))
        bias = None  # [B, H|1, Nk]
        if key_bias is not None:
            if tuple(key_bias.shape) == (batch, n_k):
                bias = key_bias[:, None, :]
            elif tuple(key_bias.shape) == (batch, self.num_heads, n_k):
                bias = key_bias
            else:
                raise ValueError(f"key_bias must have shape [B, Nk] = {(batch, n_k)} or [B, H, Nk] = "
                                 f"{(batch, self.num_heads, n_k)}, got {tuple(key_bias.shape)}")
            bias = bias.to(q.dtype)
        # Note [non-finite inputs] in masks.py: the rows reading a NaN or an infinity are NaN; the
        # formula runs on finite inputs (a row reading none of the zeroed entries is unchanged).
        nan_rows = nonfinite_reads(q, k, v, bias, None if key_mask is None else key_mask[:, None, None, :])
        q, k, v = finite_or_zero(q), finite_or_zero(k), finite_or_zero(v)
        scores_bias, has_key = None, None  # [B, H|1, 1, Nk], [B, H|1]
        if key_mask is not None or bias is not None:
            # Note [fully masked queries] in oracle.py: a row with no allowed key is zero,
            # computed over every key (no NaN created) and then replaced.
            excluded = torch.zeros((batch, 1, n_k), dtype=torch.bool, device=q.device)
            if bias is not None:
                excluded = excluded | torch.isneginf(bias)
            if key_mask is not None:
                excluded = excluded | ~key_mask[:, None, :]
            has_key = (~excluded).any(dim=-1)  # [B, H|1]
            excluded = excluded & has_key[..., None]
            finite = torch.zeros_like(excluded, dtype=q.dtype) if bias is None else \
                torch.where(has_key[..., None] & (bias < float("inf")), bias, torch.zeros_like(bias))
            scores_bias = finite.masked_fill(excluded, float("-inf"))[:, :, None, :]

        if self.attn_backend != "manual" and _SDPA_AVAILABLE:
            dropout_p = self._dropout_p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=scores_bias, dropout_p=dropout_p)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale  # [B, H, Nq, Nk]
            if scores_bias is not None:
                attn = attn + scores_bias
            attn = F.softmax(attn, dim=-1)
            attn = self.dropout(attn)
            out = attn @ v  # [B, H, Nq, D]
        if has_key is not None:  # zeros, also where the attention over every key gave NaN
            out = torch.where(has_key[:, :, None, None], out, torch.zeros_like(out))
        out = out.masked_fill(nan_rows[..., None], float("nan"))
        out = out.transpose(1, 2).reshape(batch, n_q, self.embed_dim)
        return self.out_proj(out)


class DistributedSpatialCrossAttention(DistributedAttentionLayer, SpatialCrossAttention):
    """:class:`SpatialCrossAttention` with both grids' pixels sharded across a process group.

    Same constructor arguments, parameters (``q_proj``, ``kv_proj``, ``out_proj``) and
    ``state_dict`` as the oracle (it subclasses it). Called on every rank of ``process_group``
    with that rank's shard of the target grid and its shard of the source grid (independent
    splits: ``Nq_r`` and ``Nk_r`` may differ between ranks and from each other, zero included),
    it returns that rank's shard of the oracle's output. One agreement per call (Note [cross-grid
    plan] in :mod:`hpattn_dist.strategies.plan`); the keys travel, the queries stay.

    Args:
        embed_dim, num_heads, kv_dim, dropout, bias: as for the oracle. With
            ``dropout > 0`` the mask is keyed by (global target pixel, global source pixel), so
            seed every rank identically (``torch.manual_seed``).
        attn_backend: ``"auto" | "sdpa" | "manual" | "flash_attn"``, the block kernel (README,
            API reference, "Backend names").
        process_group: the group sharding both grids (None: the default group).
        strategy: ``"ring" | "ulysses" | "hybrid" | "auto"`` (:data:`hpattn_dist.strategies.STRATEGIES`);
            with ``window_nside`` only ``"ring"`` or ``"auto"`` (the halo exchange).
        ulysses_degree: for ``strategy="hybrid"`` only (a divisor of P and H).
        healpix_field: both grids' shards must add up to HEALPix fields (checked in the one
            agreement); False accepts any point sets. Default: True.
        name: names the layer in errors.
        window_nside, mode: the locality option, as for the oracle: the source rows travel by one
            halo exchange of the rows some local target pixel can see (both grids NESTED HEALPix
            fields, checked on every rank in the one agreement).

    Shape:
        - ``x_q_local``: ``[B, Nq_r, E]``; ``x_kv_local``: ``[B, Nk_r, E_kv]``; ``key_mask``:
          bool ``[B, Nk_r]``; ``key_bias``: ``[B, Nk_r]`` or ``[B, H, Nk_r]``.
        - Output: ``[B, Nq_r, E]``.

    Parameters are replicated over ``process_group`` and checked on every forward (Note
    [replicated parameter check]); reduce their gradients with
    :func:`hpattn_dist.grad_sync.sync_gradients` (Note [replicated parameters] in ``modules.py``).
    Deepcopy shares the group, pickling drops it (Note [copying a layer bound to a group]).

    Example::

        >>> enc = DistributedSpatialCrossAttention(128, 8, kv_dim=16)   # nside 64 -> 16
        >>> z_local = enc(latent_queries_local, data_local)             # [B, Nq_r, 128]
        >>> local_enc = DistributedSpatialCrossAttention(128, 8, kv_dim=16, window_nside=8)
        >>> z_local = local_enc(latent_queries_local, data_local)       # parent cell + neighbours
    """

    # Note [attention plans in a model call] in strategies/plan.py.
    _hp_call_config = ("embed_dim", "num_heads", "kv_dim", "head_dim", "scale", "dropout_p", "attn_backend",
                       "strategy", "ulysses_degree", "healpix_field", "window_nside", "mode", "name")

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        kv_dim: Optional[int] = None,
        dropout: float = 0.0,
        bias: bool = True,
        attn_backend: str = "auto",
        *,
        window_nside: Optional[int] = None,
        mode: str = "neighbourhood",
        **options: Unpack[LayerOptions],
    ) -> None:
        options = self._checked_options(attn_backend, options, cross=True, window_nside=window_nside, mode=mode)
        super().__init__(embed_dim, num_heads, kv_dim, dropout, bias, self.oracle_backend(attn_backend),
                         window_nside=window_nside, mode=mode)
        self._keep_options(attn_backend, options)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", strategy={self.strategy!r}" + (
            "" if self.healpix_field else ", healpix_field=False")

    def _ref(self) -> LayerRef:
        """What the call takes its facts from, inside its agreement (as
        :meth:`DistributedSpatialSelfAttention._ref <hpattn_dist.modules.DistributedSpatialSelfAttention>`)."""
        return LayerRef(layer_label(self), tuple(self.parameters()), self.healpix_field,
                        point_sets=self.window_nside is None)

    def forward(self, x_q_local: Tensor, x_kv_local: Tensor, key_mask: Optional[Tensor] = None,
                key_bias: Optional[Tensor] = None) -> Tensor:
        """Attend this rank's target pixels to the (unmasked) source pixels of every rank.

        Args:
            x_q_local: ``[B, Nq_r, E]``; x_kv_local: ``[B, Nk_r, E_kv]``.
            key_mask: optional bool ``[B, Nk_r]``; key_bias: optional ``[B, Nk_r]`` or ``[B, H, Nk_r]``.

        Returns:
            ``[B, Nq_r, E]``.
        """
        with fail_together(resolve_group(self.process_group), layer_label(self)):  # as the self layer's
            check_layer_input(x_q_local, self.embed_dim, pixels="Nq_r", name="x_q_local",
                              weight=getattr(self.q_proj, "weight", None))
            check_layer_input(x_kv_local, self.kv_dim, key_mask, pixels="Nk_r", name="x_kv_local",
                              dim_name="kv_dim", weight=getattr(self.kv_proj, "weight", None))
            batch, n_q, _ = x_q_local.shape
            q_local, k_local, v_local = self._project(x_q_local, x_kv_local)
        spec = AttentionSpec(self.strategy, self.attn_backend, self.dropout_p if self.training else 0.0, self.scale,
                             ulysses_degree=self.ulysses_degree, cross=True, window_nside=self.window_nside,
                             mode=self.mode)
        out_local = attend(spec, q_local, k_local, v_local, self.process_group, key_mask=key_mask,
                           key_bias=key_bias, layer=self._ref())  # [B, H, Nq_r, D]
        return self.out_proj(out_local.transpose(1, 2).reshape(batch, n_q, self.embed_dim))
