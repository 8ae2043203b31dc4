"""The group model every collective of this library takes: :class:`GroupInfo`.

The library never initialises a process group; it reads the one it is given. ``group=None`` means
WORLD, or a single process when ``torch.distributed`` is not initialised (so the layers, the
strategies and ``healpix.scatter`` / ``gather`` also run in a plain single-device script). Every
collective (ring exchange, all-to-all, scatter / gather, the metadata all-gather) resolves its
group here, waits with the exchange timeout (:mod:`hpattn_dist.comm.waits`) and reports its bytes
to :mod:`hpattn_dist.comm.counters`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["GroupInfo", "comm_device_for", "nbytes", "offsets", "resolve_group"]

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


def comm_device_for(backend: Optional[str], device: torch.device) -> torch.device:
    """Where a tensor must be to take part in a collective of ``backend`` (None: no group).

    NCCL communicates CUDA tensors only: a tensor on the CPU goes to the current CUDA device
    (``torch.device("cuda")``). Every other backend (gloo) communicates from the CPU.
    """
    if backend == "nccl":
        return device if device.type == "cuda" else torch.device("cuda")
    return torch.device("cpu")


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
    def backend(self) -> Optional[str]:
        """The backend name (``"gloo"``, ``"nccl"``, ...), or None without a group."""
        return None if self.group is None else str(dist.get_backend(self.group))

    def global_rank(self, group_rank: int) -> int:
        """Global rank of ``group_rank`` (``isend``/``irecv`` peers are global ranks)."""
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def comm_device(self, device: torch.device) -> torch.device:
        """Where tensors of this group's collectives live: :func:`comm_device_for`."""
        return comm_device_for(self.backend, device)

    def describe_rank(self, group_rank: int) -> str:
        """``"group rank 1 (global rank 3)"``, or ``"rank 1"`` when the two coincide."""
        global_rank = self.global_rank(group_rank)
        if global_rank == group_rank:
            return f"rank {group_rank}"
        return f"group rank {group_rank} (global rank {global_rank})"


def resolve_group(group: "Optional[dist.ProcessGroup] | GroupInfo", name: str = "group") -> GroupInfo:
    """Resolve ``group`` (None = WORLD; a :class:`GroupInfo` is returned as it is).

    Raises:
        ValueError: this process is not a member of ``group``, or a group was given but
            torch.distributed is not initialised.
    """
    if isinstance(group, GroupInfo):
        return group
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
