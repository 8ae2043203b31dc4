"""Sharded HEALPix I/O: each rank reads and writes its own NESTED range of a zarr store.

No rank ever holds the full field: :func:`read_shard` reads this rank's range chunk by chunk
(NESTED or RING stores, Note [reading a shard]), :class:`ShardDataset` serves the same shards by
time index to a ``DataLoader`` (workers included, Note [shards in a DataLoader]), and
:func:`write_shard` writes each rank's region of an output store (Note [writing a shard]). The
grid comes from the store's xdggs or easygems attributes (Note [store conventions]).

Needs the ``[io]`` extra (``pip install 'hpattn-dist[io]'``: zarr, xarray); zarr is imported on
first use, and ``import hpattn_dist`` does not import this package.
"""

from hpattn_dist.io.dataset import ShardDataset, check_same_index
from hpattn_dist.io.grid import StoreGrid, find_grid, grid_attributes
from hpattn_dist.io.read import ShardReader, open_store, read_shard
from hpattn_dist.io.write import write_shard

__all__ = [
    "ShardDataset",
    "ShardReader",
    "StoreGrid",
    "check_same_index",
    "find_grid",
    "grid_attributes",
    "open_store",
    "read_shard",
    "write_shard",
]
