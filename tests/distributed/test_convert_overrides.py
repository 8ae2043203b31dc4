"""convert_spatial_attention refuses a subclass that overrides a method its recognised forward calls
(``_qkv`` / ``_project_out`` of LocalSpatialSelfAttention, ``_project`` of SpatialCrossAttention,
or a LocalSpatialSelfAttention subclass's own ``forward``): the distributed layer runs none of them,
so before, the override (a QK norm, a gate on the output) was silently dropped and the converted
model computed another function (0.07-0.47 relative on 2 ranks). A subclass that only adds methods
or changes ``__init__`` / ``extra_repr`` still converts and computes the oracle's function.

Reference: the unconverted model itself in float64 on the full field, windows from healpy inside
the oracle layers (its correctness is tested in tests/distributed/test_local_attention.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from hpattn_dist import LocalSpatialSelfAttention, SpatialCrossAttention, convert_spatial_attention, healpix
from tests.harness import run_ranks

E, H, NSIDE = 8, 2, 4
N = 12 * NSIDE**2


class GatedOut(LocalSpatialSelfAttention):
    def _project_out(self, out):
        return torch.tanh(super()._project_out(out))


class QKNorm(LocalSpatialSelfAttention):
    def _qkv(self, x):
        q, k, v = super()._qkv(x)
        return nn.functional.normalize(q, dim=-1), nn.functional.normalize(k, dim=-1), v


class OwnLocalForward(LocalSpatialSelfAttention):
    def forward(self, x, key_mask=None):
        return 2 * super().forward(x, key_mask)


class HalfValues(SpatialCrossAttention):
    def _project(self, x_q, x_kv):
        q, k, v = super()._project(x_q, x_kv)
        return q, k, v / 2


class OnlyExtras(LocalSpatialSelfAttention):  # adds a method, overrides none of the forward's
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tag = "mine"

    def extra_repr(self) -> str:
        return super().extra_repr() + ", mine"

    def describe(self) -> str:
        return self.tag


def _layer(cls):
    if issubclass(cls, SpatialCrossAttention):
        return cls(E, H)
    return cls(E, H, window_nside=2)


@pytest.mark.parametrize("cls,names", [(GatedOut, "_project_out"), (QKNorm, "_qkv"),
                                       (OwnLocalForward, "forward"), (HalfValues, "_project")])
def test_an_overridden_helper_is_refused_and_the_model_left_unchanged(cls, names):
    model = nn.Sequential(nn.Linear(E, E), _layer(cls))
    with pytest.raises(ValueError, match=rf"1 \({cls.__qualname__}\) overrides {names}"):
        convert_spatial_attention(model)
    assert type(model[1]) is cls


def _converted_equals_oracle(rank: int, world: int) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(E, E), _layer(OnlyExtras)).double()
    x = torch.randn(2, N, E, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    lo, hi = healpix.shard_bounds(N, world)[rank]
    converted = convert_spatial_attention(model)
    with torch.no_grad():
        got = converted(x[:, lo:hi])
    return float((got - want[:, lo:hi]).abs().max() / want.abs().max())


def test_a_subclass_adding_methods_converts_exactly_on_two_ranks():
    for err in run_ranks(_converted_equals_oracle, 2, timeout=90.0):
        assert err < 1e-12
