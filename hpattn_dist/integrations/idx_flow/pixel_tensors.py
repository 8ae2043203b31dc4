"""Parameters and buffers indexed by pixel, read on this rank's pixels during their module's forward.

Legend: N pixels of the tensor's grid, N_r pixels on group rank r, P group size.

Note [pixel tensors]
~~~~~~~~~~~~~~~~~~~~
A user's model often holds tensors with one entry per pixel: a learned positional embedding
``nn.Parameter([1, N, E])`` (``SpatialViT.pos_embed`` is one), static fields registered as
buffers (orography, a land-sea mask ``[N, 1]``). On a shard the module's forward must read the
rank's rows ``shard_bounds(N, P)[r]`` of them (Note [converted models take shard_bounds]), while
the model keeps the full tensors: the same ``Parameter`` objects, ``state_dict`` and optimizer
state on every rank.

:class:`PixelSlices` does that with a pair of hooks on the module that owns the tensors: before its
forward each tensor is replaced by the view ``tensor.narrow(dim, start_r, N_r)``, after it (also
when the forward raised) the full tensor is put back. The view is differentiable, so the full
parameter's gradient is zero outside the rank's rows, and the SUM over ranks of
:func:`hpattn_dist.grad_sync.sync_gradients` assembles the single-device gradient (the ranks touch
disjoint rows of a replicated parameter). The tensor is read per rank only inside the forward of
its owner; code elsewhere that reads it (another module's forward) sees the full tensor.
"""

from __future__ import annotations

from typing import Any, Optional

import torch.distributed as dist
import torch.nn as nn

from hpattn_dist.comm.binding import GroupBound
from hpattn_dist.comm.groups import resolve_group
from hpattn_dist.healpix import shard_bounds

__all__ = ["PixelSlices", "attach_pixel_slices"]


class PixelSlices(GroupBound):
    """The hooks that show a module its pixel tensors' local rows (Note [pixel tensors]).

    Args:
        dims: ``{name of a parameter or buffer of the module: its pixel dim}``.
        process_group: the sequence-parallel group (None: the default group).
    """

    _hp_transient = ("_saved",)

    def __init__(self, dims: dict[str, int], process_group: Optional[dist.ProcessGroup]) -> None:
        self.dims = dict(dims)
        self.process_group = process_group
        self._saved: list[list[tuple[dict, str, Any]]] = []

    def enter(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook: put each tensor's local rows in its place."""
        info = resolve_group(self.process_group, "process_group")
        if not hasattr(self, "_saved"):
            self._saved = []
        saved = []
        for name, dim in self.dims.items():
            store = module._parameters if name in module._parameters else module._buffers
            full = store.get(name)
            if full is None:
                continue
            start, stop = shard_bounds(int(full.shape[dim]), info.world_size)[info.rank]
            saved.append((store, name, full))
            store[name] = full.narrow(dim, start, stop - start)
        self._saved.append(saved)
        return None

    def exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Forward hook (also called when the forward raised): put the full tensors back."""
        if getattr(self, "_saved", None):
            for store, name, full in reversed(self._saved.pop()):
                store[name] = full
        return None


def attach_pixel_slices(module: nn.Module, dims: dict[str, int],
                        process_group: Optional[dist.ProcessGroup]) -> None:
    """Register :class:`PixelSlices` for ``dims`` on ``module`` (merged with one already there)."""
    for hook in module._forward_pre_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, PixelSlices):
            owner.dims.update(dims)
            return
    slices = PixelSlices(dims, process_group)
    module.register_forward_pre_hook(slices.enter, prepend=True)
    module.register_forward_hook(slices.exit, always_call=True)
