"""DistributedSpatialSelfAttention, convert_spatial_attention and grad_sync against the oracle.

A model with two attention layers (and per-pixel layers around them) is converted and run on real
gloo ranks, world 3 and 4, with the HEALPix shard plan and with uneven custom splits (an empty
shard too, and key masks). Its forward output and, after ``sync_gradients``, every parameter
gradient and the input gradient are compared with the single-device float64 oracle model
(``attn_backend="manual"``) computed in the parent process.
"""

from __future__ import annotations

import copy
from typing import Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from hpattn_dist import (
    DistributedSpatialSelfAttention,
    SpatialSelfAttention,
    convert_spatial_attention,
    count_communication,
)
from hpattn_dist.grad_sync import sharded_mean, sync_gradients
from tests.harness import run_ranks

RTOL = 1e-10
E, HEADS, C_IN, C_OUT, BATCH = 16, 4, 3, 2, 2


class TwoAttentionModel(nn.Module):
    """Per-pixel layers around two attention layers; ``[B, N, C_IN] -> [B, N, C_OUT]``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(C_IN, E)
        self.norm = nn.LayerNorm(E)
        self.attn1 = SpatialSelfAttention(E, HEADS, attn_backend="manual")
        self.mlp = nn.Sequential(nn.Linear(E, 2 * E), nn.GELU(), nn.Linear(2 * E, E))
        self.blocks = nn.ModuleList([SpatialSelfAttention(E, HEADS, bias=False, attn_backend="manual")])
        self.head = nn.Linear(E, C_OUT)

    def forward(self, x: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
        h = self.inp(x)
        h = h + self.attn1(self.norm(h), key_mask=key_mask)
        h = h + self.mlp(h)
        h = h + self.blocks[0](h, key_mask=key_mask)
        return self.head(h)


def _make_case(nside: int, seed: int, masked: bool) -> dict:
    """Model weights and data of one case (built identically in the parent and on every rank)."""
    npix = 12 * nside * nside
    torch.manual_seed(seed)
    model = TwoAttentionModel().double()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(BATCH, npix, C_IN, generator=gen, dtype=torch.float64)
    target = torch.randn(BATCH, npix, C_OUT, generator=gen, dtype=torch.float64)
    key_mask = None
    if masked:
        key_mask = torch.rand(BATCH, npix, generator=gen) < 0.6
        key_mask[1] = False  # a batch element with no key at all: zero attention output
    return {"model": model, "x": x, "target": target, "key_mask": key_mask}


def _reference(nside: int, seed: int, masked: bool) -> dict:
    case = _make_case(nside, seed, masked)
    model, x = case["model"], case["x"].requires_grad_(True)
    out = model(x, key_mask=case["key_mask"])
    F.mse_loss(out, case["target"]).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return {"out": out.detach(), "x_grad": x.grad.clone(), "grads": grads}


# Cases: (nside, seed, masked, split, strategy, ulysses_degree). split None = the HEALPix shard
# plan (healpix.scatter); otherwise explicit per-rank sizes (uneven, an empty shard) through
# scatter_along_dim. H = 4 heads: Ulysses needs P | H, so it runs at world 4 only.
CASES = {
    3: [
        (2, 10, False, None, "ring", None),
        (4, 11, False, None, "auto", None),
        (2, 12, True, [5, 30, 13], "ring", None),
    ],
    4: [
        (2, 20, False, None, "ring", None),
        (4, 21, True, None, "ring", None),
        (2, 22, False, [20, 0, 17, 11], "ring", None),
        (2, 23, True, [10, 14, 13, 11], "ulysses", None),
        (2, 24, False, None, "hybrid", 2),
    ],
}


def _ranks_model(rank: int, world: int, cases: list) -> list:
    from hpattn_dist.comm.collectives import scatter_along_dim
    from hpattn_dist.healpix import scatter

    results = []
    for nside, seed, masked, split, strategy, degree in cases:
        case = _make_case(nside, seed, masked)
        model = convert_spatial_attention(case["model"], strategy=strategy, ulysses_degree=degree)
        npix = case["x"].shape[1]
        x_full = case["x"].requires_grad_(True)
        if split is None:
            shard = lambda t: scatter(t, dim=1)  # noqa: E731
        else:
            shard = lambda t: scatter_along_dim(t, dim=1, sizes=split)  # noqa: E731
        key_mask = None if case["key_mask"] is None else shard(case["key_mask"].to(torch.uint8)).bool()
        out_local = model(shard(x_full), key_mask=key_mask)
        loss_local = sharded_mean((out_local - shard(case["target"])) ** 2, npix)
        loss_local.backward()
        with count_communication() as stats:
            sync_gradients(model)
        results.append({
            "out": out_local.detach(),
            "x_grad": x_full.grad.clone(),
            "grads": {name: p.grad.clone() for name, p in model.named_parameters()},
            "sync_calls": stats.calls["all_reduce"],
        })
    results.append(_grad_sync_edge_cases(rank, world))
    return results


def _grad_sync_edge_cases(rank: int, world: int) -> dict:
    """Mixed dtypes (two buffers), a gradient on some ranks only, and one on no rank."""
    p32 = nn.Parameter(torch.zeros(3, dtype=torch.float32))
    p64 = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    some = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    never = nn.Parameter(torch.zeros(1))
    frozen = nn.Parameter(torch.ones(2), requires_grad=False)
    p32.grad = torch.full((3,), float(rank + 1))
    p64.grad = torch.full((2, 2), 10.0 * (rank + 1), dtype=torch.float64)
    if rank % 2 == 0:
        some.grad = torch.full((4,), float(rank + 1), dtype=torch.float64)
    with count_communication() as stats:
        sync_gradients([p32, p64, some, never, frozen])
    return {
        "p32": p32.grad, "p64": p64.grad, "some": some.grad, "never": never.grad,
        "frozen": frozen.grad, "calls": stats.calls["all_reduce"],
    }


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("world", [3, 4])
def test_converted_model_matches_single_device(world: int) -> None:
    results = run_ranks(_ranks_model, world, CASES[world], timeout=90.0)
    for i, (nside, seed, masked, split, strategy, _) in enumerate(CASES[world]):
        ref = _reference(nside, seed, masked)
        out = torch.cat([results[r][i]["out"] for r in range(world)], dim=1)
        assert out.shape == ref["out"].shape
        assert _rel(out, ref["out"]) < RTOL, (world, nside, split, strategy)
        for r in range(world):
            case = results[r][i]
            assert _rel(case["x_grad"], ref["x_grad"]) < RTOL, (world, r, nside, split, strategy)
            assert case["sync_calls"] == 1  # all parameters float64: one coalesced buffer
            assert case["grads"].keys() == ref["grads"].keys()
            for name, grad in ref["grads"].items():
                assert _rel(case["grads"][name], grad) < RTOL, (world, r, name, split, strategy)

    # grad_sync edge cases: sums, None only where no rank had a gradient.
    sums = {k: sum(range(1, world + 1)) for k in ("p32",)}
    for r in range(world):
        edge = results[r][-1]
        assert edge["p32"].dtype == torch.float32
        torch.testing.assert_close(edge["p32"], torch.full((3,), float(sums["p32"])), rtol=0, atol=0)
        torch.testing.assert_close(
            edge["p64"], torch.full((2, 2), 10.0 * sums["p32"], dtype=torch.float64), rtol=0, atol=0
        )
        expected_some = float(sum(q + 1 for q in range(world) if q % 2 == 0))
        torch.testing.assert_close(
            edge["some"], torch.full((4,), expected_some, dtype=torch.float64), rtol=0, atol=0
        )
        assert edge["never"] is None and edge["frozen"] is None
        assert edge["calls"] == 2  # float32 and float64 buffers


def test_sync_gradients_one_all_reduce_per_dtype() -> None:
    """Coalescing: the edge case's float32 + float64 parameters need exactly two all-reduces."""
    results = run_ranks(_ranks_count, 2, timeout=60.0)
    for calls, nbytes in results:
        assert calls == 2
        # Buffers: float32 [3 + 1 flag] and float64 [4 + 4 + 2 flags], ring all-reduce at P=2
        # sends (P - 1) / P * 2 = 1 buffer each.
        assert nbytes == 4 * 4 + 8 * 10


