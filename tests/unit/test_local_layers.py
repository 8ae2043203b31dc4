"""The local-attention layers in one process: state_dict layout and conversion of mixed models."""

from __future__ import annotations

import torch
import torch.nn as nn

from hpattn_dist import (
    DistributedLocalSpatialSelfAttention, DistributedSpatialSelfAttention, LocalSpatialSelfAttention,
    SpatialSelfAttention, convert_spatial_attention, healpix_local_attention,
)


def test_state_dict_layout_is_the_global_layers() -> None:
    local = LocalSpatialSelfAttention(8, 2, window_nside=1)
    dist_local = DistributedLocalSpatialSelfAttention(8, 2, window_nside=1, mode="cell")
    glob = SpatialSelfAttention(8, 2)
    assert list(local.state_dict()) == list(glob.state_dict()) == list(dist_local.state_dict())
    dist_local.load_state_dict(glob.state_dict())


def test_converting_a_mixed_model_keeps_parameters_and_function() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(LocalSpatialSelfAttention(8, 2, window_nside=2, mode="neighbourhood"),
                          SpatialSelfAttention(8, 2, attn_backend="manual"),
                          LocalSpatialSelfAttention(8, 2, window_nside=4, mode="cell")).double()
    x = torch.randn(2, 192, 8, dtype=torch.float64)
    want = model(x)
    params = list(model.parameters())
    converted = convert_spatial_attention(model, attn_backend="manual")
    assert [type(m) for m in converted] == [DistributedLocalSpatialSelfAttention,
                                            DistributedSpatialSelfAttention,
                                            DistributedLocalSpatialSelfAttention]
    assert all(a is b for a, b in zip(converted.parameters(), params))
    assert converted[2].window_nside == 4 and converted[2].mode == "cell"
    assert (converted(x) - want).abs().max() < 1e-12
    assert convert_spatial_attention(converted)[0] is converted[0]  # already distributed: unchanged


def test_double_backward_is_refused_by_name() -> None:
    q, k, v = (torch.randn(1, 2, 48, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = healpix_local_attention(q, k, v, window_nside=1, mode="neighbourhood")
    (gk,) = torch.autograd.grad((out**2).sum(), (k,), create_graph=True)
    try:
        torch.autograd.grad(gk.sum(), (q,))
    except RuntimeError as err:
        assert "healpix_local_attention does not support double backward" in str(err)
    else:
        raise AssertionError("a second derivative through healpix_local_attention did not raise")
