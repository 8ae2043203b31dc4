"""Writing a sharded HEALPix field to a zarr store: each rank its own region, nothing gathered.

Legend as in :mod:`hpattn_dist.io.read`; c cells per chunk of the output store.

Note [writing a shard]
~~~~~~~~~~~~~~~~~~~~~~
The output store holds the variable in NESTED order, ``(time, *rest, cell)`` (``time`` only when
the caller gives one), with the cell-id coordinate and the grid mapping of both conventions of
Note [store conventions], so xarray opens it as an ordinary dataset and xdggs / easygems read its
grid. Group rank 0 creates (or extends along time) the arrays and consolidates the metadata; the
other ranks wait for that in the call's second agreement. Then every rank writes, in parallel.

Two ranks must never write parts of the same chunk (of a sharded zarr 3 array: the same shard): a
partial write is a read-modify-write of the whole chunk, and two of them at once lose one rank's rows. So a chunk is written, whole, by the
rank whose range holds its FIRST cell. A rank's rows before its first chunk boundary belong to
the chunk an earlier rank owns; they travel there in one ``all_to_all`` of at most one chunk's
rows per rank (counted as ``io.write.boundary``): no rank ever holds more than its shard and one
chunk, and no field is gathered. Every write touches one chunk (the other dimensions are walked
chunk by chunk too), for the reason of Note [reading a shard]. The call's last agreement is its
barrier: when ``write_shard`` returns on any rank, every rank's region is in the store.

The cell-id coordinate (``0 .. N - 1``) is written the same way, each rank its chunks.
"""

from __future__ import annotations

import itertools
import math
import warnings
import zlib
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from hpattn_dist.comm.agreement import validated_signature
from hpattn_dist.comm.all_to_all import all_to_all_flat
from hpattn_dist.comm.groups import GroupInfo, offsets, resolve_group
from hpattn_dist.healpix import check_nside, npix2nside, shard_sizes
from hpattn_dist.io.grid import CELL_DIM, CELL_IDS, CRS, find_grid, grid_attributes
from hpattn_dist.io.read import _zarr, open_store

__all__ = ["write_shard"]

#: Default bytes per chunk of a variable the writer creates (cells rounded to a power of two).
CHUNK_BYTES = 1 << 21


def _crc(text: str) -> int:
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def _numpy_dtype(t: Tensor):
    if t.dtype in (torch.bfloat16, torch.complex32) or t.dtype.is_complex:
        raise ValueError(f"write_shard: a {t.dtype} tensor has no zarr dtype; cast it first (e.g. .float())")
    return torch.empty(0, dtype=t.dtype).numpy().dtype