def _ranks_count(rank: int, world: int) -> tuple[int, int]:
    p32 = nn.Parameter(torch.zeros(3))
    p64a = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    p64b = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    for p in (p32, p64a, p64b):
        p.grad = torch.ones_like(p)
    with count_communication() as stats:
        sync_gradients([p32, p64a, p64b])
    return stats.calls["all_reduce"], stats.bytes_sent["all_reduce"]


# --------------------------------------------------------------------------------------------
# Single-process checks (no process group needed: the layer runs as one rank)
# --------------------------------------------------------------------------------------------


def test_state_dict_round_trip_both_ways() -> None:
    torch.manual_seed(0)
    oracle = SpatialSelfAttention(E, HEADS, attn_backend="manual").double()
    layer = DistributedSpatialSelfAttention(E, HEADS, attn_backend="manual").double()
    assert list(oracle.state_dict()) == list(layer.state_dict())
    layer.load_state_dict(oracle.state_dict(), strict=True)
    x = torch.randn(2, 48, E, dtype=torch.float64)
    assert _rel(layer(x), oracle(x)) < RTOL

    torch.manual_seed(1)
    other = DistributedSpatialSelfAttention(E, HEADS, attn_backend="manual").double()
    oracle.load_state_dict(other.state_dict(), strict=True)
    assert _rel(oracle(x), other(x)) < RTOL
    for (n1, p1), (n2, p2) in zip(oracle.named_parameters(), other.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_converter_keeps_weights_and_replaces_every_layer() -> None:
    torch.manual_seed(0)
    model = TwoAttentionModel().double()
    model.eval()
    model.blocks[0].train()  # per-layer modes must survive
    before = {name: p for name, p in model.named_parameters()}
    snapshot = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()

    converted = convert_spatial_attention(model, strategy="ring", attn_backend="sdpa")

    assert torch.equal(rng, torch.get_rng_state())  # no random draws
    assert converted is model
    assert type(model.attn1) is DistributedSpatialSelfAttention
    assert type(model.blocks[0]) is DistributedSpatialSelfAttention
    assert not any(
        type(m) is SpatialSelfAttention for m in converted.modules()
    ), "an oracle layer was left in place"
    after = dict(converted.named_parameters())
    assert after.keys() == before.keys()
    for name, p in after.items():
        assert p is before[name], name  # same Parameter objects: optimizers keep working
        assert p.dtype == torch.float64 and p.device.type == "cpu"
    for key, value in converted.state_dict().items():
        assert torch.equal(value, snapshot[key]), key
    assert not model.attn1.training and model.blocks[0].training
    assert model.blocks[0].qkv_proj.bias is None  # bias=False kept
    assert model.attn1.attn_backend == "sdpa" and model.attn1.strategy == "ring"

    # A bare layer is returned converted; a distributed layer is left alone.
    bare = SpatialSelfAttention(E, HEADS, dropout=0.25)
    new = convert_spatial_attention(bare)
    assert isinstance(new, DistributedSpatialSelfAttention) and new._dropout_p == 0.25
    assert new.attn_backend == "auto" and new.qkv_proj is bare.qkv_proj
    assert convert_spatial_attention(new) is new


def test_converted_model_single_process_equals_oracle() -> None:
    """Without torch.distributed the converted model is the single-device model."""
    ref = _reference(2, 5, True)
    case = _make_case(2, 5, True)
    model = convert_spatial_attention(case["model"])
    x = case["x"].requires_grad_(True)
    out = model(x, key_mask=case["key_mask"])
    F.mse_loss(out, case["target"]).backward()
    assert _rel(out, ref["out"]) < RTOL and _rel(x.grad, ref["x_grad"]) < RTOL
    for name, p in model.named_parameters():
        assert _rel(p.grad, ref["grads"][name]) < RTOL, name


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="strategy"):
        DistributedSpatialSelfAttention(E, HEADS, strategy="nope")
    with pytest.raises(ValueError, match="divisible"):
        DistributedSpatialSelfAttention(10, 3)
    with pytest.raises(ValueError, match="strategy"):
        convert_spatial_attention(TwoAttentionModel(), strategy="nope")
    with pytest.raises(ValueError, match="attn_backend"):
        convert_spatial_attention(TwoAttentionModel(), attn_backend="flash")
    with pytest.raises(ValueError, match="ulysses_degree"):
        convert_spatial_attention(TwoAttentionModel(), strategy="hybrid")
    with pytest.raises(ValueError, match="ulysses_degree"):
        DistributedSpatialSelfAttention(E, HEADS, strategy="ring", ulysses_degree=2)
    with pytest.raises(ValueError, match="ulysses_degree"):
        DistributedSpatialSelfAttention(E, HEADS, strategy="hybrid", ulysses_degree=0)
    layer = DistributedSpatialSelfAttention(E, HEADS)
    with pytest.raises(ValueError, match="embed_dim"):
        layer(torch.randn(2, 5, E + 1))
    with pytest.raises(ValueError, match="key_mask"):
        layer(torch.randn(2, 5, E), key_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="npix"):
        sharded_mean(torch.ones(2, 3), 0)
    with pytest.raises(ValueError, match="dim"):
        sharded_mean(torch.ones(2, 3), 5, dim=2)
    assert "strategy='auto'" in repr(layer)  # the default
