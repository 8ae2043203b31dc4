"""Sharded HEALPix I/O on real gloo ranks: read_shard, ShardDataset (DataLoader workers), write_shard.

The stores are written in the parent with xarray / zarr directly (not with the code under test),
in RING and NESTED order with chunk sizes that do not align with the shards; the reference for
the RING <-> NESTED index is healpy. World 5 makes the shards uneven (``12 * nside**2`` is never
divisible by 5); the memory check runs at world 3, where a rank's shard is a third of the field.

Memory: the resident-set high-water mark of a rank (``VmHWM`` after resetting it, with glibc's
mmap threshold lowered so that freed buffers leave the process) while it reads; a rank must hold
its shard plus a bounded number of chunks. Reading a RING store by fancy-indexing every position
at once (zarr decodes all touched chunks together) exceeds that bound about twofold here.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import warnings

import numpy as np
import pytest
import torch

from hpattn_dist.comm.counters import count_communication
from hpattn_dist.healpix import shard_bounds
from tests.harness import run_ranks

zarr = pytest.importorskip("zarr")
xr = pytest.importorskip("xarray")
hp = pytest.importorskip("healpy")

NSIDE = 16
NPIX = 12 * NSIDE**2
TIMES, CHANNELS = 3, 3


def _nested_field(seed: int = 0, nside: int = NSIDE, channels: int = CHANNELS) -> np.ndarray:
    """``(time, channel, cell)`` float32 in NESTED order."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((TIMES, channels, 12 * nside**2)).astype("float32")


def _to_ring(nested: np.ndarray, nside: int) -> np.ndarray:
    """RING position p holds NESTED pixel ring2nest(p) (healpy as the reference)."""
    return nested[..., hp.ring2nest(nside, np.arange(12 * nside**2))]


def _write(path: str, data: np.ndarray, order: str, convention: str, chunks: tuple[int, ...],
           cell_ids: np.ndarray | None = None, nside: int = NSIDE) -> str:
    """A store in the users' conventions, written with xarray (not with write_shard)."""
    npix = data.shape[-1]
    coords, attrs = {}, {}
    if convention in ("xdggs", "both"):
        ids = np.arange(npix) if cell_ids is None else cell_ids
        coords["cell_ids"] = ("cell", ids, {"grid_name": "healpix", "level": int(np.log2(nside)),
                                            "indexing_scheme": order})
    if convention in ("easygems", "both"):
        coords["crs"] = ((), np.int8(0), {"grid_mapping_name": "healpix", "healpix_nside": nside,
                                          "healpix_order": {"nested": "nest"}.get(order, order)})
        attrs["grid_mapping"] = "crs"
    ds = xr.Dataset({"x": (("time", "channel", "cell"), data, attrs)}, coords=coords)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.to_zarr(path, encoding={"x": {"chunks": chunks}})
    return path


# --------------------------------------------------------------------------------------------
# world 5: every order and convention, uneven shards, refusals, the DataLoader, the writer


