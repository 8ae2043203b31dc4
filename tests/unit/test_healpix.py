"""HEALPix helpers against healpy: orderings, reorder, the shard plan and argument checks."""

from __future__ import annotations

import healpy
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hpattn_dist.comm import collectives
from hpattn_dist.comm.groups import comm_device_for, parse_backend_config
from hpattn_dist.healpix import (
    check_nside,
    gather,
    nest2ring,
    npix2nside,
    nside2npix,
    reorder,
    ring2nest,
    scatter,
    shard_bounds,
    shard_sizes,
)

NSIDES = [1, 2, 4, 8, 16, 32, 64]


# --------------------------------------------------------------------------------------------
# nside / npix


@pytest.mark.parametrize("nside", [1, 2, 3, 4, 5, 1024, np.int64(8)])
def test_nside_npix_round_trip(nside):
    npix = nside2npix(nside)
    assert npix == 12 * int(nside) ** 2 == healpy.nside2npix(int(nside))
    assert npix2nside(npix) == int(nside)
    assert isinstance(npix2nside(npix), int)


def test_check_nside():
    assert check_nside(16) == 16
    assert check_nside(np.int32(4)) == 4
    assert check_nside(3, nest=False) == 3
    with pytest.raises(ValueError, match="power of two.*nside=3"):
        check_nside(3)
    for bad in (0, -2, 2.0, True, "4", None):
        with pytest.raises(ValueError, match="nside must be a positive integer"):
            check_nside(bad)


@pytest.mark.parametrize("npix", [0, -12, 13, 24, 36, 12.0, True, "48"])
def test_npix2nside_rejects(npix):
    with pytest.raises(ValueError, match="npix"):
        npix2nside(npix)


def test_nside2npix_rejects():
    with pytest.raises(ValueError, match="nside must be a positive integer"):
        nside2npix(0)


# --------------------------------------------------------------------------------------------
# nest2ring / ring2nest


@pytest.mark.parametrize("nside", NSIDES)
def test_conversions_match_healpy_on_all_pixels(nside):
    npix = 12 * nside**2
    ipix = torch.arange(npix)
    ring = nest2ring(nside, ipix)
    nest = ring2nest(nside, ipix)
    assert ring.dtype == nest.dtype == torch.int64
    np.testing.assert_array_equal(ring.numpy(), healpy.nest2ring(nside, np.arange(npix)))
    np.testing.assert_array_equal(nest.numpy(), healpy.ring2nest(nside, np.arange(npix)))


@pytest.mark.parametrize("nside", NSIDES)
def test_conversions_are_inverse_permutations(nside):
    ipix = torch.arange(12 * nside**2)
    ring = nest2ring(nside, ipix)
    assert torch.equal(torch.sort(ring).values, ipix)  # a permutation
    assert torch.equal(ring2nest(nside, ring), ipix)
    assert torch.equal(nest2ring(nside, ring2nest(nside, ipix)), ipix)


@pytest.mark.parametrize("nside", [2**10, 2**13, 2**14, 2**20, 2**29])  # int32 | int64 paths
def test_conversions_match_healpy_at_high_resolution(nside):
    # Sampled pixels, always including both ends and the cap/belt boundaries.
    npix = 12 * nside**2
    ncap = 2 * nside * (nside - 1)
    edges = [0, 1, ncap - 1, ncap, npix - ncap - 1, npix - ncap, npix - 2, npix - 1]
    gen = torch.Generator().manual_seed(nside % 1000)
    ipix = torch.cat([torch.tensor(edges), torch.randint(0, npix, (20_000,), generator=gen)])
    np.testing.assert_array_equal(
        nest2ring(nside, ipix).numpy(), healpy.nest2ring(nside, ipix.numpy())
    )
    np.testing.assert_array_equal(
        ring2nest(nside, ipix).numpy(), healpy.ring2nest(nside, ipix.numpy())
    )


def test_conversions_keep_shape_and_accept_any_int_dtype():
    nside = 4
    ipix = torch.arange(192, dtype=torch.int32).reshape(4, 6, 8)
    ring = nest2ring(nside, ipix)
    assert ring.shape == (4, 6, 8) and ring.dtype == torch.int64
    np.testing.assert_array_equal(
        ring.numpy(), healpy.nest2ring(nside, ipix.numpy().astype(np.int64))
    )
    assert nest2ring(nside, torch.tensor(5)).shape == ()
    assert ring2nest(nside, torch.empty(0, dtype=torch.int64)).shape == (0,)


def test_conversions_chunked_path_matches_healpy():
    # More pixels than one CPU chunk, so the chunked loop is exercised.
    nside = 128
    assert 12 * nside**2 > 2 * 65536
    ipix = torch.arange(12 * nside**2).flip(0).reshape(3, -1)
    np.testing.assert_array_equal(
        ring2nest(nside, ipix).numpy(), healpy.ring2nest(nside, ipix.numpy())
    )


