"""Reading this rank's shard of a HEALPix variable from a zarr store, one chunk at a time.

Legend: N = 12 * nside**2 cells, P ranks, r this rank, ``[start_r, stop_r)`` its NESTED range
(:func:`hpattn_dist.healpix.shard_bounds`), N_r = stop_r - start_r, c cells per chunk of the
store, ``*rest`` the variable's other dimensions (the time dimension selected away when ``time`` is
given).

Note [reading a shard]
~~~~~~~~~~~~~~~~~~~~~~
The variable's last dimension is the cells, stored in NESTED or RING order (Note [store
conventions] in :mod:`hpattn_dist.io.grid`). The result ``[*rest, N_r]`` is allocated once and
filled chunk by chunk: each read asks zarr for a region inside ONE chunk of the store (zarr
decodes that chunk, copies the region out, and drops it), so a rank holds its shard plus O(one
chunk) however the shard and the chunks align. A plain slice over the whole range would be
simpler, but zarr 3 reads the chunks of one selection concurrently and holds them all at once
(several times the shard for a RING store, whose chunks a rank's pixels touch sparsely).

* NESTED store: the range is one contiguous slice, read as the pieces that fall into each chunk.
* RING store: the rank's NESTED pixels map to scattered RING positions. Which chunks they touch
  is found by converting the range one chunk's worth at a time (:func:`hpattn_dist.healpix.nest2ring`); each touched chunk's positions are converted back (``ring2nest``, O(chunk)), the span
  of the rank's positions in that chunk is read, and its rows are scattered into place. Chunks of
  a RING store cover latitude bands, so a rank reads more bytes than its shard (the bands through
  its patches); the reader returns how many were read (:attr:`ShardReader.cells_read`).

Each read also checks the store's cell-id coordinate, when it has one, on the positions it reads:
they must be the positions themselves (a store holding a permuted or partial sky is refused).
"""

from __future__ import annotations

import itertools
import math
import zlib
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from hpattn_dist.comm.agreement import validated_signature
from hpattn_dist.comm.groups import resolve_group
from hpattn_dist.healpix import nest2ring, ring2nest, shard_bounds
from hpattn_dist.io.grid import StoreGrid, find_grid

__all__ = ["ShardReader", "open_store", "read_shard", "resolve_variable"]


def _zarr():
    try:
        import zarr
    except ImportError:  # pragma: no cover - the [io] extra installs it
        raise ImportError("hpattn_dist.io needs zarr: pip install 'hpattn-dist[io]'") from None
    return zarr


def open_store(store: Any, mode: str = "r"):
    """A zarr group from a path, a zarr store or a group (returned as it is)."""
    zarr = _zarr()
    if isinstance(store, zarr.Group):
        return store
    return zarr.open_group(store, mode=mode)


def _variable(group, name: str):
    if not isinstance(name, str) or name not in group:
        raise ValueError(f"the store has no variable {name!r} (it holds {sorted(group.array_keys())})")
    array = group[name]
    if not hasattr(array, "chunks") or len(array.shape) == 0:
        raise ValueError(f"{name!r} is not an array with a cell dimension (shape {getattr(array, 'shape', None)})")
    return array


def _torch_dtype(array, name: str) -> torch.dtype:
    import numpy as np

    try:
        return torch.from_numpy(np.empty(0, dtype=array.dtype.newbyteorder("="))).dtype
    except (TypeError, AttributeError):
        raise ValueError(f"{name!r} has dtype {array.dtype}, which torch cannot hold") from None


