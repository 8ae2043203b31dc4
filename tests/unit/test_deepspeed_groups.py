"""The DeepSpeed ``mpu``'s single-rank groups under a bound device: ONE split, not W lone groups.

With ``init_process_group(device_id=...)`` every new NCCL group is an ``ncclCommSplit`` of WORLD
that every rank must join. ``sequence_parallel_mpu`` created each process's single-rank group
with ``new_group([me], use_local_synchronization=True)``, one split per process that the other
ranks never match; now the W groups come from one ``dist.split_group`` call. Without a GPU the
process-group calls are recorded stand-ins (``split_group`` itself refuses a default group with
no bound device, and a CPU device cannot be bound).
"""

from __future__ import annotations

import types

import pytest
import torch.distributed as dist

from hpattn_dist.integrations.deepspeed import sequence_parallel_mpu

WORLD, ME, S = 4, 1, 2


@pytest.fixture
def recorded(monkeypatch, request):
    calls: list[tuple] = []
    default = types.SimpleNamespace(bound_device_id=request.param)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: WORLD)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: ME)
    monkeypatch.setattr(dist.distributed_c10d, "_get_default_group", lambda: default)
    monkeypatch.setattr(dist, "new_group", lambda ranks, **kw: calls.append(("new_group", list(ranks), kw)) or object())
    monkeypatch.setattr(dist, "split_group", lambda **kw: calls.append(("split_group", kw)) or object())
    return calls


@pytest.mark.parametrize("recorded", ["cuda:1"], indirect=True)
def test_bound_device_splits_all_single_rank_groups_at_once(recorded):
    mpu = sequence_parallel_mpu(S)
    splits = [c for c in recorded if c[0] == "split_group"]
    assert splits == [("split_group", {"split_ranks": [[r] for r in range(WORLD)]})], recorded
    assert all(c[1] != [ME] for c in recorded if c[0] == "new_group"), recorded  # no lone group
    assert mpu.get_model_parallel_world_size() == 1 and mpu.get_model_parallel_rank() == 0


@pytest.mark.parametrize("recorded", [None], indirect=True)
def test_unbound_each_process_creates_its_own(recorded):
    sequence_parallel_mpu(S)
    assert ("new_group", [ME], {"use_local_synchronization": True}) in recorded
    assert not [c for c in recorded if c[0] == "split_group"]
