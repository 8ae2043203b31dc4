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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch.distributed as dist
import torch.nn as nn

from hpattn_dist.comm.groups import GroupInfo

__all__ = ["Converter", "ShardContext"]


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