def test_conversions_reject_bad_input():
    with pytest.raises(ValueError, match=r"\[0, npix=48\).*\[0, 48\]"):
        nest2ring(2, torch.arange(49))
    with pytest.raises(ValueError, match=r"range \[-1, 3\]"):
        ring2nest(2, torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match="integer tensor"):
        nest2ring(2, torch.arange(4.0))
    with pytest.raises(ValueError, match="torch.Tensor"):
        nest2ring(2, [0, 1])
    with pytest.raises(ValueError, match="power of two"):
        ring2nest(3, torch.arange(4))


# --------------------------------------------------------------------------------------------
# reorder


@pytest.mark.parametrize("nside", [1, 2, 4, 16])
def test_reorder_matches_healpy(nside):
    rng = np.random.default_rng(nside)
    field = rng.standard_normal(12 * nside**2)
    x = torch.from_numpy(field)
    np.testing.assert_array_equal(
        reorder(x, dim=0, inp="NESTED", out="RING").numpy(), healpy.reorder(field, n2r=True)
    )
    np.testing.assert_array_equal(
        reorder(x, dim=0, inp="RING", out="NESTED").numpy(), healpy.reorder(field, r2n=True)
    )


@pytest.mark.parametrize("dim", [0, 1, 2, -1, -2])
def test_reorder_any_dim_round_trip(dim):
    shape = [3, 5, 7]
    shape[dim] = 48
    x = torch.randn(shape, dtype=torch.float64)
    ring = reorder(x, src="NESTED", dst="RING", dim=dim)
    rows = x.movedim(dim, -1).reshape(-1, 48).numpy()  # healpy wants [maps, npix]
    expected = healpy.reorder(rows, n2r=True)
    np.testing.assert_array_equal(ring.movedim(dim, -1).reshape(-1, 48).numpy(), expected)
    assert torch.equal(reorder(ring, dim=dim, inp="ring", out="nest"), x)


def test_reorder_same_ordering_is_identity_and_differentiable():
    x = torch.randn(2, 48, 3, requires_grad=True)
    assert reorder(x, inp="NEST", out="nested") is x
    w = torch.randn(2, 48, 3)
    (reorder(x, src="NESTED", dst="RING") * w).sum().backward()
    # The gradient of a permutation is the inverse permutation of the weights.
    assert torch.equal(x.grad, reorder(w, src="RING", dst="NESTED"))


def test_reorder_rejects_bad_arguments():
    x = torch.zeros(2, 48, 3)
    with pytest.raises(ValueError, match="src must be"):
        reorder(x, inp="HEALPIX", dst="RING")
    with pytest.raises(ValueError, match="dst must be"):
        reorder(x, src="RING", dst="ring-ish")
    with pytest.raises(ValueError, match="needs both orderings"):
        reorder(x)  # no default direction: the old default (NESTED -> RING) misled
    with pytest.raises(ValueError, match="needs both orderings"):
        reorder(x, src="RING")
    with pytest.raises(ValueError, match="not both"):
        reorder(x, src="RING", inp="RING", dst="NESTED")
    with pytest.raises(TypeError):
        reorder(x, "RING", "NESTED")  # keyword-only, so the direction is always written out
    with pytest.raises(ValueError, match="dim=3 is out of range"):
        reorder(x, src="RING", dst="NESTED", dim=3)
    with pytest.raises(ValueError, match=r"x.shape\[2\]=3"):
        reorder(x, src="RING", dst="NESTED", dim=2)
    with pytest.raises(ValueError, match="power of two"):
        reorder(torch.zeros(2, 108), src="RING", dst="NESTED", dim=1)  # nside 3: RING only


# --------------------------------------------------------------------------------------------
# Shard plan

PLAN_NPIX = [0, 1, 5, 7, 12, 47, 48, 97, 192, 768, 1001]


def _check_plan(npix: int, world_size: int) -> None:
    bounds = shard_bounds(npix, world_size)
    sizes = shard_sizes(npix, world_size)
    assert len(bounds) == len(sizes) == world_size
    assert bounds[0][0] == 0 and bounds[-1][1] == npix
    for (start, stop), (next_start, _) in zip(bounds, bounds[1:]):
        assert stop == next_start  # contiguous, in rank order
    assert [stop - start for start, stop in bounds] == sizes
    assert all(s >= 0 for s in sizes)
    assert max(sizes) - min(sizes) <= 1
    assert sorted(sizes, reverse=True) == sizes  # the first npix % P ranks hold the extra pixel
    covered = torch.cat([torch.arange(start, stop) for start, stop in bounds])
    assert torch.equal(covered, torch.arange(npix))  # each pixel exactly once


