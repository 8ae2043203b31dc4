"""The oracle's contract: the seed layer's behaviour, plus argument checks and ``key_mask``.

``_SeedSpatialSelfAttention`` below is the user's seed layer (``shared/seed/000_*.txt``) rewritten
from its text, statement for statement, without the docstrings: it is the independent reference
for everything the seed defines. ``key_mask`` is checked against an explicit float64 computation.
"""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import hpattn_dist.oracle
from hpattn_dist.oracle import SpatialSelfAttention

BACKENDS = ["auto", "sdpa", "manual"]


class _SeedSpatialSelfAttention(nn.Module):
    """The seed layer, verbatim in behaviour."""

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, attn_backend="auto"):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})"
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.attn_backend = attn_backend
        self.qkv_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self._dropout_p = dropout

    def _use_sdpa(self):
        if self.attn_backend == "manual":
            return False
        if self.attn_backend == "sdpa":
            return True
        return hasattr(F, "scaled_dot_product_attention")

    def forward(self, x):
        batch_size, num_points, _ = x.shape
        qkv = self.qkv_proj(x)
        qkv = qkv.reshape(batch_size, num_points, 3, self.num_heads, self.head_dim)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self._use_sdpa():
            dropout_p = self._dropout_p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            attn = F.softmax(attn, dim=-1)
            attn = self.dropout(attn)
            out = attn @ v
        out = out.transpose(1, 2).reshape(batch_size, num_points, self.embed_dim)
        out = self.out_proj(out)
        return out


def _pair(backend: str, dropout: float = 0.0, bias: bool = True, dtype=torch.float64,
          embed_dim: int = 16, num_heads: int = 4):
    """An oracle and a seed layer with the same weights."""
    torch.manual_seed(0)
    oracle = SpatialSelfAttention(embed_dim, num_heads, dropout=dropout, bias=bias,
                                  attn_backend=backend).to(dtype)
    seed = _SeedSpatialSelfAttention(embed_dim, num_heads, dropout=dropout, bias=bias,
                                     attn_backend=backend).to(dtype)
    seed.load_state_dict(oracle.state_dict())
    return oracle, seed


def _explicit_attention(module: nn.Module, x: Tensor, key_mask: Tensor | None) -> Tensor:
    """Float64 masked attention written out per batch element and head, from the weights."""
    x = x.double()
    w_qkv = module.qkv_proj.weight.double()
    b_qkv = module.qkv_proj.bias.double()
    w_out = module.out_proj.weight.double()
    b_out = module.out_proj.bias.double()
    batch, n, e = x.shape
    h = module.num_heads
    d = e // h
    out = torch.zeros(batch, n, e, dtype=torch.float64)
    for b in range(batch):
        qkv = x[b] @ w_qkv.T + b_qkv  # [N, 3E], packed as (3, H, D)
        keep = torch.ones(n, dtype=torch.bool) if key_mask is None else key_mask[b]
        if not keep.any():
            continue  # no key to attend to: zero attention output
        for head in range(h):
            q = qkv[:, 0 * e + head * d: 0 * e + (head + 1) * d]
            k = qkv[:, 1 * e + head * d: 1 * e + (head + 1) * d][keep]
            v = qkv[:, 2 * e + head * d: 2 * e + (head + 1) * d][keep]
            scores = (q @ k.T) / d**0.5
            weights = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
            weights = weights / weights.sum(dim=-1, keepdim=True)
            out[b, :, head * d:(head + 1) * d] = weights @ v
    return out @ w_out.T + b_out


# --------------------------------------------------------------------------------------------
# Same contract as the seed


