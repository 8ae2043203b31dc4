"""scatter / gather of HEALPix fields and the collectives under them, on real gloo ranks.

Each rank builds the same full field and the same per-rank weights from fixed seeds, so the
parent can recompute every expected value. Losses are ``sum(w_r * out)`` with weights ``w_r``
that differ per rank, whose gradients are known in closed form:

- gather: ``d/dx_r sum_q sum(w_q * gather(x)) = sum_q w_q[slice r]``
- scatter: ``d/dx sum_q sum(v_q * scatter_q(x)) = cat_q v_q`` on every rank (replicated input)
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from hpattn_dist.comm import collectives
from hpattn_dist.comm.collectives import (
    gather_along_dim,
    reduce_scatter_along_dim,
    scatter_along_dim,
)
from hpattn_dist.comm.counters import count_communication
from hpattn_dist.healpix import gather, scatter, shard_bounds, shard_sizes
from tests.harness import run_ranks

DTYPE = torch.float64


def _full_field(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def _field_shape(npix: int, dim: int) -> tuple[int, ...]:
    shape = [2, 3, 4]
    shape[dim] = npix
    return tuple(shape)


# --------------------------------------------------------------------------------------------
# Rank functions (module level, so the harness can pickle them)


def _scatter_gather_rank(rank, world_size, npix, dims, subgroups=None):
    """scatter -> gather round trip and both backwards, on WORLD or on this rank's subgroup."""
    group = None
    if subgroups is not None:
        # Every rank creates every subgroup, in the same order; each then uses its own.
        groups = [dist.new_group(ranks) for ranks in subgroups]
        group = next(g for g, ranks in zip(groups, subgroups) if rank in ranks)
    group_rank, group_size = dist.get_rank(group), dist.get_world_size(group)
    out = {"group_rank": group_rank, "group_size": group_size}
    for dim in dims:
        shape = _field_shape(npix, dim)
        x_full = _full_field(shape)

        # Forward round trip.
        x_local = scatter(x_full, group=group, dim=dim)
        y_full = gather(x_local, group=group, dim=dim)

        # gather backward: loss_r = sum(w_r * gather(x_local)), w_r different on every rank.
        x_leaf = x_local.detach().requires_grad_()
        w = _full_field(shape, seed=100 + group_rank)
        (w * gather(x_leaf, group=group, dim=dim)).sum().backward()

        # scatter backward: loss_r = sum(v_r * scatter(x_full)) on a replicated leaf.
        x_rep = x_full.clone().requires_grad_()
        shard = scatter(x_rep, group=group, dim=dim)
        v = _full_field(shard.shape, seed=200 + group_rank)
        (v * shard).sum().backward()

        out[dim] = {
            "local": x_local,
            "full": y_full,
            "gather_grad": x_leaf.grad,
            "scatter_grad": x_rep.grad,
        }
    return out


def _uneven_collectives_rank(rank, world_size, sizes, dim, all_reduce_fallback):
    """gather_along_dim with arbitrary (also zero) sizes, sizes=None, and reduce_scatter."""
    if all_reduce_fallback:  # as on a backend without reduce-scatter
        collectives._NO_REDUCE_SCATTER.add(str(dist.get_backend()))
    rest = [3, 2]
    local_shape = list(rest)
    local_shape.insert(dim, sizes[rank])
    x = torch.full(local_shape, float(rank + 1), dtype=DTYPE) + torch.arange(
        sizes[rank], dtype=DTYPE
    ).view([-1 if d == dim else 1 for d in range(3)])
    x = x.requires_grad_()
    with count_communication() as stats:
        y_known = gather_along_dim(x, dim=dim, sizes=sizes)
    y_asked = gather_along_dim(x, dim=dim)  # sizes all-gathered first
    # Same backward as in the HEALPix test, but with explicit sizes and a zero-size shard.
    w = _full_field(tuple(y_known.shape), seed=300 + rank)
    (w * y_known).sum().backward()

    full_shape = list(rest)
    full_shape.insert(dim, sum(sizes))
    z = _full_field(tuple(full_shape), seed=400 + rank).requires_grad_()
    with count_communication() as rs_stats:
        z_scattered = reduce_scatter_along_dim(z, dim=dim, sizes=sizes)
    u = _full_field(tuple(z_scattered.shape), seed=500 + rank)
    (u * z_scattered).sum().backward()
    return {
        "gathered": y_known.detach(),
        "gathered_asked": y_asked.detach(),
        "grad": x.grad,
        "stats": stats.as_dict(),
        "rs_stats": rs_stats.as_dict(),
        "reduce_scattered": z_scattered.detach(),
        "reduce_scatter_grad": z.grad,
    }


