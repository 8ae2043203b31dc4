"""Which grid a store holds (Note [store conventions]): xdggs, easygems and CF attributes, arguments.

Single process, in-memory zarr groups (and one written store: the type of a dataset's items); the multi-rank reading and the refusals on every rank are in
``tests/distributed/test_io.py``.
"""

from __future__ import annotations

import pytest

zarr = pytest.importorskip("zarr")

from hpattn_dist.io.grid import find_grid, grid_attributes  # noqa: E402

NSIDE = 4
NPIX = 12 * NSIDE**2


def _group(**arrays: dict):
    group = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    for name, attrs in arrays.items():
        shape = () if name.startswith("crs") else (NPIX,)
        group.create_array(name, shape=shape, dtype="int64", attributes=attrs)
    return group


def test_xdggs_level_and_scheme():
    group = _group(cell_ids={"grid_name": "healpix", "level": 2, "indexing_scheme": "ring"}, x={})
    grid = find_grid(group, group["x"])
    assert (grid.nside, grid.ordering, grid.cell_ids) == (4, "RING", "cell_ids")


def test_easygems_and_cf_spellings():
    for attrs in ({"grid_mapping_name": "healpix", "healpix_nside": 4, "healpix_order": "nest"},
                  {"grid_mapping_name": "healpix", "refinement_level": 2, "indexing_scheme": "nested"}):
        group = _group(crs=attrs, x={"grid_mapping": "crs"})
        grid = find_grid(group, group["x"])
        assert (grid.nside, grid.ordering, grid.cell_ids) == (4, "NESTED", None)


def test_what_the_writer_writes_is_read_back():
    xdggs, easygems = grid_attributes(NSIDE, "NESTED")
    group = _group(cell_ids=xdggs, crs=easygems, x={"grid_mapping": "crs", "coordinates": "cell_ids crs"})
    grid = find_grid(group, group["x"])
    assert (grid.nside, grid.ordering) == (4, "NESTED")


def test_arguments_fill_a_bare_store_and_must_agree_with_attributes():
    bare = _group(x={})
    with pytest.raises(ValueError, match="names no HEALPix ordering"):
        find_grid(bare, bare["x"])
    grid = find_grid(bare, bare["x"], ordering="ring")
    assert (grid.nside, grid.ordering) == (4, "RING")  # nside from the cell count
    group = _group(crs={"grid_mapping_name": "healpix", "healpix_nside": 4, "healpix_order": "ring"}, x={})
    assert find_grid(group, group["x"], ordering="RING", nside=4).ordering == "RING"
    with pytest.raises(ValueError, match="contradict"):
        find_grid(group, group["x"], nside=8)


def test_ambiguous_and_unsupported_grids_refused():
    mappings = {"grid_mapping_name": "healpix", "healpix_nside": 4, "healpix_order": "nest"}
    group = _group(crs_a=mappings, crs_b=dict(mappings, healpix_order="ring"), x={})
    with pytest.raises(ValueError, match="several HEALPix grid-mapping variables"):
        find_grid(group, group["x"])
    group = _group(cell_ids={"grid_name": "healpix", "level": None, "indexing_scheme": "zuniq"}, x={})
    with pytest.raises(ValueError, match="uniq"):
        find_grid(group, group["x"])
    group = _group(crs={"grid_mapping_name": "latitude_longitude"}, x={"grid_mapping": "crs"})
    with pytest.raises(ValueError, match="not a HEALPix grid mapping"):
        find_grid(group, group["x"])
    group = _group(crs={"grid_mapping_name": "healpix", "healpix_nside": 6, "healpix_order": "ring"}, x={})
    with pytest.raises(ValueError, match="power of two"):
        find_grid(group, group["x"])


def test_a_list_of_names_gives_a_dict_also_of_one_name(tmp_path):
    """``ShardDataset(store, "x")`` items are the tensor, ``ShardDataset(store, ["x"])`` items a dict
    (the type follows the argument, not how many names it holds)."""
    import numpy as np
    import torch

    from hpattn_dist.io import ShardDataset, write_shard

    field = np.arange(2 * NPIX, dtype=np.float32).reshape(2, NPIX)
    for t in range(2):
        write_shard(str(tmp_path / "s.zarr"), "x", torch.from_numpy(field[t]), time=t)
    bare, listed = ShardDataset(str(tmp_path / "s.zarr"), "x"), ShardDataset(str(tmp_path / "s.zarr"), ["x"])
    assert isinstance(bare[1], torch.Tensor) and np.array_equal(bare[1].numpy(), field[1])
    assert set(listed[1]) == {"x"} and np.array_equal(listed[1]["x"].numpy(), field[1])