@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_keys_and_shapes_match_the_seed(bias):
    oracle, seed = _pair("auto", bias=bias)
    assert list(oracle.state_dict()) == list(seed.state_dict())
    for key, value in seed.state_dict().items():
        assert oracle.state_dict()[key].shape == value.shape
    expected = ["qkv_proj.weight", "out_proj.weight"]
    if bias:
        expected = ["qkv_proj.weight", "qkv_proj.bias", "out_proj.weight", "out_proj.bias"]
    assert list(oracle.state_dict()) == expected
    for name in ("embed_dim", "num_heads", "head_dim", "scale", "attn_backend", "_dropout_p"):
        assert getattr(oracle, name) == getattr(seed, name), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_and_gradients_equal_the_seed(backend, dtype):
    oracle, seed = _pair(backend, dtype=dtype)
    x = torch.randn(3, 37, 16, dtype=dtype)
    x_oracle = x.clone().requires_grad_()
    x_seed = x.clone().requires_grad_()
    y_oracle = oracle(x_oracle)
    y_seed = seed(x_seed)
    # Same operations on the same values: bitwise equal, not merely close.
    assert torch.equal(y_oracle, y_seed)
    grad_out = torch.randn_like(y_seed)
    y_oracle.backward(grad_out)
    y_seed.backward(grad_out)
    assert torch.equal(x_oracle.grad, x_seed.grad)
    for (name, p_oracle), p_seed in zip(oracle.named_parameters(), seed.parameters()):
        assert torch.equal(p_oracle.grad, p_seed.grad), name


def test_seed_weights_load_into_the_oracle():
    torch.manual_seed(1)
    seed = _SeedSpatialSelfAttention(16, 2, attn_backend="manual").double()
    oracle = SpatialSelfAttention(16, 2, attn_backend="manual").double()
    oracle.load_state_dict(seed.state_dict())  # strict: same keys both ways
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    assert torch.equal(oracle(x), seed(x))


