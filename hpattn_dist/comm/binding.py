"""Objects bound to a process group under ``copy.deepcopy`` and pickling.

Note [copying a layer bound to a group]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A ProcessGroup is a handle on this process's communicator: it can be shared, not copied or sent
elsewhere. ``copy.deepcopy`` SHARES it (the copy communicates over the same ranks, like the
original); pickling (``torch.save`` of a module, multiprocessing) DROPS it: an
:class:`UnboundGroup` marker takes its place, and the unpickled object raises on use (in
:func:`~hpattn_dist.comm.groups.resolve_group`) until it is re-bound, with
``layer.process_group = group`` for one layer or :func:`bind_process_group` for a whole model. An
object built with ``process_group=None`` keeps None both ways (the default group wherever it is
loaded). Caches derived from the group (plans, a resolved
:class:`~hpattn_dist.comm.groups.GroupInfo`) are neither copied nor pickled: they are rebuilt on
the next call.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator, Optional

import torch.distributed as dist
import torch.nn as nn

__all__ = ["GroupBound", "UnboundGroup", "bind_process_group"]


class UnboundGroup:
    """Stands where a pickled object's process group was (Note [copying a layer bound to a group])."""

    def __repr__(self) -> str:
        return "<process group dropped by pickling>"


def _is_group(value: Any) -> bool:
    return dist.is_available() and isinstance(value, dist.ProcessGroup)


class GroupBound:
    """Mixin for modules and hook objects that hold a process group in an attribute.

    ``copy.deepcopy`` shares every ProcessGroup attribute; pickling replaces each by an
    :class:`UnboundGroup`. Attributes named in the class attribute ``_hp_transient`` (caches) are
    left out of both: the class must give them a default (e.g. ``None``) and rebuild them lazily.
    """

    _hp_transient: tuple[str, ...] = ()

    def __deepcopy__(self, memo: dict) -> Any:
        state = vars(self)
        for value in state.values():
            if _is_group(value):
                memo[id(value)] = value
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in state.items():
            if key not in self._hp_transient:
                new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def __getstate__(self) -> dict:
        parent = getattr(super(), "__getstate__", None)
        state = parent() if parent is not None else None
        state = dict(vars(self) if state is None else state)
        for key in self._hp_transient:
            state.pop(key, None)
        return {k: UnboundGroup() if _is_group(v) else v for k, v in state.items()}


def _bindable(model: nn.Module) -> Iterator[Any]:
    """Every module of ``model`` and every hook object registered on one."""
    for module in model.modules():
        yield module
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for hook in hooks.values():
                yield getattr(hook, "__self__", hook)  # a bound method's object


def bind_process_group(model: nn.Module, process_group: Optional[dist.ProcessGroup]) -> int:
    """Give every object of ``model`` whose group was dropped by pickling ``process_group``.

    After ``torch.load`` (or unpickling) of a model converted by
    :func:`hpattn_dist.convert_spatial_attention` or idx-flow's ``convert_model``, every layer
    raises until this is called (Note [copying a layer bound to a group]). Layers still bound to
    a group, and layers built with ``process_group=None``, are left as they are.

    Args:
        model: the unpickled model.
        process_group: the sequence-parallel group (None: the default group).

    Returns:
        How many attributes were bound.
    """
    count = 0
    for obj in _bindable(model):
        for key, value in list(vars(obj).items()) if hasattr(obj, "__dict__") else ():
            if isinstance(value, UnboundGroup):
                setattr(obj, key, process_group)
                count += 1
    return count
