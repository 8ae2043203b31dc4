"""idx-flow's index-gather layers, run on a shard: halo exchange, then the layer's own math.

Legend: B batch, N_in / N_out input / output pixels of a layer, N_r input pixels on rank r, O_r
output pixels on rank r (``shard_bounds(N_out, P)[r]``), R halo rows received, K connections per
output pixel, C channels.

A converted layer keeps its class's parameters, buffers and ``forward``; it only becomes an
instance of a subclass (``HaloSpatialConv`` for ``SpatialConv``, ...) whose ``forward``

1. agrees with its peers and plans the halo (:class:`~hpattn_dist.comm.halo.HaloExchanger`, one
   small metadata ``all_gather``; the plan is computed once per input split and cached),
2. fetches the R input rows its outputs read from other ranks (one ``all_to_all_single``):
   ``x_ext [B, N_r + R, C]``,
3. runs idx-flow's own ``forward`` on ``x_ext`` while the per-output-pixel state it reads is
   replaced by this rank's view (Note [local view]).

Note [local view]
~~~~~~~~~~~~~~~~~
idx-flow's gather layers read ``self.connection_indices [N_out, K]`` and ``self.output_points``,
and some read per-output-pixel buffers (``kernel_weights [N_out, K, 1]``,
``interpolation_weights [N_out, K, 1]``). During the sharded call these attributes are swapped
for the rank's view: the remapped table ``[O_r, K]`` (indices into ``x_ext``), ``O_r``, and the
buffers' rows ``[start_r, stop_r)``; they are restored afterwards, so ``state_dict`` and
parameter names never change. Running the library's own code this way keeps the arithmetic per
output pixel the same as on one device (up to the summation order inside ``einsum``).
``SpatialViT`` gets the same treatment for its pixel-indexed ``pos_embed [1, N_out, E]``: the
forward reads the slice ``pos_embed[:, start_r:stop_r]``, so its gradient is non-zero only on the
rank's rows, and the SUM of :func:`hpattn_dist.grad_sync.sync_gradients` assembles the full
gradient (a replicated parameter whose ranks touch disjoint rows).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import idx_flow
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from hpattn_dist.comm.groups import resolve_group
from hpattn_dist.comm.halo import HaloExchanger
from hpattn_dist.healpix import shard_bounds
from hpattn_dist.integrations.idx_flow.context import ShardContext
from hpattn_dist.integrations.idx_flow.reductions import shard_mlp_internals

__all__ = ["GATHER_CONVERTERS", "HaloGatherMixin", "check_convertible", "convert_gather_layer",
           "convert_vit"]


@contextlib.contextmanager
def _local_view(module: nn.Module, values: dict[str, Any]) -> Iterator[None]:
    """Temporarily replace buffers, parameters or plain attributes of ``module`` (Note [local view])."""
    saved = []
    try:
        for name, value in values.items():
            for store in (module._buffers, module._parameters, module.__dict__):
                if name in store:
                    saved.append((store, name, store[name]))
                    store[name] = value
                    break
            else:
                raise AttributeError(f"{type(module).__name__} has no attribute {name!r}")
        yield
    finally:
        for store, name, value in reversed(saved):
            store[name] = value


class HaloGatherMixin:
    """``forward`` of a converted index-gather layer: ``[B, N_r, C] -> [B, O_r, C_out]``.

    Class attribute ``_hp_per_output``: names of buffers indexed by output pixel along dim 0.
    """

    _hp_per_output: tuple[str, ...] = ()
    _hp_halo: HaloExchanger

    def forward(self, x: Tensor) -> Tensor:
        x_ext, plan = self._hp_halo(x, self.connection_indices, dim=1)
        start, stop = plan.out_bounds[plan.rank]
        view: dict[str, Any] = {"connection_indices": plan.local_table, "output_points": stop - start}
        for name in self._hp_per_output:
            value = getattr(self, name)
            if value is not None:
                view[name] = value[start:stop]
        with _local_view(self, view):
            return super().forward(x_ext)


class HaloSpatialConv(HaloGatherMixin, idx_flow.SpatialConv):
    """:class:`idx_flow.SpatialConv` on a shard (see :class:`HaloGatherMixin`)."""

    _hp_per_output = ("kernel_weights",)


class HaloSpatialTransposeConv(HaloGatherMixin, idx_flow.SpatialTransposeConv):
    """:class:`idx_flow.SpatialTransposeConv` on a shard (see :class:`HaloGatherMixin`)."""

    _hp_per_output = ("kernel_weights",)


class HaloSpatialUpsampling(HaloGatherMixin, idx_flow.SpatialUpsampling):
    """:class:`idx_flow.SpatialUpsampling` on a shard (see :class:`HaloGatherMixin`)."""

    _hp_per_output = ("interpolation_weights",)


class HaloSpatialPooling(HaloGatherMixin, idx_flow.SpatialPooling):
    """:class:`idx_flow.SpatialPooling` on a shard (see :class:`HaloGatherMixin`)."""


class HaloSpatialMLP(HaloGatherMixin, idx_flow.SpatialMLP):
    """:class:`idx_flow.SpatialMLP` on a shard (see :class:`HaloGatherMixin`)."""


class HaloSpatialPatchEmbedding(HaloGatherMixin, idx_flow.SpatialPatchEmbedding):
    """:class:`idx_flow.SpatialPatchEmbedding` on a shard (see :class:`HaloGatherMixin`)."""


class HaloSpatialViT(idx_flow.SpatialViT):
    """:class:`idx_flow.SpatialViT` on a shard: ``pos_embed`` read on this rank's output rows.

    Its children (``patch_embed``, the attention of each block) are converted separately.
    """

    _hp_group: Optional[dist.ProcessGroup] = None

    def forward(self, x: Tensor) -> Tensor:
        info = resolve_group(self._hp_group)  # the group now (Note [groups resolved per call])
        start, stop = shard_bounds(int(self.pos_embed.shape[1]), info.world_size)[info.rank]
        with _local_view(self, {"pos_embed": self.pos_embed[:, start:stop]}):
            return super().forward(x)


_SHARDED: dict[type, type] = {
    idx_flow.SpatialConv: HaloSpatialConv,
    idx_flow.SpatialTransposeConv: HaloSpatialTransposeConv,
    idx_flow.SpatialUpsampling: HaloSpatialUpsampling,
    idx_flow.SpatialPooling: HaloSpatialPooling,
    idx_flow.SpatialMLP: HaloSpatialMLP,
    idx_flow.SpatialPatchEmbedding: HaloSpatialPatchEmbedding,
}


def check_convertible(module: nn.Module, name: str) -> None:
    """Refuse an idx-flow layer that cannot run sharded exactly (before anything is converted).

    idx-flow creates the parameters of ``SpatialConv``, ``SpatialMLP``, ``GlobalMLP``, ... on the
    first forward (float32, randomly initialised); created after the conversion, they would be
    drawn independently on each rank.

    Raises:
        ValueError: ``module._initialized`` is False.
    """
    if getattr(module, "_initialized", True) is False:
        raise ValueError(
            f"{type(module).__name__} {name or '(root)'!r} has not created its parameters yet "
            "(idx-flow creates them on the first forward): run one forward of the unconverted model on a full-size "
            "input (with the same seed on every rank, or load the same checkpoint afterwards), "
            "then convert_model"
        )


def convert_gather_layer(module: nn.Module, ctx: ShardContext) -> nn.Module:
    """Make an idx-flow index-gather layer run on a shard, in place (its class becomes ``Halo*``).

    A ``SpatialMLP``'s batch norms and dropouts (over its ``[B * O_r, C]`` rows) become sharded
    too (:func:`~hpattn_dist.integrations.idx_flow.reductions.shard_mlp_internals`).

    Raises:
        ValueError: see :func:`check_convertible`.
    """
    check_convertible(module, ctx.name)
    if type(module) is idx_flow.SpatialMLP:
        shard_mlp_internals(module, ctx)
    what = f"{type(module).__name__} {ctx.name or '(root)'!r}"
    module.__class__ = _SHARDED[type(module)]
    module._hp_halo = HaloExchanger(ctx.process_group, what)
    return module


def convert_vit(module: nn.Module, ctx: ShardContext) -> nn.Module:
    """Make ``SpatialViT`` read its ``pos_embed`` on this rank's output range, in place.

    Its children are converted by the caller (:func:`~hpattn_dist.integrations.idx_flow.convert_model`).
    """
    module.__class__ = HaloSpatialViT
    module._hp_group = ctx.process_group
    return module


GATHER_CONVERTERS = {cls: convert_gather_layer for cls in _SHARDED}
"""idx-flow type -> converter, for the index-gather layers."""