def _io_job(rank: int, world: int, stores: dict[str, str], bad: dict[str, str], out_path: str) -> dict:
    warnings.simplefilter("ignore")
    from hpattn_dist.io import ShardDataset, check_same_index, read_shard, write_shard

    res: dict = {"read": {}, "errors": {}}
    for key, path in stores.items():
        res["read"][key] = (read_shard(path, "x", time=1), read_shard(path, "x"))
    for key, path in bad.items():
        kwargs = {}
        if key == "other_time":  # one rank asks for another time: the shards would mix samples
            path, kwargs = stores["ring_xdggs"], {"time": 1 if rank == 3 else 0}
        if key == "wrong_ordering_arg":
            path, kwargs = stores["ring_easygems"], {"ordering": "NESTED"}
        try:
            read_shard(path, "x", **kwargs)
            res["errors"][key] = None
        except ValueError as err:
            res["errors"][key] = str(err)

    try:  # one rank drew other samples than its peers
        check_same_index([4, 1] if rank != 4 else [4, 2])
        res["errors"]["index_mismatch"] = None
    except ValueError as err:
        res["errors"]["index_mismatch"] = str(err)
    check_same_index(torch.tensor([4, 1]))  # the same everywhere: passes

    # The harness's ranks are daemonic processes, which multiprocessing forbids to have children;
    # a torchrun rank is not. Lift that for the DataLoader's workers.
    multiprocessing.current_process()._config["daemon"] = False
    dataset = ShardDataset(stores["ring_easygems"], "x", return_index=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, shuffle=True,
                                         generator=torch.Generator().manual_seed(7))
    res["loader"] = [(t.tolist(), x) for t, x in loader]

    field = torch.from_numpy(_nested_field(seed=3)).double()
    start, stop = shard_bounds(NPIX, world)[rank]
    with count_communication() as stats:
        for t in range(TIMES):
            write_shard(out_path, "y", field[t, :, start:stop], time=t, chunk_cells=100)
    res["write_bytes"] = stats.bytes_sent.get("io.write.boundary", 0)
    res["roundtrip"] = read_shard(out_path, "y", time=2)
    return res


def _world5(tmp: str) -> tuple[list[dict], dict, np.ndarray, str]:
    nested = _nested_field()
    ring = _to_ring(nested, NSIDE)
    chunks = (1, 2, 100)  # misaligned with the shards (615, 615, 614, 614, 614) and the channels
    stores = {
        "ring_xdggs": _write(f"{tmp}/ring_xdggs.zarr", ring, "ring", "xdggs", chunks),
        "ring_easygems": _write(f"{tmp}/ring_easygems.zarr", ring, "ring", "easygems", chunks),
        "nested_both": _write(f"{tmp}/nested_both.zarr", nested, "nested", "both", (2, 3, 333)),
    }
    permuted = np.arange(NPIX)
    permuted[[10, 2000]] = permuted[[2000, 10]]
    cut = NPIX - 12
    bad = {
        "no_healpix_count": _write(f"{tmp}/partial.zarr", nested[..., :cut], "nested", "easygems", chunks),
        "no_ordering": _write(f"{tmp}/bare.zarr", nested, "nested", "none", chunks),
        "permuted_cell_ids": _write(f"{tmp}/permuted.zarr", nested, "nested", "xdggs", chunks, permuted),
        "conventions_disagree": _write(f"{tmp}/disagree.zarr", nested, "nested", "both", chunks),
        "other_time": "",
        "wrong_ordering_arg": "",
    }
    grp = zarr.open_group(bad["conventions_disagree"], mode="a")
    grp["crs"].attrs["healpix_order"] = "ring"  # xdggs says nested, easygems ring
    zarr.consolidate_metadata(bad["conventions_disagree"])
    results = run_ranks(_io_job, 5, stores, bad, f"{tmp}/out.zarr", timeout=240.0)
    return results, stores, nested, f"{tmp}/out.zarr"


@pytest.fixture(scope="module")
def world5(tmp_path_factory):
    return _world5(str(tmp_path_factory.mktemp("io5")))


def test_read_shard_both_orders_uneven_misaligned_chunks(world5):
    results, stores, nested, _ = world5
    nested = torch.from_numpy(nested)
    bounds = shard_bounds(NPIX, 5)
    assert len({b - a for a, b in bounds}) == 2  # uneven
    for rank, res in enumerate(results):
        a, b = bounds[rank]
        for key in stores:
            at_time, every_time = res["read"][key]
            assert torch.equal(at_time, nested[1, :, a:b]), (rank, key)
            assert torch.equal(every_time, nested[..., a:b]), (rank, key)


def test_bad_stores_refused_on_every_rank(world5):
    results = world5[0]
    expect = {"no_healpix_count": "no HEALPix field", "no_ordering": "names no HEALPix ordering",
              "permuted_cell_ids": "not the cells in storage order", "conventions_disagree": "disagree",
              "other_time": "disagree on time", "wrong_ordering_arg": "contradict",
              "index_mismatch": "disagree on crc, t1"}
    for key, words in expect.items():
        messages = [res["errors"][key] for res in results]
        assert all(m is not None for m in messages), (key, messages)
        assert len(set(messages)) == 1, (key, messages)  # the same error on every rank
        assert words in messages[0], (key, messages[0])


