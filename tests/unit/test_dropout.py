"""Position-keyed dropout (Note [position-keyed dropout]): the keep-mask against an independent
implementation of its definition (``tests/reference.py``, numpy and plain Python), its statistics,
determinism, independence of (seed, batch) pairs, exact tiling by shifted specs, and the manual
kernel / single-process ring against the float64 reference (which drops with that independent mask).
"""

from __future__ import annotations

import math

import pytest
import torch

from hpattn_dist import ring_attention
from hpattn_dist.kernels import DropoutSpec, draw_seed, keep_mask, manual, select_kernel
from hpattn_dist.merge import merge_into
from tests.reference import keep_one, reference_attention, reference_keep_mask

P_DROP = 0.3


def _sigma(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


def test_independent_reference_numpy_equals_plain_python():
    spec = DropoutSpec(0.37, seed=2**31 - 5, q_offset=3, k_offset=700_000, h_offset=2)
    mask = reference_keep_mask(spec, 2, 3, 5, 7)
    for b in range(2):
        for h in range(3):
            for i in range(5):
                for j in range(7):
                    assert bool(mask[b, h, i, j]) == keep_one(0.37, spec.seed, b, h + 2, i + 3, j + 700_000)


@pytest.mark.parametrize("spec, shape", [
    (DropoutSpec(P_DROP, seed=0), (2, 3, 17, 19)),
    (DropoutSpec(0.1, seed=1234, q_offset=40, k_offset=11, h_offset=5), (3, 2, 9, 33)),
    (DropoutSpec(0.9, seed=2**31 - 1, q_offset=786_000, k_offset=786_400), (1, 4, 8, 8)),
    (DropoutSpec(0.5, seed=77, q_offset=2, k_index=torch.tensor([0, 5, 6, 17, 39, 1000])), (2, 2, 7, 6)),
])
def test_keep_mask_equals_the_independent_definition(spec, shape):
    assert torch.equal(keep_mask(spec, *shape, "cpu"), reference_keep_mask(spec, *shape))


def test_seed_and_batch_index_do_not_trade_places():
    """Regression: with the seed added to the batch index, (seed s, batch b) had the mask of
    (s + 1, b - 1), so a step counter as ``dropout_seed`` repeated masks from one step to the next.
    Now the two agree only as often as independent masks do."""
    agree = P_DROP**2 + (1 - P_DROP) ** 2
    for s in (0, 41, 2**30):
        a = keep_mask(DropoutSpec(P_DROP, seed=s), 4, 2, 48, 48, "cpu")
        b = keep_mask(DropoutSpec(P_DROP, seed=s + 1), 4, 2, 48, 48, "cpu")
        for i in range(1, 4):
            for j in range(4):  # any batch element of step s against any of step s + 1
                rate = (a[i] == b[j]).double().mean().item()
                assert abs(rate - agree) <= 5 * _sigma(agree, a[i].numel()), (s, i, j, rate)


def test_keep_rate_within_statistical_bounds():
    for p in (0.1, P_DROP, 0.5, 0.9):
        mask = keep_mask(DropoutSpec(p, seed=1234), 2, 3, 200, 200, "cpu")
        n = mask.numel()
        rate = mask.double().mean().item()
        assert abs(rate - (1 - p)) <= 5 * _sigma(p, n), (p, rate)


def test_mask_is_deterministic_and_seeds_differ():
    spec = DropoutSpec(P_DROP, seed=77)
    a = keep_mask(spec, 2, 2, 64, 64, "cpu")
    assert torch.equal(a, keep_mask(DropoutSpec(P_DROP, seed=77), 2, 2, 64, 64, "cpu"))
    b = keep_mask(DropoutSpec(P_DROP, seed=78), 2, 2, 64, 64, "cpu")
    # independent masks disagree with probability 2 p (1 - p)
    disagree = (a != b).double().mean().item()
    expect = 2 * P_DROP * (1 - P_DROP)
    assert abs(disagree - expect) <= 5 * _sigma(expect, a.numel())


def test_mask_decorrelated_across_batch_heads_and_transpose():
    m = keep_mask(DropoutSpec(P_DROP, seed=5), 2, 2, 128, 128, "cpu")
    agree = P_DROP**2 + (1 - P_DROP) ** 2  # two independent Bernoulli(1 - p) agree this often
    n = m[0, 0].numel()
    for x, y in ((m[0, 0], m[1, 0]), (m[0, 0], m[0, 1]), (m[0, 0], m[0, 0].T),
                 (m[0, 0, :-1], m[0, 0, 1:]), (m[0, 0, :, :-1], m[0, 0, :, 1:])):
        rate = (x == y).double().mean().item()
        assert abs(rate - agree) <= 5 * _sigma(agree, n), rate


def test_offset_specs_tile_the_full_mask_exactly():
    spec = DropoutSpec(P_DROP, seed=99)
    batch, heads, n_q, n_k = 2, 4, 37, 29
    full = keep_mask(spec, batch, heads, n_q, n_k, "cpu")
    q_cuts, k_cuts, h_cuts = [0, 10, 10, 23, 37], [0, 1, 15, 29], [0, 1, 3, 4]
    for h0, h1 in zip(h_cuts[:-1], h_cuts[1:]):
        for q0, q1 in zip(q_cuts[:-1], q_cuts[1:]):
            for k0, k1 in zip(k_cuts[:-1], k_cuts[1:]):
                sub_spec = DropoutSpec(P_DROP, 99, k_offset=k0).shifted(q=q0, h=h0)
                sub = keep_mask(sub_spec, batch, h1 - h0, q1 - q0, k1 - k0, "cpu")
                assert torch.equal(sub, full[:, h0:h1, q0:q1, k0:k1]), (h0, q0, k0)
    # shifting composes
    moved = spec.shifted(q=3).shifted(q=4, h=1)
    assert (moved.q_offset, moved.h_offset, moved.k_offset) == (7, 1, 0)


def test_key_index_selects_mask_columns():
    """A non-contiguous key block (masked keys removed) carries its global key indices."""
    full = keep_mask(DropoutSpec(P_DROP, seed=3), 2, 2, 11, 40, "cpu")
    index = torch.tensor([0, 5, 6, 17, 39])
    sub = keep_mask(DropoutSpec(P_DROP, seed=3, k_index=index).shifted(q=4), 2, 2, 7, 5, "cpu")
    assert torch.equal(sub, full[:, :, 4:11][..., index])
    with pytest.raises(ValueError, match="k_index"):
        keep_mask(DropoutSpec(P_DROP, seed=3, k_index=index), 2, 2, 7, 4, "cpu")


def test_draw_seed_follows_torch_manual_seed():
    torch.manual_seed(2024)
    a = draw_seed()
    torch.manual_seed(2024)
    assert draw_seed() == a
    assert 0 <= a < 2**31
    assert draw_seed() != a or draw_seed() != a  # the generator advances


def _data(n_q, n_k, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, n_q, 8, generator=g, dtype=dtype)
    k = torch.randn(2, 3, n_k, 8, generator=g, dtype=dtype)
    v = torch.randn(2, 3, n_k, 8, generator=g, dtype=dtype)
    dout = torch.randn(2, 3, n_q, 8, generator=g, dtype=dtype)
    return q, k, v, dout


@pytest.mark.parametrize("tile_rows", [None, 4])
def test_manual_kernel_dropout_blocks_equal_reference(monkeypatch, tile_rows):
    """Key blocks at their global offsets, merged, and query chunks inside the kernel: forward and
    final-statistics backward equal the reference that drops with the full-matrix mask."""
    n_q, n_k = 21, 26
    if tile_rows is not None:
        monkeypatch.setattr(manual, "TILE_ELEMENTS", 2 * 3 * 12 * tile_rows)
    q, k, v, dout = _data(n_q, n_k, seed=1)
    spec = DropoutSpec(P_DROP, seed=4321)
    scale = 8**-0.5
    kernel = select_kernel("manual", q, dropout=True)
    cuts = [0, 12, 12, 26]

    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float64)
    for a, b in zip(cuts[:-1], cuts[1:]):
        block_spec = DropoutSpec(P_DROP, spec.seed, k_offset=a)
        merge_into(out, lse, *kernel.forward(q, k[:, :, a:b], v[:, :, a:b], scale, None, block_spec))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*leaves, scale, dropout=spec)
    assert (out - ref).abs().max().item() <= 1e-13
    ref.backward(dout)
    delta = (dout * out).sum(-1)
    dq = torch.zeros_like(q)
    dks, dvs = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        dq_b, dk_b, dv_b, _ = kernel.backward(dout, q, k[:, :, a:b], v[:, :, a:b], out, lse, delta,
                                              scale, None, DropoutSpec(P_DROP, spec.seed, k_offset=a))
        dq += dq_b
        dks.append(dk_b)
        dvs.append(dv_b)
    for got, leaf in ((dq, leaves[0]), (torch.cat(dks, 2), leaves[1]), (torch.cat(dvs, 2), leaves[2])):
        assert (got - leaf.grad).abs().max().item() <= 1e-12


