"""The group model every collective of this library takes: :class:`GroupInfo`.

The library never initialises a process group; it reads the one it is given. ``group=None`` means
WORLD, or a single process when ``torch.distributed`` is not initialised (so the layers, the
strategies and ``healpix.scatter`` / ``gather`` also run in a plain single-device script). Every
collective (ring exchange, all-to-all, scatter / gather, the metadata all-gather) resolves its
group here, waits with the exchange timeout (:mod:`hpattn_dist.comm.waits`) and reports its bytes
to :mod:`hpattn_dist.comm.counters`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from hpattn_dist.comm.binding import UnboundGroup

__all__ = ["GroupInfo", "backend_config", "comm_device_for", "cpu_side_group", "meta_device_for", "nbytes",
           "offsets", "parse_backend_config", "resolve_group"]

# Note [init styles]
# A process group may be made in several styles, and what it can communicate depends on the
# backends registered PER DEVICE TYPE, which ``dist.get_backend`` does not say: a bare
# ``init_process_group()`` reports "undefined" (it registers gloo for the CPU, and NCCL for CUDA
# on a CUDA build), torchtitan's "cuda:nccl,cpu:gloo" reports that string, "gloo" serves CPU and
# CUDA tensors alike, "nccl" CUDA only. So the library reads the group's backend CONFIG
# (:func:`backend_config`: ``{device type: backend}``) and decides per tensor:
#
# * data (:func:`comm_device_for`) travels on its own device when a backend other than gloo serves
#   that device type (CUDA data on NCCL, never through host memory and gloo); else from the CPU
#   when the group has a CPU backend (gloo; CUDA data is staged through the host); else, for an
#   NCCL-only group, on the current CUDA device;
# * the per-call metadata ints (:func:`meta_device_for`, Note [agreement off the device] in
#   ``comm/agreement.py``) live on the CPU whenever a CPU backend is registered, whatever the
#   data's device: no host-device copy and no device synchronisation for them; only an NCCL-only
#   group carries them on the GPU;
# * the ring groups its sends and receives (Note [p2p grouping] in ``comm/ring.py``) by the backend
#   that serves the exchanged tensors' device type.

# Note [CPU side group]
# An NCCL-only group (``init_process_group("nccl")``, or a ``new_group(backend="nccl")``) has no CPU
# backend, so the per-call metadata row would travel on the GPU: a host-to-device copy and a
# device-to-host read on every call (Note [agreement off the device] in ``comm/agreement.py``).
# So the first metadata collective over such a group creates a gloo group over the same ranks
# (:func:`cpu_side_group`), once per group and cached, and every later row travels there as host
# ints. It is created collectively by the group's members only
# (``new_group(ranks, backend="gloo", use_local_synchronization=True)``: ranks outside the group
# do not take part and are not waited for), at their first collective over the group, which they
# reach in the same order as that group's collectives. torch names such a group from its ranks
# and the number of groups the process already holds, which must then be equal on the members
# (a rank that made more groups than its peers would name it differently and wait forever); so
# the members first compare that number, once, on the group itself, and if it differs (or gloo
# is missing) the group keeps its metadata on the GPU (cached too: asked once).
# ``HPATTN_CPU_SIDE_GROUP=0`` (the same on every rank) turns the side group off.

# Note [groups resolved per call]
# A layer, a converted module or an exchanger built with ``process_group=None`` keeps None and
# resolves it at EVERY call (:func:`resolve_group`: a dictionary lookup), never a GroupInfo or
# sub-group taken at construction: after ``destroy_process_group()`` and a new
# ``init_process_group`` the default group is a new object, which such a model then follows,
# while a group pinned at conversion raised "not registered" / "not initialized in the world
# group map". What is derived from a group and cached (the hybrid sub-groups,
# ``mesh.hybrid_groups_for``; halo plans, keyed by this process's rank) is keyed by the group it
# was derived from. An explicit ``process_group`` is the caller's: after a re-init they pass the
# new one.


def parse_backend_config(config: str) -> dict[str, str]:
    """``"cuda:nccl,cpu:gloo"`` -> ``{"cuda": "nccl", "cpu": "gloo"}``; a bare name serves the
    device types torch lists for it (``dist.Backend.backend_capability``: ``"nccl"`` ->
    ``{"cuda": "nccl"}``), or every type when torch does not know it (``{"*": name}``). Names
    lower-cased (Note [init styles])."""
    out: dict[str, str] = {}
    for part in str(config).lower().replace(" ", "").split(","):
        if part:
            device, _, name = part.rpartition(":")
            devices = [device] if device else dist.Backend.backend_capability.get(name, ["*"])
            out.update((d, name) for d in devices)
    return out


def _backend_of(backends: dict[str, str], device_type: str) -> Optional[str]:
    return backends.get(device_type, backends.get("*"))


def comm_device_for(backends: dict[str, str], device: torch.device) -> torch.device:
    """Where a data tensor on ``device`` takes part in a collective of a group whose backends are
    ``backends`` (:func:`backend_config`; empty: no group). Note [init styles].

    Raises:
        ValueError: the group has no backend for ``device``'s type, the CPU or CUDA.
    """
    if not backends:
        return torch.device("cpu")
    own = _backend_of(backends, device.type)
    if own is not None and own != "gloo":
        return device
    if _backend_of(backends, "cpu") is not None:
        return torch.device("cpu")
    if _backend_of(backends, "cuda") is not None:
        return torch.device("cuda")
    raise ValueError(f"the process group has no backend for {device.type} tensors, the CPU or CUDA "
                     f"(its backends: {backends})")


def meta_device_for(backends: dict[str, str], device: torch.device) -> torch.device:
    """Where the per-call metadata ints of data on ``device`` travel: the CPU whenever the group
    has a CPU backend, else the data's communication device (Note [init styles])."""
    if not backends or _backend_of(backends, "cpu") is not None:
        return torch.device("cpu")
    return comm_device_for(backends, device)


