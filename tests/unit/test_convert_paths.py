"""convert_spatial_attention on users' model structures (one process, no process group).

Aliased layers (two names in one parent, ``nn.Sequential(attn, lin, attn)``, two parents), the
cross-attention oracle, hooks, and a failure half-way: the converted model must hold distributed
layers at every path and equal the oracle model; a refused model must be unchanged. The sharded
numerics of the layers themselves are tested on real ranks elsewhere (test_modules.py,
test_cross_attention.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from hpattn_dist import (
    DistributedSpatialCrossAttention,
    DistributedSpatialSelfAttention,
    SpatialCrossAttention,
    SpatialSelfAttention,
    convert_spatial_attention,
)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = SpatialSelfAttention(8, 2, attn_backend="manual")
        self.global_attn = self.attn  # two names in one parent
        self.proc = nn.Sequential(self.attn, nn.Linear(8, 8), self.attn)
        self.body = nn.Sequential(SpatialSelfAttention(8, 2, attn_backend="manual"), nn.GELU())
        self.first = self.body[0]  # two parents
        self.cross = SpatialCrossAttention(8, 2, kv_dim=4, attn_backend="manual")

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        h = self.global_attn(self.proc(self.first(x)))
        return self.cross(self.body(h), kv)


def test_every_path_is_converted_and_the_model_is_unchanged_in_value() -> None:
    torch.manual_seed(0)
    model = Model().double()
    ref = copy.deepcopy(model)
    calls = []
    handle = model.attn.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    model.cross.register_forward_pre_hook(lambda m, args: (args[0] * 2, args[1]))
    ref.cross.register_forward_pre_hook(lambda m, args: (args[0] * 2, args[1]))
    params = [id(p) for p in model.parameters()]

    assert convert_spatial_attention(model, attn_backend="manual") is model
    paths = dict(model.named_modules(remove_duplicate=False))
    for group in (("attn", "global_attn", "proc.0", "proc.2"), ("body.0", "first")):
        assert len({id(paths[p]) for p in group}) == 1, group
        assert isinstance(paths[group[0]], DistributedSpatialSelfAttention), group
    assert isinstance(model.cross, DistributedSpatialCrossAttention)
    assert [id(p) for p in model.parameters()] == params

    x = torch.randn(2, 12, 8, dtype=torch.float64)
    kv = torch.randn(2, 48, 4, dtype=torch.float64)
    assert torch.allclose(model(x, kv), ref(x, kv), rtol=1e-13, atol=1e-15)
    assert calls == ["DistributedSpatialSelfAttention"] * 3  # proc.0, proc.2, global_attn
    handle.remove()  # the old layer's handle removes the hook from its replacement
    model(x, kv)
    assert len(calls) == 3


def test_a_refused_layer_leaves_the_model_unchanged() -> None:
    model = Model()
    model.cross = SpatialCrossAttention(8, 2, kv_dim=4, window_nside=1)  # windowed: ring/auto only
    before = [(n, type(m)) for n, m in model.named_modules(remove_duplicate=False)]
    with pytest.raises(ValueError, match="cross .*cannot be converted"):
        convert_spatial_attention(model, strategy="ulysses")
    assert [(n, type(m)) for n, m in model.named_modules(remove_duplicate=False)] == before