def test_dropout_actually_changes_the_output():
    q, k, v, _ = _data(10, 10, seed=2)
    plain = reference_attention(q, k, v)
    dropped = reference_attention(q, k, v, dropout=DropoutSpec(P_DROP, seed=1))
    assert (plain - dropped).abs().max().item() > 1e-2


def test_single_process_ring_dropout_reproducible_and_matches_reference():
    q, k, v, dout = _data(17, 17, seed=3)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(11)
    out = ring_attention(*leaves, backend="manual", dropout_p=P_DROP)
    out.backward(dout)
    torch.manual_seed(11)
    seed = draw_seed()
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_leaves, dropout=DropoutSpec(P_DROP, seed))
    ref.backward(dout)
    assert (out - ref).abs().max().item() <= 1e-13
    for got, r in zip(leaves, ref_leaves):
        assert (got.grad - r.grad).abs().max().item() <= 1e-12
    torch.manual_seed(11)
    again = ring_attention(q, k, v, backend="manual", dropout_p=P_DROP)
    assert torch.equal(again, out.detach())
    torch.manual_seed(12)
    other = ring_attention(q, k, v, backend="manual", dropout_p=P_DROP)
    assert not torch.equal(other, out.detach())


def test_dropout_p_zero_is_exact():
    q, k, v, _ = _data(13, 13, seed=4)
    assert torch.equal(ring_attention(q, k, v, backend="manual", dropout_p=0.0),
                       ring_attention(q, k, v, backend="manual"))
    assert (ring_attention(q, k, v, backend="manual") - reference_attention(q, k, v)).abs().max() <= 1e-14
