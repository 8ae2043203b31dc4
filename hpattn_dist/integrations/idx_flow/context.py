"""What a module converter of :func:`hpattn_dist.integrations.idx_flow.convert_model` receives.

A converter is a callable ``converter(module, ctx) -> nn.Module``: given one idx-flow module (found
by its class in the converter registry, or a subclass that keeps that class's ``forward``) and the
:class:`ShardContext` of the conversion, it
returns the module to put in its place. The returned module must keep the parameter and buffer
NAMES of ``module`` (so ``state_dict`` and optimizers carry over): either ``module`` itself,
changed in place (e.g. its ``forward`` bound to a sharded version), or a subclass instance that
shares its parameter objects. It is called on every rank of the group with the same module, so it
must not communicate (the first forward may). It is called once per module, however many paths
lead to it; ``convert_model`` puts a returned replacement at every path and moves the module's hooks
to it, and restores the whole model if a converter raises (:mod:`hpattn_dist.swap_modules`).

Sharding contract seen by every converted module: a tensor ``[B, N_r, C]`` holds this rank's
contiguous range ``healpix.shard_bounds(N, P)[rank]`` of its grid of ``N`` pixels, in the pixel
order of the model's connection tables (RING for tables from
``idx_flow.utils.compute_connection_indices``). Legend: B batch, N pixels of the grid at that
point of the model, N_r pixels on group rank r, P group size, C channels.

The modules this package converts build on :class:`ShardedModule` (the group, the training mode,
a name for errors) and check their input with :func:`check_field`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from hpattn_dist.comm.binding import GroupBound
from hpattn_dist.comm.groups import GroupInfo

__all__ = ["Converter", "ShardContext", "ShardedModule", "check_field"]


@dataclass(frozen=True)
class ShardContext:
    """The conversion's group and options, the same on every rank.

    Attributes:
        info: this process's view of the sequence-parallel group (rank, world size ``P``).
        process_group: the group as passed to ``convert_model`` (None: the default group, or a
            single process when ``torch.distributed`` is not initialised); pass it on to
            :func:`hpattn_dist.modules.convert_spatial_attention` and collectives.
        strategy: the attention strategy name passed to ``convert_model`` (``"auto"``, ``"ring"``,
            ``"ulysses"``, ``"hybrid"``).
        name: qualified name of the module being converted (``"blocks.0.attn"``; ``""`` for the
            root), for error messages; ``convert_model`` passes each converter its own.
    """

    info: GroupInfo
    process_group: Optional[dist.ProcessGroup]
    strategy: str = "auto"
    name: str = ""


Converter = Callable[[nn.Module, ShardContext], nn.Module]
"""``converter(module, ctx) -> nn.Module``: see the module docstring."""


def check_field(x: Any, what: str, channels: Optional[int] = None) -> None:
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


class ShardedModule(GroupBound, nn.Module):
    """Common state of the converted modules: the group, the training mode and a name for errors.

    Deepcopy shares the group, pickling drops it (Note [copying a layer bound to a group]).
    ``_kept``: the names of the idx-flow module's submodules the converted module holds as they are
    (its ``nn.BatchNorm1d``, ...: parameters and buffers unchanged).
    """

    _kind = ""
    _kept: tuple[str, ...] = ()

    def __init__(self, module: nn.Module, process_group: Optional[dist.ProcessGroup] = None, name: str = "") -> None:
        super().__init__()
        self.process_group = process_group
        # Errors name the layer and (from convert_model's ctx.name) where it sits in the model.
        self._what = f"{self._kind} {name!r}" if name else self._kind
        self.training = module.training
        for attr in self._kept:
            setattr(self, attr, getattr(module, attr))
