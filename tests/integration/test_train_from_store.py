"""``launch/write_store.py`` and ``launch/train.py --data``: training from a store, no full field.

The store is written by 2 real ranks, each its shard (its contents checked against the synthetic
batch computed on the whole field in the parent); then training steps from the store at world 2
equal those at world 1 (float64), with ``scatter`` and the full-batch generator made to raise in the
ranks: the store path never builds or scatters a full field.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from launch import healpix_model, train, write_store
from tests.harness import run_ranks

pytest.importorskip("zarr")

NSIDE, SAMPLES = 4, 6
MODEL = dict(embed_dim=16, num_heads=4, depth=1, batch_size=2, attn_backend="manual")


def _write_job(rank: int, world: int, store: str) -> None:
    write_store.write_task(store, NSIDE, SAMPLES, seed=3, dtype=torch.float64, chunk_cells=50)


def _no_full_field(*args, **kwargs):
    raise AssertionError("the store path must not build or scatter a full field")


def _train(store: str, group) -> list[float]:
    model_cfg = healpix_model.ModelConfig(**MODEL)
    train_cfg = train.TrainConfig(nside=2, steps=3, lr=1e-2, dtype="float64", device="cpu", data=store)
    runtime = train.Runtime(group, 0 if group is None else torch.distributed.get_rank(),
                            1 if group is None else torch.distributed.get_world_size(), torch.device("cpu"))
    return train.train(model_cfg, train_cfg, runtime)["losses"]


def _train_job(rank: int, world: int, store: str) -> list[float]:
    import torch.distributed as dist

    train.scatter = train.make_batch = _no_full_field  # this rank's process only
    return _train(store, dist.group.WORLD)


def test_store_written_by_shards_trains_like_one_process(tmp_path, monkeypatch):
    store = str(tmp_path / "task.zarr")
    run_ranks(_write_job, 2, store, timeout=120.0)

    import xarray as xr

    ds = xr.open_zarr(store)
    cfg = healpix_model.ModelConfig(batch_size=1, num_bumps=4, kappa=4.0)
    gen = torch.Generator().manual_seed(3)
    for t in range(SAMPLES):  # the same draws on the whole field, in the parent
        x, y = healpix_model.make_batch(cfg, NSIDE, gen, dtype=torch.float64)
        np.testing.assert_array_equal(ds["x"].values[t], x[0].T.numpy())
        np.testing.assert_array_equal(ds["y"].values[t], y[0].T.numpy())

    sharded = run_ranks(_train_job, 2, store, timeout=180.0)
    monkeypatch.setattr(train, "scatter", _no_full_field)
    monkeypatch.setattr(train, "make_batch", _no_full_field)
    single = _train(store, None)
    assert sharded[0] == sharded[1]
    np.testing.assert_allclose(sharded[0], single, rtol=1e-10, atol=0)
    assert len(single) == 3 and all(np.isfinite(single))