def resolve_variable(group, name: str, *, nside: Optional[int] = None, ordering: Optional[str] = None,
                     time: Optional[int] = None):
    """``(array, grid)`` of variable ``name`` after every local check of Note [reading a shard].

    Raises:
        ValueError: no such variable; its cell count is not the grid's ``12 * nside**2`` (or no
            HEALPix count at all); the grid cannot be determined (Note [store conventions]); a
            ``time`` outside the first dimension, or given for a variable with only a cell dim.
    """
    array = _variable(group, name)
    grid = find_grid(group, array, nside=nside, ordering=ordering)
    cells = array.shape[-1]
    if cells != grid.npix:
        raise ValueError(f"{name!r} has {cells} cells along its last dimension (shape {tuple(array.shape)}), "
                         f"which is no HEALPix field of nside {grid.nside} ({grid.npix} cells, from "
                         f"{grid.source}); a partial-sky or regridded variable cannot be sharded")
    dims = getattr(array.metadata, "dimension_names", None) or array.attrs.get("_ARRAY_DIMENSIONS")
    if time is not None:
        if len(array.shape) < 2:
            raise ValueError(f"time={time} was given, but {name!r} has only its cell dimension")
        if isinstance(time, bool) or not isinstance(time, int) or not 0 <= time < array.shape[0]:
            raise ValueError(f"time={time!r} is outside {name!r}'s first dimension"
                             f"{'' if not dims else f' ({dims[0]!r})'} of length {array.shape[0]}")
    _torch_dtype(array, name)
    return array, grid


