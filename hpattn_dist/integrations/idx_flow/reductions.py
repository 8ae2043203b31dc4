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

Note [pixel dropout on shards]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
idx-flow draws its masks from the default generator (``torch.bernoulli``). On shards:

- ``ChannelDropout`` (mask ``[B, 1, C]``, one decision per channel for ALL pixels) must drop the
  same channels on every rank. Rank-local draws agree only while every rank's generator is in the
  same state, which ends at the first draw whose size depends on ``N_r`` (any per-pixel dropout),
  and the layer then silently computes another function. Here the keep/drop of ``(b, c)`` is the
  position-keyed hash of :func:`hpattn_dist.kernels.keep_mask` with group rank 0's seed (drawn
  from its default generator, shared through the signature all_gather): the same mask on every
  rank.
- ``SpatialDropout`` (mask ``[B, N, 1]``, one decision per pixel) has a correct marginal when
  drawn rank-locally, but not the single-device JOINT distribution: ranks seeded alike (as the
  attention layers ask) draw identical masks over their local indices, so the i-th pixel of every
  shard is dropped together; and the mask changes with P. Here the decision for ``(b, pixel)`` is
  keyed by the GLOBAL pixel index: independent per pixel with keep probability ``1 - p`` (up to
  2^-32), and the same mask at every P (a run at P ranks equals the run at P = 1 bitwise).
- ``nn.Dropout`` (one decision per element: transformer feed-forward, ``SpatialViT``'s
  ``embed_dropout``, inside ``GlobalMLP`` / ``SpatialMLP``) has the same problem as
  ``SpatialDropout``: ranks seeded alike draw the same mask for local index i. Here the decision
  for ``(b, i, c)`` is keyed by the GLOBAL pixel ``i``. The MLPs apply it to ``[B * N_r, C]``
  rows; their forward tells the dropout ``B`` so the rows are read as ``[B, N_r, C]``.
- Neither equals the unconverted module's mask bitwise: it comes from another random stream.
  What holds is the Bernoulli(1 - p) law per decision and exact invariance under P. The scaling is
  idx-flow's (and torch's) ``x * mask / (1 - p)``. Eval mode and ``p = 0`` return the input
  untouched, as the unconverted modules do.