def _gather_mismatch_rank(rank, world_size):
    """Shards that do not follow the plan: every rank must raise the same ValueError (no hang)."""
    sizes = shard_sizes(48, world_size)
    sizes[0] += 1
    sizes[-1] -= 1
    x = torch.zeros(1, sizes[rank], 2)
    try:
        gather(x)
    except ValueError as err:
        first = str(err)
    else:
        first = None
    try:
        gather(torch.zeros(1, shard_sizes(48, world_size)[rank], 2), npix=192)
    except ValueError as err:
        second = str(err)
    else:
        second = None
    try:
        gather_along_dim(torch.zeros(1, 5, 2), sizes=[5] * (world_size + 1))
    except ValueError as err:
        third = str(err)
    else:
        third = None
    return first, second, third


# --------------------------------------------------------------------------------------------
# Expected values


def _check_scatter_gather(results, npix, dims, members):
    """``members``: the global ranks of each group, in group-rank order."""
    for global_ranks in members:
        size = len(global_ranks)
        bounds = shard_bounds(npix, size)
        for dim in dims:
            shape = _field_shape(npix, dim)
            x_full = _full_field(shape)
            weights = [_full_field(shape, seed=100 + q) for q in range(size)]
            shard_grads = []
            for group_rank, global_rank in enumerate(global_ranks):
                res = results[global_rank]
                assert (res["group_rank"], res["group_size"]) == (group_rank, size)
                start, stop = bounds[group_rank]
                got = res[dim]
                torch.testing.assert_close(
                    got["local"], x_full.narrow(dim, start, stop - start), rtol=0, atol=0
                )
                torch.testing.assert_close(got["full"], x_full, rtol=0, atol=0)
                expected_grad = sum(w.narrow(dim, start, stop - start) for w in weights)
                torch.testing.assert_close(
                    got["gather_grad"], expected_grad, rtol=1e-12, atol=1e-14
                )
                shard_grads.append(_full_field(got["local"].shape, seed=200 + group_rank))
            expected_full_grad = torch.cat(shard_grads, dim=dim)
            for global_rank in global_ranks:
                torch.testing.assert_close(
                    results[global_rank][dim]["scatter_grad"], expected_full_grad, rtol=0, atol=0
                )


# --------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize(
    "world_size, nside",
    [(1, 2), (2, 2), (3, 2), (4, 2), (5, 2), (3, 4)],
    ids=["P1", "P2", "P3", "P4", "P5-uneven", "P3-nside4"],
)
def test_scatter_gather_world(world_size, nside):
    npix = 12 * nside**2
    dims = (1, 0, -1)
    results = run_ranks(_scatter_gather_rank, world_size, npix, dims, timeout=120.0)
    _check_scatter_gather(results, npix, dims, [list(range(world_size))])


def test_scatter_gather_subgroups_of_world_4():
    # Two groups of 2 whose group ranks differ from the global ranks; both run at once.
    subgroups = [[1, 3], [2, 0]]
    dims = (1, -1)
    results = run_ranks(_scatter_gather_rank, 4, 48, dims, subgroups, timeout=120.0)
    # new_group sorts its ranks: group rank order is global rank order within the group.
    _check_scatter_gather(results, 48, dims, [[1, 3], [0, 2]])


