"""idx-flow's index-gather layers, run on a shard: halo exchange, then the layer's own math.

Legend: B batch, N_in / N_out input / output pixels of a layer, N_r input pixels on rank r, O_r
output pixels on rank r (``shard_bounds(N_out, P)[r]``), R halo rows received, K connections per
output pixel, C channels.

A converted layer keeps its class's parameters, buffers and ``forward``; it only becomes an
instance of a subclass (``HaloSpatialConv`` for ``SpatialConv``, ``Halo<Name>`` for a subclass
of one that keeps its ``forward``, :func:`halo_class`) whose ``forward``

1. agrees with its peers and plans the halo (:class:`~hpattn_dist.comm.halo.HaloExchanger`, one
   small metadata ``all_gather``, folded into the model's one agreement per call when the shapes
   repeat: Note [one agreement per model call]; the plan is computed once per input split and
   cached),
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
``SpatialViT``'s pixel-indexed ``pos_embed [1, N_out, E]`` is read the same way, as a pixel
tensor (:mod:`.pixel_tensors`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import idx_flow
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from hpattn_dist.comm.binding import GroupBound
from hpattn_dist.comm.groups import resolve_group
from hpattn_dist.comm.halo import HaloExchanger, halo_exchange
from hpattn_dist.integrations.idx_flow.call_agreement import agreed, check_split
from hpattn_dist.integrations.idx_flow.context import ShardContext
from hpattn_dist.integrations.idx_flow.reductions import shard_mlp_internals

__all__ = ["GATHER_CONVERTERS", "HaloGatherMixin", "check_convertible", "convert_gather_layer",
           "halo_class"]


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


class HaloGatherMixin(GroupBound):
    """``forward`` of a converted index-gather layer: ``[B, N_r, C] -> [B, O_r, C_out]``.

    Class attributes: ``_hp_base``, the layer's own class (idx-flow's or a subclass with the same
    ``forward``); ``_hp_per_output``, names of buffers indexed by output pixel along dim 0.
    Instance attribute ``_hp_process_group``: the group as given to ``convert_model``; the halo
    exchanger is a cache (rebuilt after copying or unpickling, Note [copying a layer bound to a
    group]).

    The input must be split as ``shard_bounds(N_in, P)`` (Note [converted models take
    shard_bounds]); inside an agreed model call the layer reuses what it agreed on in earlier
    calls with the same key (Note [one agreement per model call]).
    """

    _hp_base: type
    _hp_per_output: tuple[str, ...] = ()
    _hp_transient = ("_hp_exchanger", "_hp_bound_to")
    _hp_process_group: Any = None
    _hp_what: str = ""
    _hp_exchanger: Optional[HaloExchanger] = None
    _hp_bound_to: Any = None

    def _hp_halo(self) -> HaloExchanger:
        """The exchanger over ``_hp_process_group`` (made on first use and after a re-binding)."""
        if self._hp_exchanger is None or self._hp_bound_to is not self._hp_process_group:
            resolve_group(self._hp_process_group, "process_group")  # a dropped group raises, naming the fix
            self._hp_exchanger = HaloExchanger(self._hp_process_group, self._hp_what)
            self._hp_bound_to = self._hp_process_group
        return self._hp_exchanger

    def _hp_table_crc(self) -> int:
        return self._hp_halo().table_crc(self.connection_indices)

    def _hp_input_sizes(self, x: Tensor, halo: HaloExchanger) -> tuple[int, ...]:
        """Every rank's ``N_r``: agreed now, or in an earlier call of the model with this key."""
        def agree() -> tuple[int, ...]:
            sizes = halo.agree(x, self.connection_indices, dim=1)
            check_split(sizes, self._hp_what)
            return sizes

        mine = (tuple(x.shape), x.dtype, halo.table_crc(self.connection_indices)) \
            if isinstance(x, Tensor) else type(x).__name__
        return agreed(self, halo.info, mine, agree, self._hp_what)

    def forward(self, x: Tensor) -> Tensor:
        halo = self._hp_halo()
        sizes = self._hp_input_sizes(x, halo)
        plan = halo.plan_for(sizes, self.connection_indices, x.device)
        x_ext = halo_exchange(x, plan, halo.info, dim=1)
        start, stop = plan.out_bounds[plan.rank]
        view: dict[str, Any] = {"connection_indices": plan.local_table, "output_points": stop - start}
        for name in self._hp_per_output:
            value = getattr(self, name)
            if value is not None:
                view[name] = value[start:stop]
        with _local_view(self, view):
            return self._hp_base.forward(self, x_ext)

    def __reduce_ex__(self, protocol: int):
        # Classes made by halo_class for subclasses are not importable: rebuild them on loading.
        return _new_halo_layer, (self._hp_base,), self.__getstate__()


def _new_halo_layer(base: type) -> nn.Module:
    """An empty instance of ``halo_class(base)``, for unpickling (its state is set afterwards)."""
    return nn.Module.__new__(halo_class(base))


_PER_OUTPUT = {
    idx_flow.SpatialConv: ("kernel_weights",),
    idx_flow.SpatialTransposeConv: ("kernel_weights",),
    idx_flow.SpatialUpsampling: ("interpolation_weights",),
    idx_flow.SpatialPooling: (),
    idx_flow.SpatialMLP: (),
    idx_flow.SpatialPatchEmbedding: (),
}
"""The idx-flow index-gather layers and their buffers indexed by output pixel (Note [local view])."""

_HALO_CLASSES: dict[type, type] = {}


def halo_class(base: type) -> type:
    """The sharded class of ``base`` (an idx-flow gather layer or a subclass keeping its forward).

    ``HaloSpatialConv`` for ``idx_flow.SpatialConv``, ..., and ``Halo<Name>`` made once for a
    subclass (a user's subclass, or the class torch's parametrizations inject).
    """
    cls = _HALO_CLASSES.get(base)
    if cls is None:
        gather = next(c for c in base.__mro__ if c in _PER_OUTPUT)
        name = f"Halo{base.__name__}"
        cls = type(name, (HaloGatherMixin, base), {
            "__module__": __name__, "__qualname__": name, "_hp_base": base,
            "_hp_per_output": _PER_OUTPUT[gather],
            "__doc__": f":class:`{base.__module__}.{base.__qualname__}` on a shard (see :class:`HaloGatherMixin`).",
        })
        _HALO_CLASSES[base] = cls
    return cls


HaloSpatialConv = halo_class(idx_flow.SpatialConv)
HaloSpatialTransposeConv = halo_class(idx_flow.SpatialTransposeConv)
HaloSpatialUpsampling = halo_class(idx_flow.SpatialUpsampling)
HaloSpatialPooling = halo_class(idx_flow.SpatialPooling)
HaloSpatialMLP = halo_class(idx_flow.SpatialMLP)
HaloSpatialPatchEmbedding = halo_class(idx_flow.SpatialPatchEmbedding)


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
    if isinstance(module, idx_flow.SpatialMLP):
        shard_mlp_internals(module, ctx)
    module.__class__ = halo_class(type(module))
    module._hp_process_group = ctx.process_group
    module._hp_what = f"{type(module)._hp_base.__name__} {ctx.name or '(root)'!r}"
    return module


GATHER_CONVERTERS = {cls: convert_gather_layer for cls in _PER_OUTPUT}
"""idx-flow type -> converter, for the index-gather layers."""
