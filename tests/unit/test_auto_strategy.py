"""The communication-volume model and ``choose_strategy`` (no process group needed).

The exact per-rank formula is checked against the traffic the strategies really send in
``tests/distributed/test_{ulysses,hybrid}.py``; here: its closed forms at equal shards, the choice
it implies, and the one-time logging.
"""

from __future__ import annotations

import logging

import pytest
import torch

from hpattn_dist import choose_strategy
from hpattn_dist.strategies import STRATEGIES, sharded_attention
from hpattn_dist.strategies.auto import communication_volume
from tests.reference import reference_attention

B, H, D, NR = 2, 8, 16, 12  # N_r pixels on every rank


def _volume(strategy, p, itemsize=4, degree=None, rank=0):
    return communication_volume(strategy, batch=B, heads=H, head_dim=D, sizes=[NR] * p, rank=rank,
                                itemsize=itemsize, ulysses_degree=degree)


@pytest.mark.parametrize("p", [1, 2, 4, 8])
@pytest.mark.parametrize("itemsize", [2, 4, 8])
def test_closed_forms_at_equal_shards(p, itemsize):
    x = B * H * NR * D  # elements of one of q, k, v on a rank
    acc = 8 if itemsize == 8 else 4
    ring = _volume("ring", p, itemsize)
    assert ring.forward == 2 * (p - 1) * itemsize * x
    assert ring.backward == 2 * (p - 1) * itemsize * x + (2 * p * acc * x if p > 1 else 0)
    uly = _volume("ulysses", p, itemsize)
    assert uly.forward * p == uly.backward * p == 4 * (p - 1) * itemsize * x
    for u in (d for d in range(1, p + 1) if p % d == 0):
        r = p // u
        hyb = _volume("hybrid", p, itemsize, degree=u)
        assert hyb.forward * u == (4 * (u - 1) + 2 * (r - 1) * u) * itemsize * x
        assert hyb.backward * u == hyb.forward * u + (2 * r * acc * x * u if r > 1 else 0)
    # the same on every rank at equal shards
    assert {_volume("hybrid", p, itemsize, degree=1, rank=k) for k in range(p)} == {ring}


def test_uneven_ring_skips_the_block_of_the_next_rank():
    sizes = [5, 0, 3, 7]
    for rank in range(4):
        vol = communication_volume("ring", batch=1, heads=1, head_dim=1, sizes=sizes, rank=rank,
                                   itemsize=4)
        # rank r forwards every block except that of rank r + 1 (the last it receives)
        assert vol.forward == 2 * 4 * (sum(sizes) - sizes[(rank + 1) % 4])
        assert vol.backward == vol.forward + 2 * 4 * sum(sizes)


@pytest.mark.parametrize(
    "heads, p, expected",
    [(8, 4, ("ulysses", 4)), (6, 4, ("hybrid", 2)), (3, 4, ("ring", 1)), (12, 8, ("hybrid", 4)),
     (5, 1, ("ring", 1)), (16, 16, ("ulysses", 16)), (6, 6, ("ulysses", 6)), (4, 6, ("hybrid", 2))],
)
def test_choice_is_the_largest_feasible_ulysses_degree(heads, p, expected):
    choice = choose_strategy(heads, p)
    assert (choice.strategy, choice.ulysses_degree) == expected
    assert heads % choice.ulysses_degree == 0 and p % choice.ulysses_degree == 0


def test_choice_minimises_the_exact_model():
    for p in (2, 4, 6, 8):
        for heads in (1, 2, 3, 4, 6, 8, 12):
            choice = choose_strategy(heads, p, dtype=torch.bfloat16)
            feasible = [u for u in range(1, p + 1) if p % u == 0 and heads % u == 0]
            totals = {u: communication_volume("hybrid", batch=1, heads=heads, head_dim=4,
                                              sizes=[6] * p, rank=0, itemsize=2,
                                              ulysses_degree=u).total for u in feasible}
            assert choice.ulysses_degree == min(totals, key=lambda u: (totals[u], u)), (p, heads)


def test_forward_only_tie_at_two_ranks_goes_to_the_ring():
    # P = 2 forward: ring 2 (P-1) = 2, Ulysses 4 (P-1)/P = 2 (units of s X): equal
    assert choose_strategy(4, 2, backward=False).strategy == "ring"
    assert choose_strategy(4, 2).strategy == "ulysses"


def test_choice_is_logged_once(caplog):
    with caplog.at_level(logging.INFO, logger="hpattn_dist.strategies.auto"):
        for _ in range(3):
            choose_strategy(10, 10, dtype=torch.float16)
    records = [r for r in caplog.records if "H=10" in r.getMessage()]
    assert len(records) == 1
    assert "ulysses" in records[0].getMessage()


@pytest.mark.parametrize("bad", [dict(heads=0, group_size=2), dict(heads=2, group_size=0),
                                 dict(heads=2.0, group_size=2)])
def test_bad_arguments(bad):
    with pytest.raises(ValueError):
        choose_strategy(bad["heads"], bad["group_size"])


def test_volume_rejects_bad_degrees():
    with pytest.raises(ValueError, match="ulysses_degree"):
        _volume("hybrid", 4, degree=3)
    with pytest.raises(ValueError, match="not divisible"):
        communication_volume("ulysses", batch=1, heads=3, head_dim=1, sizes=[1, 1], rank=0,
                             itemsize=4)
    with pytest.raises(ValueError, match="strategy"):
        _volume("tree", 4)


def test_registry_and_single_process_fallback():
    """Without torch.distributed every strategy is plain attention over the local pixels."""
    assert {"ring", "ulysses", "hybrid", "auto"} <= set(STRATEGIES)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 7, 8, generator=g, dtype=torch.float64) for _ in range(3))
    ref = reference_attention(q, k, v)
    for name, kwargs in (("ring", {}), ("ulysses", {}), ("hybrid", {"ulysses_degree": 1}),
                         ("auto", {})):
        out = sharded_attention(name, q, k, v, **kwargs)
        assert (out - ref).abs().max().item() <= 1e-13, name
