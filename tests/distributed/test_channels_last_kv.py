"""k and v in channels-last memory format (``t.contiguous(memory_format=torch.channels_last)``,
what a 4-D tensor from a convolutional pipeline often is) through the ring: exact, forward and
backward, unmasked, with a key mask (compacted keys) and across grids.

Before, the ring stacked k and v into its send buffer with ``torch.stack``, which keeps the
inputs' memory format: of two channels-last tensors it returned a non-contiguous stack, gloo
refused to send it ("input tensor has to be contiguous") and every rank raised an
``ExchangeError`` saying the process group is unusable. q alone, or one of k and v, in
channels-last was fine (a mixed stack is contiguous).

Reference: float64 dense attention (``tests.reference``) on the full field. P = 2 gloo ranks.
Legend: B batch, H heads, N pixels, D head dim.
"""

from __future__ import annotations

import functools

import pytest
import torch

from hpattn_dist import ring_attention, ring_cross_attention
from hpattn_dist.comm import set_exchange_timeout
from hpattn_dist.comm.head_exchange import stacked
from tests.harness import run_ranks
from tests.reference import reference_attention

B, H, N, D = 2, 4, 48, 8
WORLD = 2
CASES = ("ring", "ring, key_mask", "ring_cross_attention")


def _fields() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, H, N, D, dtype=torch.float64, generator=g) for _ in range(4))


def _mask() -> torch.Tensor:
    """``[B, N]``: a third of the keys masked in every batch element (so the ring compacts)."""
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[:, ::3] = False
    return mask


def _attend(case: str, q, k, v, mask):
    if case == "ring":
        return ring_attention(q, k, v)
    if case == "ring, key_mask":
        return ring_attention(q, k, v, key_mask=mask)
    return ring_cross_attention(q, k, v)


def _job(rank: int, world: int) -> dict:
    set_exchange_timeout(10.0)
    q, k, v, w = _fields()
    start, stop = rank * N // world, (rank + 1) * N // world
    res = {}
    for case in CASES:
        q_r, k_r, v_r = (t[:, :, start:stop].clone().requires_grad_() for t in (q, k, v))
        k_cl, v_cl = (t.contiguous(memory_format=torch.channels_last) for t in (k_r, v_r))
        out = _attend(case, q_r, k_cl, v_cl, _mask()[:, start:stop])
        grads = torch.autograd.grad((w[:, :, start:stop] * out).sum(), (q_r, k_r, v_r))
        res[case] = [out.detach(), *grads]
    return res


@functools.lru_cache(maxsize=None)
def _results() -> list:
    return run_ranks(_job, WORLD, timeout=60)


def test_stacked_channels_last_is_contiguous():
    k, v = (torch.randn(B, H, N, D).contiguous(memory_format=torch.channels_last) for _ in range(2))
    kv = stacked((k, v))
    assert kv.is_contiguous()
    torch.testing.assert_close(kv, torch.stack((k.contiguous(), v.contiguous())), rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_channels_last_k_and_v_match_the_reference(case):
    q, k, v, w = (t.clone().requires_grad_() for t in _fields())
    bias = None
    if case == "ring, key_mask":
        bias = torch.zeros(B, N, dtype=torch.float64).masked_fill(~_mask(), float("-inf"))
    want = reference_attention(q, k, v, key_bias=bias)
    want_grads = torch.autograd.grad((w.detach() * want).sum(), (q, k, v))
    got = [torch.cat([r[case][i] for r in _results()], dim=2) for i in range(4)]
    for got_t, want_t in zip(got, (want.detach(), *want_grads)):
        torch.testing.assert_close(got_t, want_t, rtol=1e-10, atol=1e-12)
