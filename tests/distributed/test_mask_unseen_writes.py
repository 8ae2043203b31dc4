"""A key mask rewritten without bumping its version counter (``mask.data[...] = ...``, a numpy
array the mask was made from with ``torch.from_numpy``) is read again on the next call: on the
CPU the layout is recomputed from the values every call, since reading a host mask costs no
device synchronisation (Note [agreement off the device]). Before, the cached layout of the old
values was used: the windowed path ignored a mask that had been all True, and the ring dropped
or kept the keys of the old mask (a silent wrong result).

References: float64 dense attention (``tests.reference`` / ``tests.local_reference``, windows
from healpy), on the values the mask holds at the call.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpattn_dist import healpix, healpix_local_attention, ring_attention
from hpattn_dist.masks import mask_layout
from tests.harness import run_ranks
from tests.local_reference import healpy_window_mask, reference_local_attention
from tests.reference import reference_attention

NSIDE, B, H, D = 4, 2, 2, 4
N = 12 * NSIDE**2


def _bias(mask: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` bool -> additive float64 bias (``-inf`` where masked)."""
    return torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))


def _fields() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, H, N, D, dtype=torch.float64, generator=g) for _ in range(3))


def _masks() -> tuple[np.ndarray, np.ndarray]:
    """A first mask (all True) and the values written over it (a per-batch random mask, with the
    pixels of the first half of the field masked in every batch element, so the ring compacts)."""
    rng = np.random.default_rng(1)
    second = rng.random((B, N)) > 0.4
    second[:, : N // 2 : 3] = False
    return np.ones((B, N), bool), second


def _attend(fn: str, q, k, v, mask, group=None):
    if fn == "ring":
        return ring_attention(q, k, v, group, key_mask=mask)
    return healpix_local_attention(q, k, v, group, window_nside=2, mode="neighbourhood", key_mask=mask)


def _want(fn: str, q, k, v, mask: torch.Tensor) -> torch.Tensor:
    if fn == "ring":
        return reference_attention(q, k, v, key_bias=_bias(mask))
    return reference_local_attention(q, k, v, healpy_window_mask(NSIDE, 2, "neighbourhood"), key_bias=_bias(mask))


def test_layout_follows_a_write_through_data():
    mask = torch.ones(B, N, dtype=torch.bool)
    assert not mask_layout(mask).any_masked
    mask.data[:, 0] = False  # no version bump
    assert mask_layout(mask).any_masked


@pytest.mark.parametrize("fn", ["ring", "local"])
@pytest.mark.parametrize("write", ["data", "numpy"])
def test_one_process_sees_the_new_values(fn, write):
    q, k, v = _fields()
    first, second = _masks()
    array = first.copy()
    mask = torch.from_numpy(array)
    _attend(fn, q, k, v, mask)
    if write == "numpy":
        array[:] = second
    else:
        mask.data.copy_(torch.from_numpy(second))
    got = _attend(fn, q, k, v, mask)
    torch.testing.assert_close(got, _want(fn, q, k, v, torch.from_numpy(second)), rtol=1e-10, atol=1e-12)


def _rank_calls(rank: int, world: int, fn: str) -> float:
    q, k, v = _fields()
    first, second = _masks()
    lo, hi = healpix.shard_bounds(N, world)[rank]
    array = first[:, lo:hi].copy()
    mask = torch.from_numpy(array)
    shard = [t[:, :, lo:hi] for t in (q, k, v)]
    _attend(fn, *shard, mask)
    array[:] = second[:, lo:hi]
    got = _attend(fn, *shard, mask)
    want = _want(fn, q, k, v, torch.from_numpy(second))[:, :, lo:hi]
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("fn", ["ring", "local"])
def test_three_ranks_see_the_new_values(fn):
    for err in run_ranks(_rank_calls, 3, fn, timeout=90.0):
        assert err < 1e-10