- Every rank draws one seed per call from its default generator (only rank 0's is used), so the
  generators of all ranks, and of a one-process run, advance alike: with no other rank-dependent
  draw in the model, a training run on P ranks equals the run on one.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from hpattn_dist.comm.all_reduce import all_reduce_, all_reduce_sum
from hpattn_dist.comm.agreement import dtype_code, validated_signature
from hpattn_dist.comm.binding import GroupBound
from hpattn_dist.comm.groups import GroupInfo, offsets, resolve_group
from hpattn_dist.healpix import shard_bounds
from hpattn_dist.comm.model_call import agreed, derives_seeds, layer_seed
from hpattn_dist.integrations.idx_flow.context import ShardContext
from hpattn_dist.kernels import DropoutSpec, draw_seed, keep_mask
from hpattn_dist.kernels.manual import acc_dtype
from hpattn_dist.swap_modules import carry_hooks

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


def _check_field(x: Any, what: str, channels: Optional[int] = None) -> None:
    """``x`` must be a floating ``[B, N_r, C]`` tensor (with ``C == channels`` when given)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{what}: expected a tensor [B, N_r, C], got {type(x).__name__}")
    if x.dim() != 3 or not x.is_floating_point():
        raise ValueError(
            f"{what}: expected a floating tensor [B, N_r, C], got shape {tuple(x.shape)} {x.dtype}"
        )
    if channels is not None and x.shape[2] != channels:
        raise ValueError(
            f"{what}: expected {channels} channels (input [B, N_r, {channels}]), got shape "
            f"{tuple(x.shape)}"
        )


def _pixel_counts(owner: Any, info: GroupInfo, what: str, x: Any, channels: Optional[int] = None,
                  mode: Optional[dict[str, int]] = None) -> list[int]:
    """Check ``x`` on every rank together; return every rank's ``N_r`` (one all_gather, or none
    inside a model call that agreed on it before: Note [one agreement per model call]).

    ``mode``: what else every rank must agree on, e.g. ``{"batch_stats": 1}`` (Note [modes in
    the agreement])."""
    def agree() -> list[int]:
        with validated_signature(info, what) as sig:
            _check_field(x, what, channels)
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


class _Sharded(GroupBound, nn.Module):
    """Common state of the converted modules: the group, the training mode and a name for errors.

    Deepcopy shares the group, pickling drops it (Note [copying a layer bound to a group]).
    """

    _kind = ""

    def __init__(self, module: nn.Module, process_group: Optional[dist.ProcessGroup], name: str) -> None:
        super().__init__()
        self.process_group = process_group
        # Errors name the layer and (from convert_model's ctx.name) where it sits in the model.
        self._what = f"{self._kind} {name!r}" if name else self._kind
        self.training = module.training


@torch.no_grad()
def _update_running(running: Tensor, value: Tensor, factor: float) -> None:
    running.mul_(1.0 - factor).add_(value.to(running.dtype), alpha=factor)


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------


class ShardedSpatialBatchNorm(_Sharded):
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

    def __init__(self, module: nn.Module, process_group: Optional[dist.ProcessGroup] = None,
                 name: str = "") -> None:
        super().__init__(module, process_group, name)
        self.bn = module.bn

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


class ShardedSpatialInstanceNorm(_Sharded):
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

    def __init__(self, module: nn.Module, process_group: Optional[dist.ProcessGroup] = None,
                 name: str = "") -> None:
        super().__init__(module, process_group, name)
        self.instance_norm = module.instance_norm

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


class ShardedSpatialGroupNorm(_Sharded):
    """idx-flow ``SpatialGroupNorm`` on a sharded field: statistics per (b, group) over ALL pixels.

    Holds the idx-flow module's ``gn`` (an ``nn.GroupNorm``): the mean and biased variance of
    each sample's group of ``C / G`` channels are taken over the pixels of every rank.

    Shape: ``[B, N_r, C] -> [B, N_r, C]``.

    Raises:
        ValueError: on every rank, for a bad shard (see :class:`ShardedSpatialBatchNorm`).
    """

    _kind = "SpatialGroupNorm"

    def __init__(self, module: nn.Module, process_group: Optional[dist.ProcessGroup] = None,
                 name: str = "") -> None:
        super().__init__(module, process_group, name)
        self.gn = module.gn

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


class ShardedSqueeze(_Sharded):
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


class ShardedUnsqueeze(_Sharded):
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
# Dropout (Note [pixel dropout on shards])
# --------------------------------------------------------------------------------------------


def _check_p(p: Any, what: str) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{what}: dropout probability must be between 0 and 1, got {p!r}")
    return float(p)


class _ShardedPixelDropout(_Sharded):
    """Shared body of the dropouts: agree on a seed, build the keyed mask, scale."""

    _hp_call_config = ("p",)  # agreed by a converted model's call (Note [seeds in a model call])
    _hp_drop_attr = "p"

    def __init__(self, module: nn.Module, process_group: Optional[dist.ProcessGroup] = None,
                 name: str = "") -> None:
        super().__init__(module, process_group, name)
        self.p = _check_p(module.p, self._what)

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: Tensor) -> Tensor:
        drops = self.training and self.p > 0.0
        info = resolve_group(self.process_group)
        # Inside a model call that draws seeds every rank proposes the same derived seed (Note
        # [seeds in a model call]); outside one each its own draw, and rank 0's is taken.
        derived = drops and derives_seeds(info)
        proposal = layer_seed(info, self._what, draw_seed()) if drops else 0

        def agree() -> tuple[list[int], int]:
            with validated_signature(info, self._what) as sig:  # also in eval: Note [modes in the agreement]
                field, replicated = self._as_field(x)
                batch, n_local, channels = field.shape
                shared = {"B": batch, "C": channels, "dtype": dtype_code(x.dtype), "drops": int(drops)}
                if replicated and drops:
                    shared["crc"] = _crc32(x)
                sig.set(shared, (n_local, proposal), x.device)
            return [row[0] for row in sig.per_rank], sig.per_rank[0][1]  # group rank 0's seed

        if drops and (not derived or self._replicated(x)):  # a fresh seed, or a CRC of the data
            sizes, seed = agree()
        else:
            mine = (tuple(x.shape), x.dtype, drops, getattr(self, "batch", None)) \
                if isinstance(x, Tensor) else type(x).__name__
            sizes, seed = agreed(self, info, mine, agree, self._what)
            seed = proposal  # the call's derived seed, the same on every rank
        if not drops:
            return x
        field, replicated = self._as_field(x)
        batch, n_local, channels = field.shape
        offset = 0 if replicated else offsets(sizes)[info.rank]
        mask = self._mask(DropoutSpec(self.p, seed, q_offset=offset), batch, n_local, channels, x.device)
        y = field * mask.to(x.dtype)
        if self.p < 1.0:  # p == 1 drops everything: zeros, as torch
            y = y / (1 - self.p)
        return y.reshape(x.shape)

    def _as_field(self, x: Any) -> tuple[Tensor, bool]:
        """Check ``x`` (locally) and return it as ``[B, N_r, C]``, and whether it is replicated."""
        _check_field(x, self._what)
        return x, False

    def _replicated(self, x: Any) -> bool:
        """Whether ``x`` is read as a replicated tensor (its values are then agreed each call)."""
        return False

    def _mask(self, spec: DropoutSpec, batch: int, n_local: int, channels: int, device) -> Tensor:
        raise NotImplementedError


def _crc32(x: Tensor) -> int:
    """CRC-32 of a tensor's bytes: ranks holding a replicated tensor hold the same bits."""
    raw = x.detach().contiguous().reshape(-1).view(torch.uint8).cpu()
    return zlib.crc32(raw.numpy().tobytes())


