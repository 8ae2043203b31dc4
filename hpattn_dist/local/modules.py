"""Local-attention layers with the parameters and ``state_dict`` of ``SpatialSelfAttention``.

:class:`LocalSpatialSelfAttention` is the single-device oracle (dense window-masked attention,
O(N^2) memory); :class:`DistributedLocalSpatialSelfAttention` computes the same function on a field
sharded over a process group (one process too) with :func:`healpix_local_attention`. Both
subclass :class:`~hpattn_dist.oracle.SpatialSelfAttention`, so ``qkv_proj`` / ``out_proj`` and
checkpoints carry over between the global and local layers of either kind.

Legend: B batch, N pixels, N_r pixels on rank r, E embed dim, H heads, D head dim.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from hpattn_dist.comm.agreement import fail_together
from hpattn_dist.comm.binding import GroupBound
from hpattn_dist.comm.groups import resolve_group
from hpattn_dist.kernels import resolve_dropout_seed
from hpattn_dist.local.attention import healpix_local_attention
from hpattn_dist.local.oracle import dense_local_attention
from hpattn_dist.local.windows import check_window
from hpattn_dist.oracle import AttnBackend, SpatialSelfAttention
from hpattn_dist.masks import key_bias_from_mask
from hpattn_dist.replicas import LayerRef, layer_label
from hpattn_dist.validation import check_layer_input

__all__ = ["DistributedLocalSpatialSelfAttention", "LocalSpatialSelfAttention", "to_distributed_local"]


class LocalSpatialSelfAttention(SpatialSelfAttention):
    """Multi-head attention within HEALPix windows on one device: the oracle (dense).

    Args:
        embed_dim, num_heads, dropout, bias, attn_backend: as for ``SpatialSelfAttention``
            (``attn_backend`` is kept for the state and the distributed layer; the oracle always
            computes the dense masked softmax in the input's dtype).
        window_nside: resolution of the window grid (power of two dividing the field's nside).
        mode: ``"cell"`` or ``"neighbourhood"`` (:mod:`hpattn_dist.local.windows`).

    Shape:
        ``x``: ``[B, N, E]`` in NESTED order; optional bool ``key_mask [B, N]``; output ``[B, N, E]``.

    Dropout is keyed by global (query, key) pixels with a seed drawn from the default generator
    (Note [position-keyed dropout]), so the distributed layer seeded alike drops the same weights.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 attn_backend: AttnBackend = "auto", *, window_nside: int,
                 mode: str = "neighbourhood") -> None:
        check_window(window_nside, mode)
        super().__init__(embed_dim, num_heads, dropout, bias, attn_backend)
        self.window_nside, self.mode = int(window_nside), mode

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self._dropout_p}, "
                f"window_nside={self.window_nside}, mode={self.mode!r}")

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, _ = x.shape
        qkv = self.qkv_proj(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        # 3 x [B, H, N, D], each contiguous: local attention reads whole cells of q, k, v in place
        # (Note [local attention plan]); the projection's [B, N, 3E] output is not kept.
        return tuple(qkv.permute(2, 0, 3, 1, 4).contiguous().unbind(0))

    def _project_out(self, out: Tensor) -> Tensor:
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.embed_dim))

    def forward(self, x: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
        check_layer_input(x, self.embed_dim, key_mask, pixels="N")
        q, k, v = self._qkv(x)
        dropout_p = self._dropout_p if self.training else 0.0
        out = dense_local_attention(
            q, k, v, window_nside=self.window_nside, mode=self.mode, scale=self.scale,
            key_bias=key_bias_from_mask(q, key_mask, None), dropout_p=dropout_p,
            dropout_seed=resolve_dropout_seed(dropout_p, None),
        )
        return self._project_out(out.to(x.dtype))


class DistributedLocalSpatialSelfAttention(GroupBound, LocalSpatialSelfAttention):
    """:class:`LocalSpatialSelfAttention` on a field whose NESTED pixels are sharded over a group.

    Same arguments, parameters and ``state_dict`` as the oracle, plus ``process_group`` and
    ``name`` (the layer in errors, e.g. its path in the model). Called on
    every rank with that rank's contiguous range ``[B, N_r, E]`` (any split), it returns that
    rank's rows of the oracle's output; each rank receives only the window pixels other ranks own
    (Note [local attention plan]). Runs in a single process too (``process_group=None`` without
    ``torch.distributed``), where it is the fast path of the oracle. Parameters are replicated:
    reduce their gradients with :func:`hpattn_dist.grad_sync.sync_gradients`; every call checks
    that they are equal on every rank (Note [replicated parameter check]). Deepcopy shares the
    group, pickling drops it (Note [copying a layer bound to a group]).

    Raises:
        ValueError: bad constructor arguments; in forward (on every rank) a misfit input or mask,
            shards that add up to no HEALPix field, a field whose nside ``window_nside`` does
            not divide, ranks that disagree (parameters included).
    """

    # Settings a converted model's call agrees on (Note [one agreement per model call]).
    _hp_call_config = ("embed_dim", "num_heads", "head_dim", "scale", "dropout_p", "attn_backend",
                       "window_nside", "mode", "name")
    _hp_drop_attr = "dropout_p"

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 attn_backend: AttnBackend = "auto", *, window_nside: int,
                 mode: str = "neighbourhood",
                 process_group: Optional[dist.ProcessGroup] = None, name: str = "") -> None:
        super().__init__(embed_dim, num_heads, dropout, bias, attn_backend,
                         window_nside=window_nside, mode=mode)
        self.process_group = process_group
        self.name = name

    def _ref(self) -> LayerRef:
        """What the call reads its facts from inside its agreement (Note [replicated parameter check])."""
        return LayerRef(layer_label(self), tuple(self.parameters()), healpix_field=True, point_sets=False)

    def forward(self, x: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
        # The peers are about to enter the call's agreement: fail there together.
        ref = self._ref()
        with fail_together(resolve_group(self.process_group), ref.name):
            check_layer_input(x, self.embed_dim, key_mask, weight=getattr(self.qkv_proj, "weight", None))
            q, k, v = self._qkv(x)
        out = healpix_local_attention(
            q, k, v, self.process_group, window_nside=self.window_nside, mode=self.mode,
            backend=self.attn_backend, dropout_p=self._dropout_p if self.training else 0.0,
            scale=self.scale, key_mask=key_mask, layer=ref,
        )
        return self._project_out(out)


def to_distributed_local(layer: LocalSpatialSelfAttention, process_group: Optional[dist.ProcessGroup],
                         attn_backend: Optional[str] = None,
                         name: str = "") -> DistributedLocalSpatialSelfAttention:
    """``layer`` as a :class:`DistributedLocalSpatialSelfAttention` over ``process_group``, keeping
    its ``qkv_proj`` / ``out_proj`` / ``dropout`` submodules (the same ``Parameter`` objects) and
    training mode; a distributed layer is returned unchanged. Used by
    :func:`hpattn_dist.modules.convert_spatial_attention`.
    """
    if isinstance(layer, DistributedLocalSpatialSelfAttention):
        return layer
    with torch.device("meta"):  # no allocation, no RNG draw: the projections are replaced below
        new = DistributedLocalSpatialSelfAttention(
            layer.embed_dim, layer.num_heads, layer._dropout_p, layer.qkv_proj.bias is not None,
            attn_backend or layer.attn_backend, window_nside=layer.window_nside, mode=layer.mode,
            process_group=process_group, name=name or type(layer).__name__)
    new.qkv_proj, new.out_proj, new.dropout = layer.qkv_proj, layer.out_proj, layer.dropout
    new.train(layer.training)
    return new