def test_dataset_in_dataloader_workers(world5):
    results, _, nested, _ = world5
    nested = torch.from_numpy(nested)
    bounds = shard_bounds(NPIX, 5)
    orders = [[t for ts, _ in res["loader"] for t in ts] for res in results]
    assert sorted(orders[0]) == list(range(TIMES))
    assert all(o == orders[0] for o in orders)  # one sampler seed: the same samples on every rank
    for rank, res in enumerate(results):
        a, b = bounds[rank]
        for ts, x in res["loader"]:
            assert torch.equal(x, nested[ts][..., a:b]), (rank, ts)


def test_write_shard_readable_by_xarray_without_a_gather(world5):
    results, _, _, out = world5
    field = _nested_field(seed=3).astype("float64")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = xr.open_zarr(out)
    np.testing.assert_array_equal(ds["y"].values, field)
    assert ds["y"].dims[-1] == "cell" and ds["y"].dims[0] == "time"
    assert ds["cell_ids"].attrs == {"grid_name": "healpix", "level": 4, "indexing_scheme": "nested"}
    np.testing.assert_array_equal(ds["cell_ids"].values, np.arange(NPIX))
    assert ds["crs"].attrs["healpix_nside"] == NSIDE and ds["crs"].attrs["healpix_order"] == "nest"
    row = CHANNELS * 8
    bounds = shard_bounds(NPIX, 5)
    for rank, res in enumerate(results):
        a, b = bounds[rank]
        # Only the rows before a rank's first chunk boundary travel, at most one chunk per time.
        assert res["write_bytes"] == TIMES * row * min(b - a, -a % 100), (rank, res["write_bytes"])
        assert torch.equal(res["roundtrip"], torch.from_numpy(field[2, :, a:b]))


# --------------------------------------------------------------------------------------------
# world 3: peak memory while reading


MEM_NSIDE = 128
MEM_CHUNK = (1, 2, 3000)  # cells per chunk misaligned with the shards (65536 each)
CHUNK_BYTES = 2 * 3000 * 4
CHUNKS_ALLOWED = 24


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _memory_job(rank: int, world: int, paths: dict[str, str]) -> dict:
    warnings.simplefilter("ignore")
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: freed buffers leave the process
    from hpattn_dist.io import read_shard

    for path in paths.values():
        read_shard(path, "x", time=0)  # imports, zarr's threads, first-call caches
    out = {}
    for order, path in paths.items():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        base = _status_bytes("VmRSS")
        shard = read_shard(path, "x", time=1)
        out[order] = (_status_bytes("VmHWM") - base, shard.numel() * shard.element_size(), shard[:, :5].clone())
        del shard
    return out


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
def test_read_peak_is_shard_plus_a_few_chunks(tmp_path):
    nested = _nested_field(seed=1, nside=MEM_NSIDE, channels=4)[:2]
    paths = {"NESTED": _write(str(tmp_path / "n.zarr"), nested, "nested", "easygems", MEM_CHUNK, nside=MEM_NSIDE),
             "RING": _write(str(tmp_path / "r.zarr"), _to_ring(nested, MEM_NSIDE), "ring", "easygems", MEM_CHUNK,
                            nside=MEM_NSIDE)}
    results = run_ranks(_memory_job, 3, paths, timeout=240.0)
    bounds = shard_bounds(12 * MEM_NSIDE**2, 3)
    for rank, res in enumerate(results):
        for order, (peak, shard_bytes, head) in res.items():
            a = bounds[rank][0]
            assert torch.equal(head, torch.from_numpy(nested[1, :, a:a + 5]))
            extra = peak - shard_bytes
            assert extra <= CHUNKS_ALLOWED * CHUNK_BYTES, (rank, order, peak, shard_bytes, extra / CHUNK_BYTES)
