"""The single-device cross-attention oracle against the layer written out as matmuls around the
dense float64 reference attention, and its contract (parameters, state_dict, argument errors)."""

from __future__ import annotations

import pytest
import torch

from hpattn_dist import DistributedSpatialCrossAttention, SpatialCrossAttention
from tests.reference import reference_attention


def _written_out(layer: SpatialCrossAttention, x_q, x_kv, key_bias=None):
    """``out_proj(attention(q_proj(x_q), kv_proj(x_kv)))`` from the weights, in float64."""
    w = {n: t.double() for n, t in layer.state_dict().items()}
    b, nq, e = x_q.shape
    nk, h = x_kv.shape[1], layer.num_heads
    q = (x_q @ w["q_proj.weight"].T + w["q_proj.bias"]).view(b, nq, h, e // h).transpose(1, 2)
    kv = (x_kv @ w["kv_proj.weight"].T + w["kv_proj.bias"]).view(b, nk, 2, h, e // h).permute(2, 0, 3, 1, 4)
    att = reference_attention(q, kv[0], kv[1], key_bias=key_bias)
    return att.transpose(1, 2).reshape(b, nq, e) @ w["out_proj.weight"].T + w["out_proj.bias"]


@pytest.mark.parametrize("backend", ["manual", "sdpa"])
@pytest.mark.parametrize("nq,nk", [(12, 48), (48, 12)])
def test_oracle_matches_written_out_reference(backend, nq, nk):
    torch.manual_seed(0)
    layer = SpatialCrossAttention(16, 4, kv_dim=6, attn_backend=backend).double()
    x_q, x_kv = torch.randn(2, nq, 16, dtype=torch.float64), torch.randn(2, nk, 6, dtype=torch.float64)
    mask = torch.rand(2, nk) > 0.3
    mask[1] = False  # every key of batch 1 masked: zero attention output, no NaN
    bias = torch.randn(2, nk, dtype=torch.float64)
    got = layer(x_q, x_kv, mask, bias)
    ref = _written_out(layer, x_q, x_kv, bias.masked_fill(~mask, float("-inf")))
    assert (got - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()
    assert torch.allclose(got[1], layer.out_proj.bias.expand(nq, 16))
    got_plain = layer(x_q, x_kv, key_bias=bias[:, None, :].expand(2, 4, nk))  # per-head bias form
    assert (got_plain - _written_out(layer, x_q, x_kv, bias)).abs().max().item() <= 1e-12


def test_same_parameters_and_state_dict_as_distributed_layer():
    oracle = SpatialCrossAttention(8, 2, kv_dim=3, bias=False)
    dist_layer = DistributedSpatialCrossAttention(8, 2, kv_dim=3, bias=False, strategy="ring")
    assert {n: t.shape for n, t in oracle.state_dict().items()} == {
        n: t.shape for n, t in dist_layer.state_dict().items()}
    assert set(oracle.state_dict()) == {"q_proj.weight", "kv_proj.weight", "out_proj.weight"}
    dist_layer.load_state_dict(oracle.state_dict())


@pytest.mark.parametrize("kwargs,match", [
    (dict(embed_dim=10, num_heads=4), "divisible"),
    (dict(embed_dim=8, num_heads=2, kv_dim=0), "kv_dim"),
    (dict(embed_dim=8, num_heads=2, dropout=1.0), "dropout"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpatialCrossAttention(**kwargs)


def test_distributed_constructor_errors():
    with pytest.raises(ValueError, match="strategy"):
        DistributedSpatialCrossAttention(8, 2, strategy="bogus")
    with pytest.raises(ValueError, match="ulysses_degree"):
        DistributedSpatialCrossAttention(8, 2, strategy="hybrid")


def test_input_errors_name_the_argument():
    layer = SpatialCrossAttention(8, 2, kv_dim=3)
    with pytest.raises(ValueError, match=r"x_kv must have shape \[B, Nk, kv_dim=3\]"):
        layer(torch.randn(1, 4, 8), torch.randn(1, 5, 8))  # kv features must be kv_dim = 3
    with pytest.raises(ValueError, match="batch size"):
        layer(torch.randn(1, 4, 8), torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="key_bias"):
        layer(torch.randn(1, 4, 8), torch.randn(1, 5, 3), key_bias=torch.zeros(1, 4))
