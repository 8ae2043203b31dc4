"""A ``torch.utils.data.Dataset`` of this rank's shards of a HEALPix store, by time index.

Note [shards in a DataLoader]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
DataLoader workers are separate processes with no process group, and they must not use one. So
everything collective happens once, in the constructor, in the main process: the ranks open the
store, resolve every variable's grid (Note [store conventions]), check it and agree on it in one
all-gather (Note [fail together]), and each rank fixes its range ``shard_bounds(N, P)[r]``.
After that, ``dataset[t]`` is local I/O (:class:`~hpattn_dist.io.read.ShardReader`, Note
[reading a shard]): the store is opened again in whichever process reads (a worker gets the
dataset pickled or forked), and nothing in ``__getitem__`` talks to another rank.

Every rank of the sequence-parallel group must read the SAME time indices in the same order (they
hold pieces of one sample): give each rank the same sampler (same ``shuffle`` seed, e.g.
``torch.Generator().manual_seed(seed)``), never a ``DistributedSampler`` over the SP group (that
one hands ranks DIFFERENT samples; it belongs to data-parallel replicas, each its own SP group).
With ``return_index=True`` each item carries its time index, so a training loop can check that
its ranks agree (:func:`hpattn_dist.io.check_same_index`).
"""

from __future__ import annotations

import os
import zlib
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from hpattn_dist.comm.agreement import validated_signature
from hpattn_dist.comm.groups import resolve_group
from hpattn_dist.healpix import shard_bounds
from hpattn_dist.io.read import ShardReader, _cell_ids_array, open_store, resolve_variable

__all__ = ["ShardDataset", "check_same_index"]


def _crc(text: str) -> int:
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


class ShardDataset(torch.utils.data.Dataset):
    """This rank's shards of ``names`` at each index of their first (time) dimension.

    Built collectively in the main process (Note [shards in a DataLoader]); items are read
    without any communication, so the dataset works with ``DataLoader(num_workers > 0)``.

    Args:
        store: a path zarr opens, a zarr store or a ``zarr.Group``.
        names: one variable name, or several (all on the same grid with the same time length);
            each is ``(time, *rest, cell)``.
        group: the sequence-parallel group (None: WORLD, or a single process).
        nside, ordering: for stores without the grid attributes (Note [store conventions]).
        return_index: items are ``(t, data)`` instead of ``data``.

    Items: ``dataset[t]`` is the tensor ``[*rest, N_r]`` (``names`` a str) or a dict name -> tensor
    (a sequence of names, also of one);
    the default collate stacks a batch to ``[B, *rest, N_r]``.

    Attributes:
        start, stop: this rank's NESTED range; nside, ordering: the store's grid.

    Raises:
        ValueError: (on every rank) what :func:`~hpattn_dist.io.read_shard` refuses, variables
            on different grids or of different time lengths, ranks that disagree.
    """

    def __init__(self, store: Any, names: Sequence[str] | str, group: Optional[dist.ProcessGroup] = None, *,
                 nside: Optional[int] = None, ordering: Optional[str] = None,
                 return_index: bool = False) -> None:
        self.names = (names,) if isinstance(names, str) else tuple(names)
        self._bare = isinstance(names, str)
        info = resolve_group(group)
        with validated_signature(info, "ShardDataset") as sig:
            if not self.names:
                raise ValueError("ShardDataset: no variable names given")
            zgroup = open_store(store)
            grids, lengths = [], []
            for name in self.names:
                array, grid = resolve_variable(zgroup, name, nside=nside, ordering=ordering)
                if len(array.shape) < 2:
                    raise ValueError(f"ShardDataset: {name!r} has no time dimension (shape {tuple(array.shape)})")
                grids.append(grid)
                lengths.append(array.shape[0])
            if len({(g.nside, g.ordering) for g in grids}) > 1 or len(set(lengths)) > 1:
                raise ValueError("ShardDataset: the variables differ in grid or time length: " + ", ".join(
                    f"{n!r}: nside {g.nside} {g.ordering}, {t} times" for n, g, t in zip(self.names, grids, lengths)))
            self.grid = grids[0]
            self.start, self.stop = shard_bounds(self.grid.npix, info.world_size)[info.rank]
            sig.set({"names": _crc(",".join(self.names)), "nside": self.grid.nside,
                     "ring": int(self.grid.ordering == "RING"), "length": lengths[0]},
                    self.stop - self.start, kind="ShardDataset")
        self._store = store
        self._length = lengths[0]
        self.return_index = return_index
        self._readers: Optional[dict[str, ShardReader]] = None
        self._pid = -1

    @property
    def nside(self) -> int:
        return self.grid.nside

    @property
    def ordering(self) -> str:
        return self.grid.ordering

    def __len__(self) -> int:
        return self._length

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_readers"], state["_pid"] = None, -1  # reopened by the process that reads
        return state

    def _open(self) -> dict[str, ShardReader]:
        if self._readers is None or self._pid != os.getpid():
            zgroup = open_store(self._store)
            ids = _cell_ids_array(zgroup, self.grid)
            self._readers = {n: ShardReader(zgroup[n], self.grid, self.start, self.stop, ids) for n in self.names}
            self._pid = os.getpid()
        return self._readers

    def __getitem__(self, index: int) -> Any:
        if isinstance(index, torch.Tensor):
            index = int(index)
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(f"ShardDataset index must be an int, got {type(index).__name__}")
        t = index + self._length if index < 0 else index
        if not 0 <= t < self._length:
            raise IndexError(f"time index {index} out of range for {self._length} times")
        data = {n: r.read(t) for n, r in self._open().items()}
        item: Any = data[self.names[0]] if self._bare else data
        return (t, item) if self.return_index else item


def check_same_index(index: Tensor | int | Sequence[int], group: Optional[dist.ProcessGroup] = None) -> None:
    """Raise on every rank unless all ranks of ``group`` hold the same time indices, in order.

    One small all-gather (Note [fail together]): for a training loop that wants to assert that its
    sequence-parallel ranks read pieces of the same samples (Note [shards in a DataLoader]).

    Raises:
        ValueError: on every rank, showing each rank's first indices, when they differ.
    """
    values = torch.as_tensor(index, dtype=torch.int64).reshape(-1).tolist()
    info = resolve_group(group)
    with validated_signature(info, "check_same_index") as sig:
        shown = values[:20] + [-1] * (20 - min(20, len(values)))
        sig.set({"count": len(values), "crc": _crc(",".join(map(str, values))),
                 **{f"t{i}": v for i, v in enumerate(shown)}}, 0, kind="check_same_index")
