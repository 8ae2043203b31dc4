"""Note [clean exit] (``hpattn_dist/shutdown.py``): after :func:`shutdown_process_group` no gloo
thread is left in the process, so none can run into interpreter finalization and abort the rank
("terminate called without an active exception").

The abort itself is a race (a worker descheduled between completing its last collective and
dropping it); what these tests check is deterministic: the threads of every group are joined by
the shutdown, read from ``/proc/self/task/*/comm`` (gloo names them ``pt_gloo_runloop`` and
``gloo_tcp_loop``). A plain ``dist.barrier(); dist.destroy_process_group()`` leaves them running
in both cases below: the default group pinned by ``torch.distributed.nn.functional`` (imported by
``torch._dynamo`` after the group exists, as the first call of a registered op does), and the
hybrid groups and DeviceMesh groups held by caches.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hpattn_dist.shutdown import shutdown_process_group
from tests.harness import START_METHOD_ENV, run_ranks

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc/self/task")


def _gloo_threads() -> list[str]:
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return sorted(n for n in names if "gloo" in n)


def _dynamo_after_init(rank: int, world: int) -> dict:
    imported_before = "torch.distributed.nn.functional" in sys.modules
    import torch._dynamo  # noqa: F401  (imports torch.distributed.nn.functional)

    t = torch.full((3,), float(rank))
    dist.all_reduce(t)
    before = _gloo_threads()
    shutdown_process_group()
    return {"imported_before": imported_before, "before": before, "after": _gloo_threads(),
            "sum": t.tolist()}


def test_default_group_pinned_by_dynamo_is_joined(monkeypatch):
    # spawn: a fresh interpreter, in which torch._dynamo is first imported after init (the fork
    # server preloads it, which binds the defaults to None)
    monkeypatch.setenv(START_METHOD_ENV, "spawn")
    for res in run_ranks(_dynamo_after_init, 2, timeout=120):
        assert not res["imported_before"], "the rank imported torch.distributed.nn before init"
        assert res["sum"] == [1.0, 1.0, 1.0]
        assert "pt_gloo_runloop" in res["before"]
        assert res["after"] == []


def _hybrid_and_mesh(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from hpattn_dist import DistributedSpatialSelfAttention

    def work() -> list:
        torch.manual_seed(0)
        layer = DistributedSpatialSelfAttention(8, 2, strategy="hybrid", ulysses_degree=2).double()
        out = layer(torch.randn(1, 3, 8, dtype=torch.float64))
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "sp"))
        total = distribute_tensor(torch.arange(8.0), mesh, [Shard(0), Shard(0)]).sum().full_tensor()
        return [tuple(out.shape), float(total)]

    seen = work()  # the layer and the mesh are gone; caches still hold their groups
    before = _gloo_threads()
    shutdown_process_group()
    return {"seen": seen, "before": before, "after": _gloo_threads()}


def test_hybrid_and_device_mesh_groups_are_joined():
    for res in run_ranks(_hybrid_and_mesh, 4, timeout=120):
        assert res["seen"] == [(1, 3, 8), 28.0]
        assert res["before"].count("pt_gloo_runloop") > 2  # more groups than the default one
        assert res["after"] == []


def _error_path(rank: int, world: int) -> dict:
    from hpattn_dist.shutdown import ending_process_group

    if rank == 0:
        try:
            with ending_process_group():
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            pass
    else:  # never calls a barrier: one on rank 0's error path would wait for the harness timeout
        shutdown_process_group(barrier=False)
    return {"initialized": dist.is_initialized(), "after": _gloo_threads()}


def test_error_path_destroys_without_barrier():
    for res in run_ranks(_error_path, 2, timeout=60):
        assert res == {"initialized": False, "after": []}


def test_shutdown_without_a_group_does_nothing():
    assert not dist.is_initialized()
    shutdown_process_group()
    shutdown_process_group(barrier=False)


def test_the_mesh_scan_survives_dead_weak_proxies(monkeypatch):
    """The scan for DeviceMeshes meets every object, weak proxies whose referent is gone included
    (compiled graphs keep such proxies); ``isinstance`` on one raises ReferenceError."""
    import weakref

    import torch.distributed.device_mesh  # noqa: F401  (the scan runs only once it is imported)

    from hpattn_dist import shutdown

    class Referent:
        pass

    referent = Referent()
    proxy = weakref.proxy(referent)
    del referent
    with pytest.raises(ReferenceError):
        isinstance(proxy, torch.distributed.device_mesh.DeviceMesh)
    monkeypatch.setattr(shutdown, "_gloo_threads_alive", lambda: True)
    shutdown._release_pinned_groups(None)  # must not raise
    assert proxy is not None
