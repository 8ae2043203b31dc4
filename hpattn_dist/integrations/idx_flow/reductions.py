"""idx-flow layers whose result depends on ALL pixels: statistics reduced over the group.

On a sharded field (Note in :mod:`hpattn_dist.integrations.idx_flow.context`: rank r holds the
pixels ``shard_bounds(N, P)[r]`` of ``[B, N, C]``) these layers cannot run rank-locally: their
statistics, pooled vectors or dropout masks span every pixel. Each is replaced by a module that
computes exactly the single-device function on the shards:

=======================  ==========================================  ==========================
idx-flow layer           sharded version                             communication per call
=======================  ==========================================  ==========================
``SpatialBatchNorm``     mean / biased var over (B, N) per channel   training (or no running
                         summed over ranks (two passes); running     stats): signature + 2
                         stats updated with the GLOBAL count         all-reduces of ``[C]``,
                         (unbiased var ``n / (n - 1)``), momentum    same backward; eval with
                         or cumulative average as torch does         running stats: signature
``SpatialInstanceNorm``  per (b, c) over N, likewise                 ``[B, C]`` buffers
``SpatialGroupNorm``     per (b, g) over N and the group's channels  ``[B, G]`` buffers
``Squeeze``              mean / sum: local sum, all-reduce; max:     signature + 1 (2 for max)
                         the first maximum in global pixel order     all-reduce of ``[B, C]``
                         (as ``torch.max``) gets the gradient        (max: ``[P, B, C]``)
``Unsqueeze``            this rank's range of ``num_points``         none
``ChannelDropout``       mask keyed by (seed, b, c), same on every   one signature all_gather
                         rank (Note [pixel dropout on shards])       (eval and p = 0 too)
``SpatialDropout``       mask keyed by (seed, b, GLOBAL pixel)       as ChannelDropout
``nn.Dropout``           mask keyed by (seed, b, GLOBAL pixel, c);   as ChannelDropout (+ a
                         a replicated ``[B, C]``: by (seed, b, c)    CRC-32 of a ``[B, C]``)
``GlobalMLP``,           their ``BatchNorm1d`` over the ``[B * N_r,  as SpatialBatchNorm and
``SpatialMLP``           C]`` rows as SpatialBatchNorm; their        nn.Dropout, per layer
                         ``nn.Dropout`` as above, told B
=======================  ==========================================  ==========================

The outputs of ``Squeeze`` (and the stats) are replicated over the group; their gradients follow
Note [replicated activations] in :mod:`hpattn_dist.comm.all_reduce`: partial per rank, summed by
the all-reduce's adjoint, so a ``Squeeze -> nn.Linear -> Unsqueeze`` bottleneck is exact after
:func:`~hpattn_dist.grad_sync.sync_gradients`. A loss computed on a replicated tensor (e.g. a
classifier after ``Squeeze``) is computed by every rank: give each rank ``1 / P`` of it
(:func:`~hpattn_dist.grad_sync.replicated_loss`, Note [one loss rule] in :mod:`hpattn_dist.grad_sync`).

Every call first runs its local input checks inside one
:func:`~hpattn_dist.comm.groups.validated_signature` all_gather (Note [fail together]): a bad
shard on any rank raises the same ``ValueError`` on every rank, and the same all_gather brings the
ranks' pixel counts (the GLOBAL count of the statistics) and the dropout seed. Inside a call of a
converted model whose agreement already covered this layer with the same key, the norms,
``Squeeze`` and the dropouts reuse the pixel counts agreed then instead (Note [one agreement per
model call] in :mod:`.call_agreement`), and a dropout takes its seed from the call's (Note [seeds
in a model call] in :mod:`hpattn_dist.comm.model_call`; a dropout of a replicated ``[B, C]``
still compares its values every call).

Note [modes in the agreement]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A module whose communication depends on its mode (a batch norm reduces over pixels in training
and normalises each pixel alone in eval with running stats; a dropout agrees on a seed only when
it drops) agrees in EVERY mode, with the mode as a shared value of its signature, and the
signature names the layer (its ``what``, hashed into the row). Else a rank in eval skips the
collective that its peer in training enters, the peer's all_gather pairs with whatever the
skipping rank calls next, and the two block in mismatched reductions. With the mode agreed the
ranks raise "disagree on batch_stats"; a rank that skipped a layer anyway (different code)
meets its peer in another layer's agreement and both raise "called with different signatures".
The price is one small all_gather per such layer in eval too.

Each converted module is built as ``ShardedX(module, process_group=None, name="")`` (``name``: the
layer's place in the model, for error messages), directly or through :func:`converters`'
``converter(module, ctx)``. It keeps the idx-flow module's submodules (``bn``, ``instance_norm``,
``gn``), so parameter and buffer names, ``state_dict`` and optimizer state carry over. The
classes here do not need idx_flow (they read the idx-flow module's attributes); :func:`converters`
imports it for the registry's keys. ``hpattn_dist`` itself never imports this package.

Legend: B batch, N pixels of the layer's grid, N_r pixels on group rank r, P group size,
C channels, G groups.

"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from hpattn_dist.comm.all_reduce import all_reduce_, all_reduce_sum
from hpattn_dist.comm.agreement import dtype_code, validated_signature
from hpattn_dist.comm.binding import GroupBound
from hpattn_dist.comm.groups import GroupInfo, resolve_group
from hpattn_dist.healpix import shard_bounds
from hpattn_dist.comm.model_call import agreed
from hpattn_dist.integrations.idx_flow.context import ShardContext
from hpattn_dist.kernels.manual import acc_dtype
from hpattn_dist.swap_modules import carry_hooks
from hpattn_dist.integrations.idx_flow.context import ShardedModule, check_field
from hpattn_dist.integrations.idx_flow.dropouts import ShardedChannelDropout, ShardedDropout, ShardedSpatialDropout

__all__ = [
    "ShardedBatchNorm1d",
    "ShardedChannelDropout",
    "ShardedDropout",
    "ShardedSpatialBatchNorm",
    "ShardedSpatialDropout",
    "ShardedSpatialGroupNorm",
    "ShardedSpatialInstanceNorm",
    "ShardedSqueeze",
    "ShardedUnsqueeze",
    "convert_global_mlp",
    "converters",
    "shard_mlp_internals",
]

_LABEL = "all_reduce.stats"


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def _pixel_counts(owner: Any, info: GroupInfo, what: str, x: Any, channels: Optional[int] = None,
                  mode: Optional[dict[str, int]] = None) -> list[int]:
    """Check ``x`` on every rank together; return every rank's ``N_r`` (one all_gather, or none
    inside a model call that agreed on it before: Note [one agreement per model call]).

    ``mode``: what else every rank must agree on, e.g. ``{"batch_stats": 1}`` (Note [modes in
    the agreement])."""
    def agree() -> list[int]:
        with validated_signature(info, what) as sig:
            check_field(x, what, channels)
            batch, n_local, c = x.shape
            sig.set({"B": batch, "C": c, "dtype": dtype_code(x.dtype), **(mode or {})}, n_local, x.device)
        return sig.per_rank

    mine = (tuple(x.shape), x.dtype, tuple(sorted((mode or {}).items()))) \
        if isinstance(x, Tensor) else type(x).__name__
    return agreed(owner, info, mine, agree, what)


def _moments(x: Tensor, dims: Sequence[int], count: int, info: GroupInfo) -> tuple[Tensor, Tensor, Tensor]:
    """Mean and biased variance of ``x`` over ``dims`` and over the ranks, in two passes.

    Returns ``(x - mean, mean, var)``, the statistics with ``keepdim`` shapes. Two all-reduces
    rather than one of ``(sum, sum of squares)``: the centred second pass keeps the variance
    accurate when the mean is large against the spread (as torch's kernels do).
    """
    mean = all_reduce_sum(x.sum(dim=tuple(dims), keepdim=True), info, _LABEL) / count
    centred = x - mean
    var = all_reduce_sum((centred * centred).sum(dim=tuple(dims), keepdim=True), info, _LABEL) / count
    return centred, mean, var


def _affine(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """Per-channel ``y * weight + bias`` on ``[B, N_r, C]`` (either may be None)."""
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


@torch.no_grad()
def _update_running(running: Tensor, value: Tensor, factor: float) -> None:
    running.mul_(1.0 - factor).add_(value.to(running.dtype), alpha=factor)


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------


class ShardedSpatialBatchNorm(ShardedModule):
    """idx-flow ``SpatialBatchNorm`` on a sharded field: statistics over (B, N) of every rank.

    Holds the idx-flow module's ``bn`` (an ``nn.BatchNorm1d``): same parameters, buffers and
    ``state_dict`` keys. In training (or without running stats) the per-channel mean and biased
    variance are taken over the whole batch and ALL pixels of all ranks; the running stats then
    get torch's update with the GLOBAL count ``n = B * N``: ``running_var`` from the unbiased
    variance ``var * n / (n - 1)``, ``momentum`` (or ``1 / num_batches_tracked`` when momentum is
    None), ``num_batches_tracked`` incremented. In eval with running stats the layer is per pixel
    and runs locally.

    Shape: ``[B, N_r, C] -> [B, N_r, C]``.

    Raises:
        ValueError: on every rank, for a shard that is not ``[B, N_r, C]``, ranks disagreeing on
            B, C or dtype, or a single value per channel in training (as torch).
    """

    _kind = "SpatialBatchNorm"
    _kept = ("bn",)

    def forward(self, x: Tensor) -> Tensor:
        bn = self.bn  # eval with running stats: per pixel, idx-flow's own forward
        return _sharded_batch_norm(bn, x, self.process_group, self._what,
                                   lambda: bn(x.transpose(1, 2)).transpose(1, 2))


def _uses_batch_stats(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _sharded_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: Tensor,
                        process_group: Optional[dist.ProcessGroup], what: str,
                        per_pixel: Callable[[], Tensor]) -> Tensor:
    """``bn`` with batch statistics over (B, N) of every rank: ``[B, N_r, C] -> [B, N_r, C]``;
    ``per_pixel()`` where ``bn`` normalises with its running stats (every rank agrees on which,
    Note [modes in the agreement]).

    Updates ``bn``'s running stats with the GLOBAL count (see :class:`ShardedSpatialBatchNorm`).
    """
    info = resolve_group(process_group)
    batch_stats = _uses_batch_stats(bn)
    sizes = _pixel_counts(bn, info, what, x, bn.num_features, {"batch_stats": int(batch_stats)})
    if not batch_stats:
        return per_pixel()
    count = x.shape[0] * sum(sizes)
    if count <= 1:
        raise ValueError(
            f"{what}: expected more than 1 value per channel when training, got "
            f"B={x.shape[0]} and N={sum(sizes)} pixels over {info.world_size} ranks"
        )
    acc = acc_dtype(x.dtype)
    centred, mean, var = _moments(x.to(acc), (0, 1), count, info)  # stats [1, 1, C]
    y = _affine(centred * torch.rsqrt(var + bn.eps), bn.weight, bn.bias)

    if bn.training and bn.track_running_stats:
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                factor = 1.0 / float(bn.num_batches_tracked)
        _update_running(bn.running_mean, mean.detach().view(-1), factor)
        _update_running(bn.running_var, var.detach().view(-1) * (count / (count - 1)), factor)
    return y.to(x.dtype)


class ShardedBatchNorm1d(GroupBound, nn.BatchNorm1d):
    """An ``nn.BatchNorm1d`` over pixel rows ``[R_r, C]`` (``R_r = B * N_r``), inside an idx-flow MLP.

    ``SpatialMLP`` / ``GlobalMLP(use_batch_norm=True)`` normalise their hidden ``[B * N, C]``
    rows: statistics per channel over every row, i.e. over (B, N) as :class:`ShardedSpatialBatchNorm`
    takes them, which this reuses on the rows of every rank. Made by :func:`shard_mlp_internals`
    (the instance's class is swapped, so parameters, buffers and ``state_dict`` are unchanged);
    eval with running stats is torch's own per-row forward.
    """

    _hp_group: Optional[dist.ProcessGroup] = None
    _hp_what: str = "BatchNorm1d"

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 2:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{self._hp_what}: expected pixel rows [B * N_r, C], got {shape}")
        return _sharded_batch_norm(self, x.unsqueeze(0), self._hp_group, self._hp_what,
                                   lambda: super(ShardedBatchNorm1d, self).forward(x).unsqueeze(0)).squeeze(0)


class ShardedSpatialInstanceNorm(ShardedModule):
    """idx-flow ``SpatialInstanceNorm`` on a sharded field: statistics per (b, c) over ALL pixels.

    Holds the idx-flow module's ``instance_norm`` (an ``nn.InstanceNorm1d``). With input stats
    (training, or no running stats) mean and biased variance are taken over the pixels of every
    rank; with ``track_running_stats`` the running stats get torch's update (batch mean of the
    per-instance mean and unbiased variance, count N). Eval with running stats is per pixel.

    Shape: ``[B, N_r, C] -> [B, N_r, C]``.

    Raises:
        ValueError: on every rank, for a bad shard (see :class:`ShardedSpatialBatchNorm`) or a
            single pixel with input stats (as torch).
    """

    _kind = "SpatialInstanceNorm"
    _kept = ("instance_norm",)

    def forward(self, x: Tensor) -> Tensor:
        norm = self.instance_norm
        input_stats = norm.training or not norm.track_running_stats
        info = resolve_group(self.process_group)
        checked = norm.num_features if (norm.affine or norm.track_running_stats) else None
        sizes = _pixel_counts(self, info, self._what, x, checked, {"input_stats": int(input_stats)})
        if not input_stats:
            return norm(x.transpose(1, 2)).transpose(1, 2)  # per pixel: idx-flow's own forward
        count = sum(sizes)
        if count <= 1:
            raise ValueError(
                f"{self._what}: expected more than 1 spatial element when training, got "
                f"N={count} pixels over {info.world_size} ranks"
            )
        acc = acc_dtype(x.dtype)
        centred, mean, var = _moments(x.to(acc), (1,), count, info)  # stats [B, 1, C]
        y = _affine(centred * torch.rsqrt(var + norm.eps), norm.weight, norm.bias)

        if norm.training and norm.track_running_stats:
            factor = 0.0 if norm.momentum is None else norm.momentum
            _update_running(norm.running_mean, mean.detach().mean(dim=(0, 1)), factor)
            unbiased = var.detach() * (count / (count - 1))
            _update_running(norm.running_var, unbiased.mean(dim=(0, 1)), factor)
        return y.to(x.dtype)


class ShardedSpatialGroupNorm(ShardedModule):
    """idx-flow ``SpatialGroupNorm`` on a sharded field: statistics per (b, group) over ALL pixels.

    Holds the idx-flow module's ``gn`` (an ``nn.GroupNorm``): the mean and biased variance of
    each sample's group of ``C / G`` channels are taken over the pixels of every rank.

    Shape: ``[B, N_r, C] -> [B, N_r, C]``.

    Raises:
        ValueError: on every rank, for a bad shard (see :class:`ShardedSpatialBatchNorm`).
    """

    _kind = "SpatialGroupNorm"
    _kept = ("gn",)

    def forward(self, x: Tensor) -> Tensor:
        gn = self.gn
        info = resolve_group(self.process_group)
        sizes = _pixel_counts(self, info, self._what, x, gn.num_channels)
        batch, n_local, channels = x.shape
        groups = gn.num_groups
        per_group = channels // groups
        acc = acc_dtype(x.dtype)
        grouped = x.to(acc).reshape(batch, n_local, groups, per_group)  # [B, N_r, G, C/G]
        centred, _, var = _moments(grouped, (1, 3), sum(sizes) * per_group, info)  # [B, 1, G, 1]
        y = (centred * torch.rsqrt(var + gn.eps)).reshape(batch, n_local, channels)
        return _affine(y, gn.weight, gn.bias).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Global pooling and its inverse
# --------------------------------------------------------------------------------------------

_REDUCTIONS = ("mean", "max", "sum")


class ShardedSqueeze(ShardedModule):
    """idx-flow ``Squeeze`` on a sharded field: ``[B, N_r, C] -> [B, C]``, replicated.

    ``mean`` and ``sum`` all-reduce the local sums (mean divides by the GLOBAL N). ``max`` finds
    every rank's local maximum, gathers them (one all-reduce of ``[P, B, C]``) and gives the value
    and the gradient to the FIRST maximum in global pixel order (the lowest rank holding the
    maximum, and there the first index, as ``torch.max`` does on one device); the gradient of the
    replicated output is summed over ranks (Note [replicated activations]).

    Raises:
        ValueError: on every rank, for a bad shard, or ``max`` over no pixel at all.
    """

    _kind = "Squeeze"

    def __init__(self, module: nn.Module, process_group: Optional[dist.ProcessGroup] = None,
                 name: str = "") -> None:
        super().__init__(module, process_group, name)
        if module.reduction not in _REDUCTIONS:
            raise ValueError(
                f"{self._what}: unknown reduction {module.reduction!r}, expected one of {_REDUCTIONS}"
            )
        self.reduction = module.reduction

    def extra_repr(self) -> str:
        return f"reduction='{self.reduction}'"

    def forward(self, x: Tensor) -> Tensor:
        info = resolve_group(self.process_group)
        sizes = _pixel_counts(self, info, self._what, x)
        if self.reduction == "sum":
            return all_reduce_sum(x.sum(dim=1), info, _LABEL)
        if self.reduction == "mean":
            return all_reduce_sum(x.sum(dim=1), info, _LABEL) / sum(sizes)
        if sum(sizes) == 0:
            raise ValueError(f"{self._what}: reduction='max' over a field of 0 pixels")
        return _sharded_max(x, info)


def _sharded_max(x: Tensor, info: GroupInfo) -> Tensor:
    """``x.max(dim=1).values`` of the full field ``[B, N, C]`` from the shards ``[B, N_r, C]``."""
    if x.shape[1] > 0:
        local = x.max(dim=1).values  # [B, C]; its backward routes to the first local maximum
        local_value = local.detach()
    else:
        local = x.sum(dim=1)  # zeros, linked to x so that this rank joins the backward
        local_value = torch.full_like(local, -math.inf, requires_grad=False)
    # Gather the local maxima with one sum all-reduce of a [P, B, C] buffer holding this rank's row
    # (adding zeros is exact), then pick the first maximal rank as torch.max picks an index.
    table = local_value.new_zeros((info.world_size, *local_value.shape))
    table[info.rank] = local_value
    all_reduce_(table, info, label=_LABEL)
    owner = table.max(dim=0).indices == info.rank  # [B, C]
    return all_reduce_sum(torch.where(owner, local, torch.zeros_like(local)), info, _LABEL)


class ShardedUnsqueeze(ShardedModule):
    """idx-flow ``Unsqueeze`` on a sharded field: ``[B, C] -> [B, N_r, C]``.

    The replicated vector is broadcast to this rank's range ``shard_bounds(num_points, P)[r]`` of
    the output grid (no communication). Its backward sums over the local pixels only: the partial
    gradient of a replicated tensor (Note [replicated activations]).

    Raises:
        ValueError: the input is not ``[B, C]``.
    """

    _kind = "Unsqueeze"

    def __init__(self, module: nn.Module, process_group: Optional[dist.ProcessGroup] = None,
                 name: str = "") -> None:
        super().__init__(module, process_group, name)
        self.num_points = module.num_points

    def extra_repr(self) -> str:
        return f"num_points={self.num_points}"

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 2:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{self._what}: expected a tensor [B, C], got {shape}")
        info = resolve_group(self.process_group)
        start, stop = shard_bounds(self.num_points, info.world_size)[info.rank]
        return x.unsqueeze(1).expand(-1, stop - start, -1)


# --------------------------------------------------------------------------------------------
# Inside idx-flow's MLPs: [B * N_r, C] rows
# --------------------------------------------------------------------------------------------


def _tell_dropouts_the_batch(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a converted MLP: its dropouts see ``[B * N_r, C]`` rows of ``B`` samples."""
    if args and isinstance(args[0], Tensor) and args[0].dim() >= 1:
        for dropout in module.dropout_layers:
            dropout.batch = int(args[0].shape[0])


def shard_mlp_internals(module: nn.Module, ctx: ShardContext) -> None:
    """Make the batch norms and dropouts inside an idx-flow ``SpatialMLP`` / ``GlobalMLP`` sharded.

    Both MLPs run their hidden layers on ``[B * N, C]`` rows (``N`` output pixels). Each
    ``bn_layers[i]`` becomes a :class:`ShardedBatchNorm1d` (its class swapped: same parameters,
    buffers and names); each ``dropout_layers[i]`` a :class:`ShardedDropout` told ``B`` by a
    forward pre-hook on the MLP, so its mask is keyed by (b, global pixel, channel).

    Raises:
        ValueError: a batch-norm or dropout layer of another type than idx-flow creates
            (``nn.BatchNorm1d``, ``nn.Dropout``).
    """
    prefix = f"{ctx.name}." if ctx.name else ""
    for i, bn in enumerate(module.bn_layers or ()):
        if type(bn) is not nn.BatchNorm1d:
            raise ValueError(f"{prefix}bn_layers.{i}: expected nn.BatchNorm1d, got {type(bn).__name__}")
        bn.__class__ = ShardedBatchNorm1d
        bn._hp_group = ctx.process_group
        bn._hp_what = f"BatchNorm1d {prefix + f'bn_layers.{i}'!r}"
    if module.dropout_layers is None:
        return
    for i, dropout in enumerate(module.dropout_layers):
        if type(dropout) is not nn.Dropout:
            raise ValueError(
                f"{prefix}dropout_layers.{i}: expected nn.Dropout, got {type(dropout).__name__}"
            )
        sharded = ShardedDropout(dropout, ctx.process_group, f"{prefix}dropout_layers.{i}")
        carry_hooks(dropout, sharded)
        module.dropout_layers[i] = sharded
    module.register_forward_pre_hook(_tell_dropouts_the_batch)


def convert_global_mlp(module: nn.Module, ctx: ShardContext) -> nn.Module:
    """idx-flow ``GlobalMLP``, in place: per pixel, but its batch norms and dropouts sharded."""
    shard_mlp_internals(module, ctx)
    return module


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def _converter(cls: type) -> Callable[[nn.Module, ShardContext], nn.Module]:
    def convert(module: nn.Module, ctx: ShardContext) -> nn.Module:
        return cls(module, ctx.process_group, ctx.name)

    convert.__name__ = convert.__qualname__ = f"convert_to_{cls.__name__}"
    return convert


def converters() -> dict[type, Callable[[nn.Module, ShardContext], nn.Module]]:
    """``{idx-flow class: converter(module, ctx) -> nn.Module}`` for the layers of this module.

    Imports idx_flow (only here: importing hpattn_dist never does).

    Raises:
        ImportError: idx-flow is not installed (``pip install idx-flow``).
    """
    import idx_flow  # noqa: PLC0415 - optional dependency, imported on use

    return {
        idx_flow.SpatialBatchNorm: _converter(ShardedSpatialBatchNorm),
        idx_flow.SpatialInstanceNorm: _converter(ShardedSpatialInstanceNorm),
        idx_flow.SpatialGroupNorm: _converter(ShardedSpatialGroupNorm),
        idx_flow.Squeeze: _converter(ShardedSqueeze),
        idx_flow.Unsqueeze: _converter(ShardedUnsqueeze),
        idx_flow.ChannelDropout: _converter(ShardedChannelDropout),
        idx_flow.SpatialDropout: _converter(ShardedSpatialDropout),
        idx_flow.GlobalMLP: convert_global_mlp,
        nn.Dropout: _converter(ShardedDropout),
    }


def __getattr__(name: str) -> Any:
    # ``CONVERTERS`` is built on first access (PEP 562): the classes above stay usable without
    # idx_flow.
    if name == "CONVERTERS":
        return converters()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