class ShardedChannelDropout(_ShardedPixelDropout):
    """idx-flow ``ChannelDropout`` on a sharded field: the same ``[B, 1, C]`` mask on every rank.

    The keep/drop of channel ``c`` of sample ``b`` is a hash of ``(seed, b, c)``, the seed group
    rank 0's draw (Note [pixel dropout on shards]). Shape: ``[B, N_r, C] -> [B, N_r, C]``.
    """

    _kind = "ChannelDropout"

    def _mask(self, spec: DropoutSpec, batch: int, n_local: int, channels: int, device) -> Tensor:
        mask = keep_mask(DropoutSpec(spec.p, spec.seed), batch, 1, 1, channels, device)  # [B, 1, 1, C]
        return mask.view(batch, 1, channels)


class ShardedSpatialDropout(_ShardedPixelDropout):
    """idx-flow ``SpatialDropout`` on a sharded field: a ``[B, N_r, 1]`` mask keyed by GLOBAL pixel.

    The keep/drop of pixel ``i`` (global index) of sample ``b`` is a hash of ``(seed, b, i)``, the
    seed group rank 0's draw: independent per pixel and the same at every P (Note [pixel dropout
    on shards]). Shape: ``[B, N_r, C] -> [B, N_r, C]``.
    """

    _kind = "SpatialDropout"

    def _mask(self, spec: DropoutSpec, batch: int, n_local: int, channels: int, device) -> Tensor:
        return keep_mask(spec, batch, 1, n_local, 1, device).view(batch, n_local, 1)


class ShardedDropout(_ShardedPixelDropout):
    """``nn.Dropout`` on a sharded field: an element mask keyed by (b, GLOBAL pixel, channel).

    The keep/drop of element ``(b, i, c)`` (``i`` the global pixel index) is a hash of
    ``(seed, b, i, c)``, the seed group rank 0's draw: independent per element and the same at
    every P, so a run on P ranks equals the run on one (Note [pixel dropout on shards]). Eval
    mode and ``p == 0`` return the input itself, as ``nn.Dropout`` does.

    Shapes:
        - ``[B, N_r, C] -> [B, N_r, C]``: a sharded field;
        - ``[B * N_r, C]`` rows inside a converted ``SpatialMLP`` / ``GlobalMLP``, whose forward
          sets :attr:`batch` (:func:`shard_mlp_internals`);
        - ``[B, C]`` otherwise: a REPLICATED vector (e.g. after ``Squeeze``), the same mask on
          every rank; the ranks' values must be bitwise equal (a CRC-32 is compared), so a 2-D
          shard of pixel rows fails instead of silently drawing correlated masks.

    Raises:
        ValueError: on every rank, for another shape, ranks disagreeing on B, C or dtype, or a
            2-D input (outside an MLP) that differs across ranks.
    """

    _kind = "Dropout"

    def __init__(self, module: nn.Module, process_group: Optional[dist.ProcessGroup] = None,
                 name: str = "") -> None:
        super().__init__(module, process_group, name)
        self.batch: Optional[int] = None  # B of the [B * N_r, C] rows an owning MLP feeds

    def _as_field(self, x: Any) -> tuple[Tensor, bool]:
        if self.batch is not None:
            if not isinstance(x, Tensor) or x.dim() != 2 or (self.batch and x.shape[0] % self.batch):
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"{self._what}: expected pixel rows [B * N_r, C] with B={self.batch}, "
                                 f"got {shape}")
            rows = x.shape[0] // self.batch if self.batch else 0
            return x.reshape(self.batch, rows, x.shape[1]), False
        if self._replicated(x):
            return x.unsqueeze(1), True
        if isinstance(x, Tensor) and x.dim() != 3:
            raise ValueError(
                f"{self._what}: expected a sharded field [B, N_r, C] or a replicated [B, C], got "
                f"shape {tuple(x.shape)}"
            )
        _check_field(x, self._what)
        return x, False

    def _replicated(self, x: Any) -> bool:
        return self.batch is None and isinstance(x, Tensor) and x.dim() == 2 and x.is_floating_point()

    def _mask(self, spec: DropoutSpec, batch: int, n_local: int, channels: int, device) -> Tensor:
        return keep_mask(spec, batch, 1, n_local, channels, device).view(batch, n_local, channels)


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