class ShardReader:
    """Reads rows ``[start, stop)`` (NESTED numbering) of one variable, Note [reading a shard].

    Pure local I/O (no process group): :func:`read_shard` and :class:`~hpattn_dist.io.ShardDataset`
    decide the range. Picklable before its first read (DataLoader workers).

    Args:
        array: the zarr array, cells along its last dimension.
        grid: its :class:`~hpattn_dist.io.grid.StoreGrid`.
        start, stop: the NESTED range to read.
        cell_ids: the store's cell-id array to check on the positions read, or None.
    """

    def __init__(self, array, grid: StoreGrid, start: int, stop: int, cell_ids=None) -> None:
        self.array, self.grid, self.start, self.stop, self.cell_ids = array, grid, start, stop, cell_ids
        self.dtype = _torch_dtype(array, array.path)
        self.cells_read = 0
        self._ring_chunks: Optional[list[int]] = None

    @property
    def cell_chunk(self) -> int:
        return self.array.chunks[-1]

    def read(self, time: Optional[int] = None) -> Tensor:
        """``[*rest, stop - start]`` (``rest`` without the first dimension when ``time`` is given)."""
        lead = self.array.shape[1:-1] if time is not None else self.array.shape[:-1]
        out = torch.empty((*lead, self.stop - self.start), dtype=self.dtype)
        self.cells_read = 0
        if self.stop <= self.start:
            return out
        spans = self._nested_spans() if self.grid.ordering == "NESTED" else self._ring_spans()
        for lo, hi, src, dst in spans:
            self._check_cell_ids(lo, hi)
            for lead_sel in self._lead_blocks(time):
                region = self.array[(*lead_sel, slice(lo, hi))]  # inside one chunk of the store
                block = torch.from_numpy(region)
                out_sel = lead_sel[1:] if time is not None else lead_sel
                if src is None:
                    out[(*out_sel, slice(dst, dst + hi - lo))] = block
                else:
                    out[(*out_sel, dst)] = block[..., src]
                del region, block
            self.cells_read += hi - lo
        return out

    def _lead_blocks(self, time: Optional[int]):
        """Selections of the dimensions before the cells, one store chunk each."""
        shape, chunks = self.array.shape[:-1], self.array.chunks[:-1]
        ranges = [[slice(i, min(i + c, n)) for i in range(0, n, c)] for n, c in zip(shape, chunks)]
        if time is not None:
            ranges[0] = [time]
        return itertools.product(*ranges)

    def _nested_spans(self):
        c = self.cell_chunk
        first = self.start // c * c
        for c0 in range(first, self.stop, c):
            lo, hi = max(self.start, c0), min(self.stop, c0 + c)
            yield lo, hi, None, lo - self.start

    def _ring_spans(self):
        nside, c = self.grid.nside, self.cell_chunk
        if self._ring_chunks is None:
            touched = torch.zeros(math.ceil(self.grid.npix / c), dtype=torch.bool)
            for a in range(self.start, self.stop, c):  # O(chunk) indices at a time
                ring = nest2ring(nside, torch.arange(a, min(self.stop, a + c)))
                touched[ring // c] = True
            self._ring_chunks = touched.nonzero().flatten().tolist()
        for chunk in self._ring_chunks:
            positions = torch.arange(chunk * c, min((chunk + 1) * c, self.grid.npix))
            nest = ring2nest(nside, positions)
            mine = (nest >= self.start) & (nest < self.stop)
            positions, nest = positions[mine], nest[mine]
            lo, hi = int(positions[0]), int(positions[-1]) + 1
            yield lo, hi, positions - lo, nest - self.start

    def _check_cell_ids(self, lo: int, hi: int) -> None:
        if self.cell_ids is None:
            return
        c = self.cell_ids.chunks[0]
        for a in range(lo // c * c, hi, c):
            a0, b0 = max(a, lo), min(a + c, hi)
            ids = torch.from_numpy(self.cell_ids[a0:b0]).to(torch.int64)
            if not torch.equal(ids, torch.arange(a0, b0)):
                bad = int((ids != torch.arange(a0, b0)).nonzero()[0])
                raise ValueError(f"the store's cell ids {self.cell_ids.path!r} are not the cells in storage "
                                 f"order: position {a0 + bad} holds cell {int(ids[bad])} (a permuted or "
                                 "partial sky cannot be sharded by position)")


def _cell_ids_array(group, grid: StoreGrid):
    if grid.cell_ids is None:
        return None
    ids = group[grid.cell_ids]
    if len(ids.shape) != 1 or ids.shape[0] != grid.npix:
        raise ValueError(f"the store's cell ids {grid.cell_ids!r} have shape {tuple(ids.shape)}, not "
                         f"({grid.npix},) for nside {grid.nside}: a partial sky cannot be sharded")
    return ids


def _crc(text: str) -> int:
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def read_shard(
    store: Any,
    name: str,
    group: Optional[dist.ProcessGroup] = None,
    *,
    time: Optional[int] = None,
    nside: Optional[int] = None,
    ordering: Optional[str] = None,
) -> Tensor:
    """Read this rank's contiguous NESTED range of a HEALPix variable from a zarr store.

    Rank r of ``group`` gets cells ``shard_bounds(N, P)[r]`` in NESTED order, read chunk by chunk
    (Note [reading a shard]): from a NESTED store one slice, from a RING store (healpy's default)
    only the rows it owns, gathered through the NESTED -> RING index. Peak memory: the shard plus
    O(one chunk). The grid (nside, ordering) comes from the store's xdggs or easygems attributes
    or from the arguments (Note [store conventions] in :mod:`hpattn_dist.io.grid`).

    The ranks agree on the outcome in one small all-gather (Note [fail together]): a store that
    is unreadable, holds no HEALPix field, names no ordering, or that ranks see differently (a
    different ``name``, ``time``, shape, dtype or grid on some rank) raises the same error on
    every rank.

    Args:
        store: a path or URL zarr opens, a zarr store, or a ``zarr.Group``.
        name: the variable; its LAST dimension is the cells, e.g. ``(time, channel, cell)``.
        group: the sequence-parallel group (None: WORLD, or a single process).
        time: index into the variable's first dimension (None: read every index).
        nside, ordering: for stores without the attributes; must agree with them otherwise.

    Returns:
        ``[*rest, N_r]``: the variable's other dimensions (the first one dropped when ``time`` is
        given) and this rank's cells, in the store's dtype. For the layers' ``[B, N_r, C]``
        layout: ``x.movedim(-1, -2)`` (e.g. ``[C, N_r] -> [N_r, C]``, then ``[None]``).

    Raises:
        ValueError: on every rank, as above.
        ImportError: zarr is not installed (``pip install 'hpattn-dist[io]'``).
    """
    info = resolve_group(group)
    with validated_signature(info, "read_shard") as sig:
        zgroup = open_store(store)
        array, grid = resolve_variable(zgroup, name, nside=nside, ordering=ordering, time=time)
        start, stop = shard_bounds(grid.npix, info.world_size)[info.rank]
        out = ShardReader(array, grid, start, stop, _cell_ids_array(zgroup, grid)).read(time)
        sig.set({"name": _crc(name), "nside": grid.nside, "ring": int(grid.ordering == "RING"),
                 "time": -1 if time is None else time, "ndim": out.dim(),
                 "rest": _crc(str(tuple(out.shape[:-1]))), "dtype": _crc(str(out.dtype))},
                stop - start, kind="read_shard")
    return out

