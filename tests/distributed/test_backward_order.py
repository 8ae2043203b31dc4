"""Two calls' backwards run in a different order on different ranks: an open defect, held as a
strict xfail until the backward checks which call it belongs to.

Rank 0 runs ``oa.sum().backward(); ob.sum().backward()`` and rank 1 the opposite order, for two
``ring_attention`` calls of the same shapes. Each backward's exchanges carry no identity of their
call, so rank 0's backward of A meets rank 1's backward of B: every rank returns, and the
gradients are wrong (0.6-2.7 relative, found by a user trial). A fix agrees on the call in the
backward's first exchange (a call number from the forward), at the price of a few bytes or a small
collective per backward; docs/guide/failures.md ("What no agreement can see") names the hole.

Reference: float64 dense attention (``tests.reference``) on the full field. P = 2 gloo ranks.
Legend: B batch, H heads, N pixels, D head dim.
"""

from __future__ import annotations

import pytest
import torch

from hpattn_dist import ring_attention
from hpattn_dist.comm import set_exchange_timeout
from tests.harness import run_ranks
from tests.reference import reference_attention

B, H, N, D = 1, 2, 24, 4
WORLD = 2


def _fields(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, N, D, dtype=torch.float64, generator=g) for _ in range(3))


def _job(rank: int, world: int) -> list:
    set_exchange_timeout(10.0)
    start, stop = rank * N // world, (rank + 1) * N // world
    leaves, outs = [], []
    for seed in (0, 1):
        qkv = [t[:, :, start:stop].clone().requires_grad_() for t in _fields(seed)]
        leaves.append(qkv)
        outs.append(ring_attention(*qkv))
    for i in ((0, 1) if rank == 0 else (1, 0)):
        outs[i].sum().backward()
    return [[t.grad for t in qkv] for qkv in leaves]


@pytest.mark.xfail(strict=True, reason="open defect: a backward does not check which call it belongs to "
                                       "(module docstring)")
def test_backwards_in_another_order_on_one_rank_are_exact_or_refused():
    try:
        results = run_ranks(_job, WORLD, timeout=60)
    except Exception:  # an error on every rank would be an honest answer: the test passes
        return
    for seed in (0, 1):
        q, k, v = (t.clone().requires_grad_() for t in _fields(seed))
        reference_attention(q, k, v).sum().backward()
        got = [torch.cat([r[seed][i] for r in results], dim=2) for i in range(3)]
        for got_t, want in zip(got, (q.grad, k.grad, v.grad)):
            torch.testing.assert_close(got_t, want, rtol=1e-10, atol=1e-12)
