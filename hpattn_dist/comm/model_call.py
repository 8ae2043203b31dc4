"""The agreed call of a converted model in progress: what its layers may reuse instead of agreeing.

Legend: P ranks of the group, N_r pixels on group rank r.

A converted model agrees ONCE per call (Note [one agreement per model call] in
:mod:`hpattn_dist.integrations.idx_flow.call_agreement`, which opens the call). While it runs,
this module holds, per thread, the call's :class:`CallState`: its key, the store of facts its
layers agreed on in earlier calls with the same key, the parameters checked at the call's start
and the call's dropout seed. The layers that can do without their own agreement (the gather
layers, the norms, ``Squeeze``, the dropouts and the attention's plan, Note [attention plans in a
model call] in :mod:`hpattn_dist.strategies.plan`) look their slot up here. Nothing in this
module communicates, and it does not import idx-flow: the attention's registered op reads it.
``torch.compile`` never traces the call state: its readers here are compiler-disabled (a graph
break where a traced layer asks), and the attention reads it inside its op's body, which dynamo
does not trace, so what a call agreed is read when the call runs, never baked into a graph.

Note [seeds in a model call]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A dropout draws a fresh seed per call, and the ranks must drop alike: outside a model call each
layer agrees on group rank 0's draw. Inside one, the call's row carries every rank's draw of ONE
call seed, made at the call's start (only when some layer of the model drops), and the k-th seed a
layer asks for in the call is :func:`derive_seed` of group rank 0's call seed and k: the same
on every rank with no exchange, a fresh mask per layer and per call. A converted model on one
process draws and derives alike, so a run on P ranks equals the run on one.

Each layer still makes its own draw where it always did (before the attention's op, Note [seed
outside the op]; in the dropout's forward), so the generator advances as before, and the
derived seed is remembered under ``(the layer, its draw)``. That is what a recomputation needs:
``torch.utils.checkpoint`` reruns a block during the backward, after the model call has ended, with
the CPU generator restored, so the layer draws the same value again, agrees on its own (the
recomputation is outside any call) and proposes the seed remembered for that draw
(:func:`layer_seed`): the forward's mask. Up to :data:`_REPLAYS` draws are remembered per layer; a
recomputation further behind its forward than that (that many calls of the model before one
backward) draws a fresh mask. A layer that was never called inside a model call finds nothing
remembered and behaves as it always did.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Optional

import torch
import torch.distributed as dist

from hpattn_dist.comm.groups import GroupInfo
from hpattn_dist.tracing import not_traced

__all__ = ["CallState", "Slot", "agreed", "call_slot", "current_call", "derive_seed", "derives_seeds",
           "layer_seed", "pop_call", "push_call"]

_MASK31 = 0x7FFFFFFF
_REPLAYS = 1024
"""Draws remembered per layer for recomputations (Note [seeds in a model call])."""


def _mix32(x: int) -> int:
    from hpattn_dist.kernels.dropout import _mix32 as mix

    return int(mix(x))


def derive_seed(call_seed: int, k: int) -> int:
    """The k-th seed of a model call whose seed is ``call_seed``: in ``[0, 2**31)``, a bijective
    mix of ``k`` keyed by the call's seed (Note [seeds in a model call])."""
    return _mix32(_mix32(call_seed & 0xFFFFFFFF) ^ (k & 0xFFFFFFFF)) & _MASK31


@dataclass
class CallState:
    """The agreed call of a converted model in progress on this thread.

    Attributes:
        group: the model's group (its layers' calls over another group are not part of it).
        key: the call key, the same on every rank.
        facts: what layers agreed on in earlier calls with the same key:
            ``{(layer, n): (agreed value, the layer's local facts then)}``, n counting the
            layer's calls within one model call.
        seed: group rank 0's call seed, or None when no layer of the model drops.
        params: ``{(data_ptr, numel): version}`` of every parameter whose replicas were checked at
            the call's start (Note [replicated parameter check]), or None when they could not be
            (no peers, or parameters sharded by FSDP2 / ZeRO-3).
    """

    group: Optional[dist.ProcessGroup]
    key: tuple
    facts: dict
    seed: Optional[int] = None
    params: Optional[dict] = None
    calls: dict[Hashable, int] = field(default_factory=dict)
    seeds_given: int = 0

    def slot(self, layer: Any) -> tuple[Hashable, int]:
        """``(layer, n)`` for the n-th call of ``layer`` in this model call (n from 0); a layer
        object counts by identity, a name (the attention op's) by value."""
        who = layer if isinstance(layer, (str, tuple)) else id(layer)
        n = self.calls.get(who, 0)
        self.calls[who] = n + 1
        return who, n

    def covers(self, params: Iterable[torch.Tensor]) -> bool:
        """Whether every tensor of ``params`` is a parameter checked at the call's start, unchanged
        since (same storage and version)."""
        if self.params is None:
            return False
        return all(self.params.get((p.data_ptr(), p.numel())) == p._version for p in params)

    def next_seed(self) -> int:
        """The next seed derived from the call's seed (Note [seeds in a model call])."""
        if self.seed is None:
            raise RuntimeError("no seed was drawn for this model call")
        k = self.seeds_given
        self.seeds_given += 1
        return derive_seed(self.seed, k)


