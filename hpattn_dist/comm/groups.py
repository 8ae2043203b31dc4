"""Process-group handling shared by every strategy: resolve, validate, agree on shapes.

The library never initialises a process group; it reads the one it is given. ``group=None`` means
WORLD, or a single process when ``torch.distributed`` is not initialised (so the layers also run
in a plain single-device script).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

from hpattn_dist.comm.counters import record


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

    def global_rank(self, group_rank: int) -> int:
        """Global rank of ``group_rank`` (``isend``/``irecv`` peers are global ranks)."""
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def comm_device(self, device: torch.device) -> torch.device:
        """Where small bookkeeping tensors must live: the CUDA device for NCCL, else CPU."""
        if self.group is not None and dist.get_backend(self.group) == "nccl":
            return device
        return torch.device("cpu")


def resolve_group(group: Optional[dist.ProcessGroup], name: str = "group") -> GroupInfo:
    """Resolve ``group`` (None = WORLD) to a :class:`GroupInfo`.

    Raises:
        ValueError: this process is not a member of ``group``.
    """
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


def all_gather_ints(values: Sequence[int], info: GroupInfo, device: torch.device) -> list[tuple[int, ...]]:
    """Every rank's ``values`` (same length on all ranks), in group-rank order.

    One small ``all_gather`` of an int64 vector; with one rank, no communication.
    """
    if info.world_size == 1:
        return [tuple(int(v) for v in values)]
    local = torch.tensor(list(values), dtype=torch.int64, device=info.comm_device(device))
    gathered = [torch.empty_like(local) for _ in range(info.world_size)]
    dist.all_gather(gathered, local, group=info.group)
    record("all_gather.meta", local.numel() * local.element_size())
    return [tuple(int(v) for v in t.tolist()) for t in gathered]


_DTYPE_CODES = {
    torch.float64: 1, torch.float32: 2, torch.float16: 3, torch.bfloat16: 4,
}


def dtype_code(dtype: torch.dtype) -> int:
    """A small integer naming a floating dtype, for cross-rank comparison (0 = other)."""
    return _DTYPE_CODES.get(dtype, 0)


def agree_on_shapes(
    info: GroupInfo,
    device: torch.device,
    shared: dict[str, int],
    local_len: Union[int, Sequence[int]],
    what: str,
) -> list:
    """Check that every rank passed the same ``shared`` values; return every rank's ``local_len``.

    ``shared`` maps names (e.g. ``"B"``, ``"H"``, ``"D"``, ``"dtype"``) to this rank's values;
    ``local_len`` is this rank's shard length (which may differ), or a tuple of such per-rank
    values, in which case a list of tuples is returned. One ``all_gather`` per call.

    Raises:
        ValueError: on EVERY rank, when ranks disagree on any shared value; the message lists each
            rank's values so the odd one out is obvious.
    """
    per_rank = (local_len,) if isinstance(local_len, int) else tuple(local_len)
    rows = all_gather_ints([*shared.values(), *per_rank], info, device)
    names = list(shared)
    first = rows[0][: len(names)]
    if any(row[: len(names)] != first for row in rows):
        table = "; ".join(
            f"rank {r}: " + ", ".join(f"{n}={v}" for n, v in zip(names, row)) for r, row in enumerate(rows)
        )
        raise ValueError(f"{what}: ranks of the process group disagree on {', '.join(names)}: {table}")
    tails = [row[len(names):] for row in rows]
    return [t[0] for t in tails] if isinstance(local_len, int) else tails


def offsets(sizes: Sequence[int]) -> list[int]:
    """Exclusive prefix sums: the global start index of each rank's shard."""
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


def nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()