def test_sdpa_and_manual_agree_to_fp32_rounding():
    torch.manual_seed(2)
    manual = SpatialSelfAttention(32, 4, attn_backend="manual")
    sdpa = SpatialSelfAttention(32, 4, attn_backend="sdpa")
    sdpa.load_state_dict(manual.state_dict())
    x = torch.randn(2, 96, 32)
    exact = _explicit_attention(manual, x, None)
    err_manual = (manual(x).double() - exact).abs().max().item()
    err_sdpa = (sdpa(x).double() - exact).abs().max().item()
    assert err_manual < 1e-5 and err_sdpa < 1e-5, (err_manual, err_sdpa)
    torch.testing.assert_close(sdpa(x), manual(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_mode_dropout_is_a_no_op(backend):
    oracle, _ = _pair(backend, dropout=0.5)
    no_dropout, _ = _pair(backend, dropout=0.0)
    no_dropout.load_state_dict(oracle.state_dict())
    oracle.eval()
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    assert torch.equal(oracle(x), no_dropout(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_mode_dropout_matches_the_seed_under_a_fixed_seed(backend):
    oracle, seed = _pair(backend, dropout=0.5)
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    torch.manual_seed(1234)
    y_oracle = oracle(x)
    torch.manual_seed(1234)
    y_seed = seed(x)
    assert torch.equal(y_oracle, y_seed)
    oracle.eval()
    assert not torch.allclose(y_oracle, oracle(x)), "p=0.5 in train mode changed nothing"


def test_train_mode_dropout_drops_normalised_weights_manual():
    # The seed normalises first, then drops and rescales by 1/(1-p). nn.Dropout draws one
    # Bernoulli mask of the [B, H, N, N] weight shape, so the same draw on a ones tensor under the
    # same seed reproduces it for an explicit computation.
    oracle, _ = _pair("manual", dropout=0.5)
    batch, n, e, h = 2, 12, 16, 4
    x = torch.randn(batch, n, e, dtype=torch.float64)
    torch.manual_seed(5)
    y = oracle(x)
    torch.manual_seed(5)
    keep_scaled = F.dropout(torch.ones(batch, h, n, n, dtype=torch.float64), p=0.5, training=True)
    assert 0 < torch.count_nonzero(keep_scaled) < keep_scaled.numel()

    qkv = (x @ oracle.qkv_proj.weight.T + oracle.qkv_proj.bias).detach()
    q, k, v = qkv.reshape(batch, n, 3, h, e // h).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-2, -1) / (e // h) ** 0.5, dim=-1)
    out = (weights * keep_scaled) @ v  # [B, H, N, D]
    expected = out.transpose(1, 2).reshape(batch, n, e) @ oracle.out_proj.weight.T.detach()
    expected = expected + oracle.out_proj.bias.detach()
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    oracle.eval()
    assert not torch.allclose(y, oracle(x)), "p=0.5 in train mode changed nothing"


# --------------------------------------------------------------------------------------------
# Argument checks


def test_embed_dim_not_divisible_by_heads():
    with pytest.raises(ValueError, match=r"embed_dim \(10\).*num_heads \(3\)"):
        SpatialSelfAttention(10, 3)


def test_unknown_backend():
    with pytest.raises(ValueError, match="flash"):
        SpatialSelfAttention(16, 4, attn_backend="flash")


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_dropout_outside_unit_interval(dropout):
    with pytest.raises(ValueError, match="dropout"):
        SpatialSelfAttention(16, 4, dropout=dropout)


@pytest.mark.parametrize("embed_dim, num_heads", [(0, 1), (8, 0), (-8, 2)])
def test_non_positive_sizes(embed_dim, num_heads):
    with pytest.raises(ValueError):
        SpatialSelfAttention(embed_dim, num_heads)


def test_bad_input_shapes():
    attn = SpatialSelfAttention(16, 4)
    with pytest.raises(ValueError, match=r"\[B, N, embed_dim=16\]"):
        attn(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="key_mask"):
        attn(torch.randn(2, 5, 16), key_mask=torch.ones(2, 5))  # not bool
    with pytest.raises(ValueError, match="key_mask"):
        attn(torch.randn(2, 5, 16), key_mask=torch.ones(2, 4, dtype=torch.bool))


def test_docstring_example_runs():
    result = doctest.testmod(hpattn_dist.oracle, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0


# --------------------------------------------------------------------------------------------
# key_mask


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_true_mask_equals_no_mask(backend):
    oracle, _ = _pair(backend)
    x = torch.randn(3, 25, 16, dtype=torch.float64)
    mask = torch.ones(3, 25, dtype=torch.bool)
    torch.testing.assert_close(oracle(x, key_mask=mask), oracle(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_matches_an_explicit_float64_computation(backend):
    oracle, _ = _pair(backend)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 30, 16, dtype=torch.float64, generator=generator)
    mask = torch.rand(4, 30, generator=generator) < 0.4
    mask[1] = False
    mask[1, 7] = True  # a single key
    expected = _explicit_attention(oracle, x, mask)
    torch.testing.assert_close(oracle(x, key_mask=mask), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_batch_element_gives_zero_attention_and_finite_grads(backend):
    oracle, _ = _pair(backend)
    x = torch.randn(3, 10, 16, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1] = False
    mask[2, ::2] = False
    y = oracle(x, key_mask=mask)
    # Zero attention output, then out_proj: just the bias, for every pixel.
    torch.testing.assert_close(y[1], oracle.out_proj.bias.detach().expand(10, 16), rtol=0, atol=0)
    # The other elements are untouched by their neighbour's empty mask.
    torch.testing.assert_close(y[[0, 2]], oracle(x[[0, 2]].detach(), key_mask=mask[[0, 2]]),
                               rtol=1e-12, atol=1e-12)
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.count_nonzero(x.grad[1]) == 0  # nothing flows through an empty attention
    for name, p in oracle.named_parameters():
        assert torch.isfinite(p.grad).all(), name


def test_gradcheck_manual_float64():
    torch.manual_seed(4)
    oracle = SpatialSelfAttention(4, 2, attn_backend="manual").double()
    params = {name: p.detach().clone().requires_grad_() for name, p in oracle.named_parameters()}
    names = list(params)
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True, True, False], [False] * 5])

    def fn(x, *weights, key_mask=None):
        return torch.func.functional_call(oracle, dict(zip(names, weights)), (x,),
                                          {"key_mask": key_mask})

    inputs = (x, *params.values())
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradcheck(lambda *a: fn(*a, key_mask=mask), inputs)