_STACK = threading.local()


def _stack() -> list[CallState]:
    if not hasattr(_STACK, "calls"):
        _STACK.calls = []
    return _STACK.calls


def push_call(state: CallState) -> None:
    """Open ``state`` on this thread (the model's forward pre-hook)."""
    _stack().append(state)


def pop_call() -> None:
    """Close the innermost call on this thread (the model's forward hook)."""
    _stack().pop()


@not_traced
def current_call(info: GroupInfo) -> Optional[CallState]:
    """The innermost agreed model call on this thread, if it is over ``info``'s group (a group
    of one included: a converted model on one process derives its seeds alike)."""
    calls = _stack()
    if calls and calls[-1].group is info.group:
        return calls[-1]
    return None


class Slot:
    """A layer's place in a model call: what it agreed on in an earlier call with the same key."""

    def __init__(self, call: CallState, layer: Any) -> None:
        self.call = call
        self.index = call.slot(layer)
        self.known: Optional[tuple] = call.facts.get(self.index)

    def store(self, value: Any, mine: Any) -> None:
        """Keep ``value``, agreed now, for the later calls with this key."""
        self.call.facts[self.index] = (value, mine)

    def reuse(self, mine: Any, what: str) -> Any:
        """The value agreed earlier, after checking that this rank's local facts are unchanged.

        Raises:
            RuntimeError: ``mine`` differs from the facts of the earlier call with the same key.
        """
        value, agreed_mine = self.known
        if mine != agreed_mine:
            raise RuntimeError(
                f"{what}: this call's input {mine} differs from the one agreed in an earlier call of "
                f"the model with the same arguments ({agreed_mine}): the model's shapes must follow "
                "from its arguments (Note [one agreement per model call])")
        return value


def call_slot(layer: Any, info: GroupInfo) -> Optional[Slot]:
    """``layer``'s slot in the agreed model call over ``info``'s group; None outside one or
    with no peers (a group of one agrees for free)."""
    call = current_call(info) if info.world_size > 1 else None
    return None if call is None else Slot(call, layer)


@not_traced
def agreed(layer: Any, info: GroupInfo, mine: Any, agree: Callable[[], Any], what: str) -> Any:
    """What ``agree()`` returns for this call of ``layer``: its own agreement, or inside an agreed
    model call the result of the earlier call with the same key (Note [one agreement per model call]).

    Args:
        layer: the layer (its identity, or its name, keys the store).
        info: the layer's group.
        mine: this rank's local facts that ``agree()`` depends on (its input's shape, dtype, ...).
        agree: the layer's own agreement (a collective), run when nothing is known yet.
        what: the layer, for the error.

    Raises:
        RuntimeError: ``mine`` differs from the facts of the earlier call with the same key: the
            model's shapes do not follow from its arguments.
    """
    slot = call_slot(layer, info)
    if slot is None:
        return agree()
    if slot.known is not None:
        return slot.reuse(mine, what)
    value = agree()
    slot.store(value, mine)
    return value


_REPLAY: dict[str, "OrderedDict[int, int]"] = {}


@not_traced
def derives_seeds(info: GroupInfo) -> bool:
    """Whether a model call over ``info``'s group that draws seeds is in progress on this thread."""
    call = current_call(info)
    return call is not None and call.seed is not None


@not_traced
def layer_seed(info: GroupInfo, who: str, draw: int) -> int:
    """The seed ``who`` proposes for a call, given its own fresh ``draw``: inside a model call
    over ``info``'s group that draws seeds, the call's next derived seed (remembered under
    ``draw``); outside one, the seed remembered for ``draw`` (a recomputation of a call's layer),
    else ``draw`` itself (Note [seeds in a model call])."""
    call = current_call(info)
    if call is not None and call.seed is not None:
        seed = call.next_seed()
        seen = _REPLAY.setdefault(who, OrderedDict())
        seen[draw] = seed
        seen.move_to_end(draw)
        while len(seen) > _REPLAYS:
            seen.popitem(last=False)
        return seed
    seen = _REPLAY.get(who)
    return draw if seen is None else seen.get(draw, draw)