def _default_chunk(npix: int, rest: tuple[int, ...], itemsize: int) -> int:
    cells = max(1, CHUNK_BYTES // max(1, math.prod(rest) * itemsize))
    return min(npix, 1 << (cells.bit_length() - 1))


def _owner(bounds: list[tuple[int, int]], cell: int) -> int:
    return next(r for r, (a, b) in enumerate(bounds) if a <= cell < b)


def _boundary_plan(sizes: list[int], c: int) -> list[list[int]]:
    """``send[s][o]``: the rows rank s sends to rank o, its rows before its first chunk boundary,
    which go to the owner of that chunk (Note [writing a shard]); the same table on every rank."""
    starts = offsets(sizes)
    bounds = [(s, s + n) for s, n in zip(starts, sizes)]
    p = len(sizes)
    send = [[0] * p for _ in range(p)]  # send[s][o]: rows rank s sends to rank o
    for s, (a, b) in enumerate(bounds):
        if b > a and a % c:
            send[s][_owner(bounds, a - a % c)] = min(b, a - a % c + c) - a
    return send


def _create(zgroup, name: str, shape: tuple[int, ...], dtype, chunks: tuple[int, ...], time: bool,
            nside: int) -> bool:
    """Rank 0: the variable, its cell ids and grid mapping, attributes of both conventions; whether
    the cell ids are new (then every rank writes its part of them)."""
    xdggs, easygems = grid_attributes(nside, "NESTED")
    npix = shape[-1]
    new_ids = CELL_IDS not in zgroup
    if new_ids:
        zgroup.create_array(CELL_IDS, shape=(npix,), dtype="int64", chunks=(chunks[-1],),
                            dimension_names=(CELL_DIM,), attributes=xdggs)
    else:
        ids = zgroup[CELL_IDS]
        if tuple(ids.shape) != (npix,) or {k: ids.attrs.get(k) for k in xdggs} != xdggs:
            raise ValueError(f"write_shard: the store's {CELL_IDS!r} ({tuple(ids.shape)}, {dict(ids.attrs)}) "
                             f"describe another grid than this NESTED field of nside {nside}")
    if CRS not in zgroup:
        crs = zgroup.create_array(CRS, shape=(), dtype="int8", attributes=easygems, fill_value=0)
        crs[...] = 0
    rest_names = tuple(f"{name}_dim{i}" for i in range(len(shape) - 1 - int(time)))
    zgroup.create_array(
        name, shape=shape, dtype=dtype, chunks=chunks,
        dimension_names=(*(("time",) if time else ()), *rest_names, CELL_DIM),
        attributes={"grid_mapping": CRS, "coordinates": f"{CELL_IDS} {CRS}"},
    )
    return new_ids


def _prepare(store: Any, name: str, rest: tuple[int, ...], dtype, npix: int, time: Optional[int],
             chunk_cells: Optional[int]) -> bool:
    """Rank 0's part: create or check the variable, extend its time dimension, consolidate;
    whether the cell ids are new."""
    zarr = _zarr()
    zgroup = open_store(store, mode="a") if not isinstance(store, zarr.Group) else store
    nside = npix2nside(npix)
    if name in zgroup:
        array = zgroup[name]
        grid = find_grid(zgroup, array)
        want = ((array.shape[0],) if time is not None else ()) + rest + (npix,)
        if grid.ordering != "NESTED" or grid.nside != nside or tuple(array.shape) != want \
                or array.dtype != dtype:
            raise ValueError(f"write_shard: the store's {name!r} is {tuple(array.shape)} {array.dtype} "
                             f"({grid.ordering}, nside {grid.nside}); this write is {want} {dtype} NESTED, "
                             f"nside {nside} (time {time})")
        if time is not None and time >= array.shape[0]:
            array.resize((time + 1, *array.shape[1:]))
        new_ids = False
    else:
        if chunk_cells is None:
            chunk_cells = _default_chunk(npix, rest, dtype.itemsize)
        shape = ((time + 1,) if time is not None else ()) + rest + (npix,)
        chunks = ((1,) if time is not None else ()) + rest + (min(chunk_cells, npix),)
        new_ids = _create(zgroup, name, shape, dtype, chunks, time is not None, nside)
    with warnings.catch_warnings():  # zarr 3 notes that consolidated metadata is outside its v3 spec
        warnings.filterwarnings("ignore", message="Consolidated metadata")
        zarr.consolidate_metadata(zgroup.store, path=zgroup.path or None)
    return new_ids


def _write_unit(array) -> tuple[int, ...]:
    """The smallest region written whole: the chunk, or the shard of a sharded (zarr 3) array,
    whose chunks are rewritten together."""
    return tuple(getattr(array, "shards", None) or array.chunks)


def _write_chunks(array, rows: Tensor, start: int, stop: int, received: Tensor, time: Optional[int],
                  npix: int) -> None:
    """Write the chunks whose first cell lies in ``[start, stop)``, each whole: ``rows``
    ``[*rest, N_r]`` are this rank's cells, ``received`` ``[*rest, m]`` the cells after ``stop``
    of its last chunk."""
    unit = _write_unit(array)
    c = unit[-1]
    first = -(-start // c) * c
    lead_shape = array.shape[1:-1] if time is not None else array.shape[:-1]
    lead_chunks = unit[1:-1] if time is not None else unit[:-1]
    ranges = [[slice(i, min(i + k, n)) for i in range(0, n, k)] for n, k in zip(lead_shape, lead_chunks)]
    for c0 in range(first, stop, c):
        c1 = min(c0 + c, npix)
        data = rows[..., c0 - start:min(c1, stop) - start]
        if c1 > stop:
            data = torch.cat((data, received[..., :c1 - stop]), dim=-1)
        for lead in itertools.product(*ranges):
            region = (*(() if time is None else (time,)), *lead, slice(c0, c1))
            array[region] = data[(*lead, slice(None))].contiguous().numpy()


def _write_cell_ids(ids, start: int, stop: int) -> None:
    c = ids.chunks[0]
    for c0 in range(-(-start // c) * c, stop, c):
        c1 = min(c0 + c, ids.shape[0])
        ids[c0:c1] = torch.arange(c0, c1, dtype=torch.int64).numpy()


def write_shard(
    store: Any,
    name: str,
    tensor: Tensor,
    group: Optional[dist.ProcessGroup] = None,
    *,
    time: Optional[int] = None,
    chunk_cells: Optional[int] = None,
) -> None:
    """Write this rank's shard of a HEALPix field into a zarr store, no rank gathering anything.

    Every rank of ``group`` passes its contiguous NESTED range (the plan of
    :func:`hpattn_dist.healpix.shard_bounds`); the store gets the field in NESTED order with the
    xdggs and easygems attributes (Note [writing a shard]), readable by ``xarray.open_zarr`` as
    a normal HEALPix dataset and by :func:`~hpattn_dist.io.read_shard`. Collective: call it on
    every rank with the same ``name`` and ``time``; it returns once every rank's region is written.

    Args:
        store: a path zarr opens (created if absent), a zarr store or a ``zarr.Group``.
        name: the variable to write (created at the first call; later calls must match it).
        tensor: ``[*rest, N_r]``, this rank's cells last (for a layer's ``[B, N_r, C]`` output,
            ``y[0].movedim(0, -1)`` or ``y.movedim(1, -1)``); any device (copied to the host one
            chunk at a time), a dtype numpy has (not bfloat16).
        group: the sequence-parallel group (None: WORLD, or a single process).
        time: index along a leading time dimension the variable gets (grown as needed), or None
            for a variable without one.
        chunk_cells: cells per chunk when the variable is created (default: about 2 MiB chunks,
            a power of two).

    Raises:
        ValueError: on every rank: shards that are not the plan's split of a HEALPix field, ranks
            that disagree (name, time, shape, dtype), an existing variable of another shape, dtype
            or ordering, a dtype zarr cannot store.
    """
    info = resolve_group(group)
    with validated_signature(info, "write_shard") as sig:
        if not isinstance(tensor, Tensor) or tensor.dim() < 1:
            raise ValueError(f"write_shard: tensor must be a torch.Tensor [*rest, N_r], got "
                             f"{getattr(tensor, 'shape', type(tensor).__name__)}")
        if not isinstance(name, str) or not name or name in (CELL_IDS, CRS):
            raise ValueError(f"write_shard: name must be a variable name other than {CELL_IDS!r} / {CRS!r}, "
                             f"got {name!r}")
        if time is not None and (isinstance(time, bool) or not isinstance(time, int) or time < 0):
            raise ValueError(f"write_shard: time must be None or an int >= 0, got {time!r}")
        if chunk_cells is not None and (not isinstance(chunk_cells, int) or chunk_cells < 1):
            raise ValueError(f"write_shard: chunk_cells must be a positive int, got {chunk_cells!r}")
        dtype = _numpy_dtype(tensor)
        rest = tuple(tensor.shape[:-1])
        sig.set({"name": _crc(name), "time": -1 if time is None else time, "ndim": tensor.dim(),
                 "rest": _crc(str(rest)), "dtype": _crc(str(dtype)), "chunk": chunk_cells or 0},
                tensor.shape[-1], kind="write_shard")
    sizes = list(sig.per_rank)
    npix = sum(sizes)
    try:  # the same sizes on every rank: raised on every rank
        check_nside(npix2nside(npix), nest=True)
    except ValueError as err:
        raise ValueError(f"write_shard: the shards ({sizes}) add up to no NESTED HEALPix field: {err}") from None
    if sizes != shard_sizes(npix, info.world_size):
        raise ValueError(f"write_shard: shard sizes {sizes} are not the plan shard_sizes({npix}, "
                         f"{info.world_size}) = {shard_sizes(npix, info.world_size)}")

    with validated_signature(info, "write_shard") as sig:  # rank 0 prepares, the others wait
        new_ids = _prepare(store, name, rest, dtype, npix, time, chunk_cells) if info.rank == 0 else False
        sig.set({}, int(new_ids), kind="write_shard.prepare")
    write_ids = bool(sig.per_rank[0])

    with validated_signature(info, "write_shard") as sig:  # its end is the barrier
        zgroup = _zarr().open_group(store, mode="r+", use_consolidated=False) \
            if not isinstance(store, _zarr().Group) else store
        array = zgroup[name]
        start = offsets(sizes)[info.rank]
        stop = start + sizes[info.rank]
        received = _boundary_rows(tensor, sizes, _write_unit(array)[-1], info)
        host = tensor.detach()
        _write_chunks(array, host if host.device.type == "cpu" else host.cpu(), start, stop, received,
                      time, npix)
        if write_ids:
            _write_cell_ids(zgroup[CELL_IDS], start, stop)
        sig.set({}, 0, kind="write_shard.write")


def _boundary_rows(tensor: Tensor, sizes: list[int], c: int, info: GroupInfo) -> Tensor:
    """The later ranks' rows of this rank's last chunk, ``[*rest, m]`` (Note [writing a shard])."""
    rest = tuple(tensor.shape[:-1])
    plan = _boundary_plan(sizes, c)
    r = info.rank
    send_counts = plan[r]
    recv_counts = [plan[s][r] for s in range(len(sizes))]
    if info.world_size == 1 or not any(any(row) for row in plan):  # the same answer on every rank
        return tensor.new_empty((*rest, 0), device="cpu")
    head = sum(send_counts)
    send = tensor.detach()[..., :head].movedim(-1, 0).contiguous()  # [head, *rest]
    send = send.to(info.comm_device(send.device))
    row = math.prod(rest)
    recv = all_to_all_flat(send.reshape(-1), [n * row for n in send_counts], [n * row for n in recv_counts],
                           info, "io.write.boundary")
    return recv.cpu().view(sum(recv_counts), *rest).movedim(0, -1)