@pytest.mark.parametrize("npix", PLAN_NPIX)
@pytest.mark.parametrize("world_size", range(1, 14))
def test_shard_plan_covers_once_balanced_contiguous(npix, world_size):
    _check_plan(npix, world_size)


@settings(max_examples=200, deadline=None)
@given(npix=st.integers(0, 10**7), world_size=st.integers(1, 4096))
def test_shard_plan_property(npix, world_size):
    bounds = shard_bounds(npix, world_size)
    sizes = [stop - start for start, stop in bounds]
    assert sum(sizes) == npix and max(sizes) - min(sizes) <= 1
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_shard_plan_examples():
    assert shard_bounds(48, 5) == [(0, 10), (10, 20), (20, 30), (30, 39), (39, 48)]
    assert shard_sizes(48, 5) == [10, 10, 10, 9, 9]
    # More ranks than pixels: the last ranks get empty ranges (documented, not an error).
    assert shard_bounds(3, 5) == [(0, 1), (1, 2), (2, 3), (3, 3), (3, 3)]


@pytest.mark.parametrize("bad", [(-1, 2), (12, 0), (12, -3), (12.0, 2), (12, 2.0), (12, True)])
def test_shard_plan_rejects(bad):
    with pytest.raises(ValueError, match="npix|world_size"):
        shard_bounds(*bad)


def _boundary_pixels(nside: int, owner_nest: np.ndarray) -> int:
    """Pixels with at least one neighbour owned by another rank (owner indexed by NESTED pixel)."""
    neighbours = healpy.get_all_neighbours(nside, np.arange(12 * nside**2), nest=True)
    own = owner_nest[None, :]
    other = np.where(neighbours >= 0, owner_nest[np.maximum(neighbours, 0)], own)
    return int((other != own).any(axis=0).sum())


@pytest.mark.parametrize("world_size", [6, 12, 48])
def test_nested_shards_are_more_compact_than_ring_shards(world_size):
    # The docstring's claim: from about six ranks, contiguous NESTED ranges have a boundary
    # several times smaller than contiguous RING ranges (latitude bands) of the same sizes.
    nside = 16
    npix = 12 * nside**2
    owner = np.repeat(np.arange(world_size), shard_sizes(npix, world_size))
    nested_boundary = _boundary_pixels(nside, owner)  # contiguous NESTED ranges
    ring_of_nest = nest2ring(nside, torch.arange(npix)).numpy()
    ring_boundary = _boundary_pixels(nside, owner[ring_of_nest])  # contiguous RING ranges
    assert nested_boundary < 0.5 * ring_boundary


# --------------------------------------------------------------------------------------------
# scatter / gather argument checks that need no process group (the rest: tests/distributed)


def test_scatter_gather_check_arguments_before_communicating():
    with pytest.raises(ValueError, match="dim=3 is out of range"):
        scatter(torch.zeros(1, 48, 2), dim=3)
    with pytest.raises(ValueError, match=r"x.shape\[1\]=47 .*not a HEALPix pixel count"):
        scatter(torch.zeros(1, 47, 2))
    with pytest.raises(ValueError, match="dim=-4 is out of range"):
        gather(torch.zeros(1, 48, 2), dim=-4)


def test_scatter_gather_without_a_process_group_are_the_identity():
    # One process, no torch.distributed: the plan has one shard, the whole field (as the layers).
    assert not torch.distributed.is_initialized()
    x = torch.randn(2, 48, 3, dtype=torch.float64, requires_grad=True)
    shard = scatter(x)
    assert torch.equal(shard, x) and shard.data_ptr() != x.data_ptr()
    full = gather(shard, npix=48)
    assert torch.equal(full, x)
    (full * 3).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0))
    assert torch.equal(collectives.gather_along_dim(torch.ones(1, 4, 2)), torch.ones(1, 4, 2))
    with pytest.raises(ValueError, match="dim=2 is out of range"):
        collectives.scatter_along_dim(torch.zeros(4, 2), dim=2)
    with pytest.raises(ValueError, match="group was given but torch.distributed is not initialised"):
        scatter(x, group=object())
    with pytest.raises(ValueError, match="expected npix=192"):
        gather(shard, npix=192)


@pytest.mark.parametrize("backend, device, expected", [
    ("nccl", "cpu", "cuda"), ("nccl", "cuda:1", "cuda:1"), ("gloo", "cpu", "cpu"),
    ("gloo", "cuda:0", "cpu"), (None, "cpu", "cpu"),
])
def test_collectives_communicate_on_the_backends_device(backend, device, expected):
    # A CPU tensor scattered / gathered over NCCL travels on the current CUDA device and back.
    # (The backend as its config: Note [init styles]; tests/unit/test_init_styles.py has the rest.)
    backends = parse_backend_config(backend) if backend else {}
    assert comm_device_for(backends, torch.device(device)) == torch.device(expected)
