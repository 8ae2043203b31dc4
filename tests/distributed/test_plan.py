"""One agreement per call (Note [one agreement per call]): exactly one metadata collective per
forward + backward for every strategy, counted with ``count_communication`` on 4 gloo ranks.

The results themselves are checked against the float64 reference in ``test_ring.py``,
``test_ulysses.py`` and ``test_hybrid.py``; here the oracle is the counter.
"""

from __future__ import annotations

import functools

import pytest
import torch

from hpattn_dist import DistributedSpatialSelfAttention, build_hybrid_groups, count_communication, hybrid_attention
from hpattn_dist.strategies import sharded_attention
from tests.harness import run_ranks
from tests.reference import reference_attention

WORLD = 4
# name -> (strategy, heads, extra keyword arguments); H = 2 at P = 4 makes auto choose hybrid U = 2.
CALLS = {
    "ring": ("ring", 4, {}),
    "ulysses": ("ulysses", 4, {}),
    "hybrid": ("hybrid", 4, {"ulysses_degree": 2}),
    "auto-hybrid": ("auto", 2, {}),
    "auto-ulysses": ("auto", 4, {}),
    "ring-masked": ("ring", 2, {"mask": True}),
    "hybrid-masked-dropout": ("hybrid", 2, {"ulysses_degree": 2, "mask": True, "dropout_p": 0.2}),
}


def _meta_calls(stats) -> int:
    return sum(n for label, n in stats.calls.items() if label.endswith(".meta"))


def _rank(rank: int, world: int) -> dict:
    out = {}
    n_local = 3 + rank  # uneven shards
    for name, (strategy, heads, kw) in CALLS.items():
        kw = dict(kw)
        g = torch.Generator().manual_seed(rank)
        q, k, v = (torch.randn(2, heads, n_local, 8, generator=g, requires_grad=True) for _ in range(3))
        if kw.pop("mask", False):
            mask = torch.rand(2, n_local, generator=g) > 0.3
            mask[:, 0] = rank % 2 == 0  # some keys masked in every batch element (compaction)
            kw["key_mask"] = mask
        counts = []
        for _ in range(2):  # the first call also creates hybrid's sub-groups
            with count_communication() as stats:
                sharded_attention(strategy, q, k, v, **kw).square().sum().backward()
            counts.append(_meta_calls(stats))
        out[name] = counts
    groups = build_hybrid_groups(world, 2)
    x = torch.randn(1, 2, n_local, 8, requires_grad=True)
    with count_communication() as stats:
        hybrid_attention(x, x, x, ulysses_group=groups.ulysses_group,
                         ring_group=groups.ring_group).sum().backward()
    out["hybrid_attention"] = [_meta_calls(stats)]
    for strategy in ("ring", "ulysses", "auto"):
        torch.manual_seed(0)  # replicated weights (checked in the call's one agreement)
        layer = DistributedSpatialSelfAttention(16, 4, strategy=strategy, healpix_field=False).double()
        xl = torch.randn(2, n_local, 16, dtype=torch.float64)
        with count_communication() as stats:
            layer(xl).sum().backward()
        out[f"layer-{strategy}"] = [_meta_calls(stats)]
    out.update(_sliced_grids(rank, world))
    return out


def _sliced_grids(rank: int, world: int) -> dict:
    """Hybrid grids that cover only part of WORLD: a 3-D mesh (dp x ring x ulysses) and
    hand-made pairs the library cannot find a parent group for."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("dp", "ring", "ulysses"))
    groups = build_hybrid_groups(mesh)
    replica = rank // 2  # dp slice {0, 1} or {2, 3}
    g = torch.Generator().manual_seed(70 + replica)
    q, k, v = (torch.randn(1, 2, 10, 4, generator=g, dtype=torch.float64) for _ in range(3))
    lo, hi = (0, 4) if rank % 2 == 0 else (4, 10)  # uneven shards inside the slice
    with count_communication() as stats:
        got = hybrid_attention(*(t[:, :, lo:hi] for t in (q, k, v)), ulysses_group=groups.ulysses_group,
                               ring_group=groups.ring_group)
    want = reference_attention(q, k, v)[:, :, lo:hi]
    pairs = [torch.distributed.new_group(r) for r in ([0, 1], [2, 3])]
    mine = pairs[replica]
    try:
        hybrid_attention(q, k, v, ulysses_group=mine, ring_group=mine)
        unknown = None
    except ValueError as err:
        unknown = str(err)
    return {"mesh3d_error": (got - want).abs().max().item(), "mesh3d": [_meta_calls(stats)],
            "unknown_parent": unknown}


@functools.lru_cache(maxsize=None)
def _results() -> list[dict]:
    return run_ranks(_rank, WORLD, timeout=120.0)


@pytest.mark.parametrize("name", [*CALLS, "hybrid_attention", "layer-ring", "layer-ulysses", "layer-auto",
                                  "mesh3d"])
def test_one_metadata_collective_per_forward_and_backward(name):
    for rank, res in enumerate(_results()):
        assert all(n == 1 for n in res[name]), (name, rank, res[name])


def test_hybrid_over_a_slice_of_a_larger_mesh_agrees_within_the_slice():
    for res in _results():
        assert res["mesh3d_error"] <= 1e-12, res["mesh3d_error"]


def test_hybrid_groups_without_a_known_parent_are_refused_on_every_rank():
    for res in _results():
        assert res["unknown_parent"] is not None and "build_hybrid_groups" in res["unknown_parent"]
