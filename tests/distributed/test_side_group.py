"""Note [CPU side group] in ``hpattn_dist/comm/groups.py``: the metadata of a group without a CPU
backend travels on a gloo group over its ranks, made once by its members only.

No NCCL here: a gloo subgroup stands in for an NCCL-only one (its backend config is reported as
``{"cuda": "nccl"}``), so without the side group the row would be put on a CUDA device, which the
CPU build does not have.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.harness import run_ranks


def _side_group(rank: int, world: int) -> dict:
    from hpattn_dist.comm import groups
    from hpattn_dist.comm.agreement import agree_on_shapes

    nccl_only: set = set()
    real_config = groups.backend_config
    groups.backend_config = lambda g: {"cuda": "nccl"} if g in nccl_only else real_config(g)
    made: list = []
    real_new_group = dist.new_group

    def new_group(*args, **kwargs):
        made.append((list(args[0]), kwargs.get("backend"), kwargs.get("use_local_synchronization")))
        return real_new_group(*args, **kwargs)

    dist.new_group = new_group
    from hpattn_dist.comm import waits

    bounds: list = []  # the wait bound of every collective: the side group's is a host wait
    real_wait = waits.wait_work
    waits.set_exchange_timeout(60.0)
    waits.wait_work = lambda work, timeout_s: (bounds.append(timeout_s), real_wait(work, timeout_s))[1]
    sub = real_new_group([0, 1])  # every rank creates it (rank 2 gets no member handle)
    out: dict = {"made": made}
    if rank < 2:
        nccl_only.add(sub)
        info = groups.resolve_group(sub)
        out["sizes"] = [agree_on_shapes(info, torch.device("cpu"), {"B": 2}, 10 + rank, "test") for _ in range(3)]
        out["bounds"] = list(bounds)
        try:
            agree_on_shapes(info, torch.device("cpu"), {"B": 2 + rank}, 0, "test")
        except ValueError as err:
            out["disagree"] = str(err)
        out["side"] = groups.cpu_side_group(info) is not None
        # a rank that holds one more group than its peer: no side group (it would be named apart)
        other = real_new_group([0, 1], use_local_synchronization=True)
        if rank == 1:
            real_new_group([1], backend="gloo", use_local_synchronization=True)
        before = len(made)
        nccl_only.add(other)
        out["mismatch"] = groups.cpu_side_group(groups.resolve_group(other))
        out["made_after"] = made[before:]
    dist.barrier()  # rank 2 never took part in the side group's creation, and is not waited for
    return out


def test_an_nccl_only_groups_metadata_travels_on_a_side_group_made_by_its_members():
    outs = run_ranks(_side_group, 3, timeout=90.0)
    for rank in (0, 1):
        out = outs[rank]
        assert out["sizes"] == [[10, 11]] * 3, out["sizes"]
        assert out["made"][:1] == [([0, 1], "gloo", True)] and len(out["made"]) == 1, out["made"]  # once, cached
        assert out["side"] is True
        assert out["bounds"] == [60.0] * 3, out["bounds"]  # a host wait within the exchange timeout
        assert "disagree on B" in out["disagree"], out["disagree"]
        assert out["mismatch"] is None and out["made_after"] == [], out
    assert outs[2]["made"] == []  # the rank outside the group made nothing