@pytest.mark.parametrize(
    "dim, fallback", [(0, False), (1, False), (2, False), (1, True)],
    ids=["dim0", "dim1", "dim2", "dim1-all_reduce"],
)
def test_gather_along_dim_uneven_and_empty_shards(dim, fallback):
    sizes = [2, 0, 3, 1]
    world_size = len(sizes)
    results = run_ranks(
        _uneven_collectives_rank, world_size, sizes, dim, fallback, timeout=120.0
    )
    shards = []
    for rank, size in enumerate(sizes):
        shape = [3, 2]
        shape.insert(dim, size)
        shards.append(
            torch.full(shape, float(rank + 1), dtype=DTYPE)
            + torch.arange(size, dtype=DTYPE).view([-1 if d == dim else 1 for d in range(3)])
        )
    expected = torch.cat(shards, dim=dim)
    full_shape = list(expected.shape)
    weights = [_full_field(tuple(full_shape), seed=300 + q) for q in range(world_size)]
    z_sum = sum(_full_field(tuple(full_shape), seed=400 + q) for q in range(world_size))
    starts = [sum(sizes[:r]) for r in range(world_size)]
    u_cat = torch.cat(
        [
            _full_field(tuple(shard.shape), seed=500 + q)
            for q, shard in enumerate(shards)
        ],
        dim=dim,
    )
    row_bytes = 3 * 2 * 8  # one padded row along dim, float64
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["gathered"], expected, rtol=0, atol=0)
        torch.testing.assert_close(res["gathered_asked"], expected, rtol=0, atol=0)
        grad = sum(w.narrow(dim, starts[rank], sizes[rank]) for w in weights)
        torch.testing.assert_close(res["grad"], grad, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(
            res["reduce_scattered"], z_sum.narrow(dim, starts[rank], sizes[rank]),
            rtol=1e-12, atol=1e-12,
        )
        torch.testing.assert_close(res["reduce_scatter_grad"], u_cat, rtol=0, atol=0)
        # One all-gather of P blocks padded to max(sizes) rows; this rank sends its block to P-1.
        assert res["stats"]["calls"] == {"all_gather": 1}
        assert res["stats"]["bytes_sent"] == {
            "all_gather": (world_size - 1) * max(sizes) * row_bytes
        }
        # Reduce-scatter: P-1 padded blocks sent; all-reduce: 2 (P-1) / P of the full tensor.
        if fallback:
            full_bytes = sum(sizes) * row_bytes
            expected_rs = {"all_reduce": 2 * (world_size - 1) * full_bytes // world_size}
        else:
            expected_rs = {"reduce_scatter": (world_size - 1) * max(sizes) * row_bytes}
        assert res["rs_stats"]["bytes_sent"] == expected_rs
        assert res["rs_stats"]["calls"] == {label: 1 for label in expected_rs}


@pytest.mark.parametrize("world_size", [2, 3])
def test_gather_rejects_shards_off_the_plan_on_every_rank(world_size):
    results = run_ranks(_gather_mismatch_rank, world_size, timeout=60.0)
    for first, second, third in results:
        assert first is not None and "do not match the shard plan" in first
        assert str(shard_sizes(48, world_size)) in first
        assert second is not None and "expected npix=192" in second
        assert third is not None and f"but the group has {world_size} ranks" in third
    assert len({r[0].split("(this is group rank")[0] for r in results}) == 1  # same sizes seen


def _one_rank_bad_rank(rank, world_size):
    """Only rank 1 passes a bad field / shard: every rank must raise the same error (no hang)."""
    from hpattn_dist.comm import set_exchange_timeout

    set_exchange_timeout(20.0)  # a regression fails in seconds, not at the harness timeout
    out = {}
    cases = {
        "scatter_npix": lambda: scatter(torch.zeros(1, 47 if rank == 1 else 48, 2)),
        "scatter_dtype": lambda: scatter(torch.zeros(1, 48, 2, dtype=DTYPE if rank == 1 else torch.float32)),
        "gather_dim": lambda: gather(torch.zeros(1, 16, 2), dim=3 if rank == 1 else 1),
    }
    for name, call in cases.items():
        try:
            call()
        except ValueError as err:
            out[name] = str(err)
        else:
            out[name] = None
    out["after"] = gather(scatter(torch.arange(48.0).view(1, 48, 1))).flatten().tolist()
    return out


def test_scatter_gather_fail_together_when_one_rank_is_wrong():
    results = run_ranks(_one_rank_bad_rank, 3, timeout=60.0)
    expect = {"scatter_npix": "not a HEALPix pixel count", "scatter_dtype": "disagree on dtype",
              "gather_dim": "dim=3 is out of range"}
    for name, fragment in expect.items():
        messages = {r[name] for r in results}
        assert len(messages) == 1, (name, messages)
        message = messages.pop()
        assert message is not None and fragment in message, (name, message)
    for r in results:
        assert r["after"] == list(range(48))
