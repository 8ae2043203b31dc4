"""Dropout masks agree across ranks whose random generators differ (group rank 0's seed wins)."""

from __future__ import annotations

import pytest
import torch

from hpattn_dist import hybrid_attention, ring_attention, ulysses_attention
from hpattn_dist.kernels import DropoutSpec, draw_seed
from hpattn_dist.mesh import build_hybrid_groups
from tests.harness import run_ranks
from tests.reference import reference_attention

B, H, N, D, P_DROP = 2, 4, 22, 8, 0.3


def _errors_with_unequal_generators(rank: int, world_size: int) -> dict:
    gen = torch.Generator().manual_seed(11)
    q, k, v, dout = (torch.randn(B, H, N, D, generator=gen, dtype=torch.float64) for _ in range(4))
    sl = slice(N * rank // world_size, N * (rank + 1) // world_size)
    u_group, r_group = build_hybrid_groups(world_size, 2)
    entries = {
        "ring": lambda *t, **kw: ring_attention(*t, **kw),
        "ulysses": lambda *t, **kw: ulysses_attention(*t, **kw),
        "hybrid": lambda *t, **kw: hybrid_attention(*t, ulysses_group=u_group, ring_group=r_group, **kw),
    }
    torch.manual_seed(0)
    rank0_seed = draw_seed()  # what group rank 0 draws after torch.manual_seed(0)
    errors = {}
    for name, entry in entries.items():
        for explicit in (None, 12345):
            q_l, k_l, v_l = (t[:, :, sl].clone().requires_grad_() for t in (q, k, v))
            torch.manual_seed(rank)  # every rank's generator differs
            out = entry(q_l, k_l, v_l, dropout_p=P_DROP, dropout_seed=explicit)
            out.backward(dout[:, :, sl])
            spec = DropoutSpec(P_DROP, rank0_seed if explicit is None else explicit)
            q_r, k_r, v_r = (t.clone().requires_grad_() for t in (q, k, v))
            ref = reference_attention(q_r, k_r, v_r, dropout=spec)
            ref.backward(dout)
            errors[(name, explicit)] = max(
                (a - b[:, :, sl]).abs().max().item()
                for a, b in ((out, ref), (q_l.grad, q_r.grad), (k_l.grad, k_r.grad), (v_l.grad, v_r.grad))
            )
    return errors


def test_dropout_mask_follows_rank0_seed_whatever_each_rank_draws() -> None:
    per_rank = run_ranks(_errors_with_unequal_generators, 4, timeout=90)
    for rank, errors in enumerate(per_rank):
        for key, err in errors.items():
            assert err <= 1e-12, (rank, key, err)


def test_dropout_seed_is_validated() -> None:
    q = torch.randn(1, 1, 4, 2)
    for bad in (-1, 2**31, 1.5, True):
        with pytest.raises(ValueError, match="dropout_seed"):
            ring_attention(q, q, q, dropout_p=0.1, dropout_seed=bad)