def backend_config(group: Optional[dist.ProcessGroup]) -> dict[str, str]:
    """``{device type: backend name}`` registered for ``group`` (None: WORLD), read from
    ``dist.get_backend_config`` (a dictionary lookup; Note [init styles])."""
    try:
        config = dist.get_backend_config(group)
    except (AttributeError, RuntimeError, ValueError):  # a backend that keeps no config
        config = str(dist.get_backend(group))
    return parse_backend_config(config)


@dataclass(frozen=True)
class GroupInfo:
    """This process's view of a process group.

    Attributes:
        group: the ProcessGroup, or None for a single uninitialised process.
        rank: this process's rank inside ``group``.
        world_size: number of ranks ``P`` in ``group``.
    """

    group: Optional[dist.ProcessGroup]
    rank: int
    world_size: int

    @property
    def backends(self) -> dict[str, str]:
        """``{device type: backend name}`` (:func:`backend_config`); empty without a group."""
        return {} if self.group is None else backend_config(self.group)

    def backend_for(self, device: torch.device) -> Optional[str]:
        """The backend that communicates tensors on ``device`` (``"gloo"``, ``"nccl"``, ...)."""
        return _backend_of(self.backends, self.comm_device(device).type)

    def global_rank(self, group_rank: int) -> int:
        """Global rank of ``group_rank`` (``isend``/``irecv`` peers are global ranks)."""
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def comm_device(self, device: torch.device) -> torch.device:
        """Where data on ``device`` takes part in this group's collectives: :func:`comm_device_for`."""
        return comm_device_for(self.backends, device)

    def meta_device(self, device: torch.device) -> torch.device:
        """Where the metadata ints of data on ``device`` travel: :func:`meta_device_for`."""
        return meta_device_for(self.backends, device)

    def describe_rank(self, group_rank: int) -> str:
        """``"group rank 1 (global rank 3)"``, or ``"rank 1"`` when the two coincide."""
        global_rank = self.global_rank(group_rank)
        if global_rank == group_rank:
            return f"rank {group_rank}"
        return f"group rank {group_rank} (global rank {global_rank})"


_SIDE_GROUPS: dict[int, tuple[dist.ProcessGroup, Optional[dist.ProcessGroup]]] = {}
"""Per group (by identity; the group is kept so that its id is not reused): its CPU side group,
or None where it has none (Note [CPU side group])."""


def cpu_side_group(info: "GroupInfo") -> Optional[dist.ProcessGroup]:
    """A gloo group over ``info``'s ranks for the metadata of a group without a CPU backend,
    created by the group's members at their first call and cached; None where the group has a
    CPU backend, or no side group can be made (Note [CPU side group]).

    Collective over ``info``'s members on the first call for a group without a CPU backend.
    """
    group = info.group
    if group is None or info.world_size == 1 or _backend_of(info.backends, "cpu") is not None:
        return None
    cached = _SIDE_GROUPS.get(id(group))
    if cached is not None and cached[0] is group:
        return cached[1]
    side = None
    if os.environ.get("HPATTN_CPU_SIDE_GROUP", "1") != "0" and dist.is_gloo_available():
        ranks = [info.global_rank(r) for r in range(info.world_size)]
        try:
            held = len(dist.distributed_c10d._world.pg_names)  # what torch names the group from
        except AttributeError:  # a torch that keeps it elsewhere: no side group
            held = -1
        counts: list = [None] * info.world_size
        dist.all_gather_object(counts, held, group=group)  # once per group, on the group itself
        if held >= 0 and len(set(counts)) == 1:
            side = dist.new_group(ranks, backend="gloo", use_local_synchronization=True,
                                  group_desc="hpattn_dist metadata")
    _SIDE_GROUPS[id(group)] = (group, side)
    return side


def resolve_group(group: "Optional[dist.ProcessGroup] | GroupInfo", name: str = "group") -> GroupInfo:
    """Resolve ``group`` (None = WORLD; a :class:`GroupInfo` is returned as it is).

    Raises:
        ValueError: this process is not a member of ``group``, or a group was given but
            torch.distributed is not initialised.
        RuntimeError: ``group`` is the marker a pickled layer holds in place of its group
            (Note [copying a layer bound to a group] in :mod:`hpattn_dist.comm.binding`).
    """
    if isinstance(group, GroupInfo):
        return group
    if isinstance(group, UnboundGroup):
        raise RuntimeError(
            f"this layer was unpickled without its process group (a ProcessGroup cannot be "
            f"pickled; {name} is a {group!r}): set layer.process_group = <the sequence-parallel "
            "group> (or None for the default group), or call "
            "hpattn_dist.comm.binding.bind_process_group(model, group) on the whole model, "
            "before calling it"
        )
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError(f"{name} was given but torch.distributed is not initialised")
        return GroupInfo(None, 0, 1)
    group = dist.group.WORLD if group is None else group
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of the {name} passed in"
        )
    return GroupInfo(group, rank, dist.get_world_size(group))


def offsets(sizes: Sequence[int]) -> list[int]:
    """Exclusive prefix sums: the global start index of each rank's shard."""
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


def nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()
