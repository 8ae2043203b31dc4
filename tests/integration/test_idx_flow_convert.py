"""convert_model's checks (one process): strict refusals, lazy parameters, names kept, idempotence.

The sharded numerics are tested on real ranks in ``test_idx_flow_gather.py``.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import idx_flow
import numpy as np
import pytest
import torch
import torch.nn as nn
from idx_flow.utils import compute_connection_indices

from hpattn_dist.comm.halo import halo_summary, plan_halo
from hpattn_dist.integrations.idx_flow import convert_model


def _conv(initialized: bool = True) -> idx_flow.SpatialConv:
    idx, _ = compute_connection_indices(2, 1, 4)
    conv = idx_flow.SpatialConv(12, idx, filters=2)
    if initialized:
        conv(torch.zeros(1, 48, 3))
    return conv


class MyRoot(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = _conv()
        self.head = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x))


def test_importing_hpattn_dist_does_not_import_idx_flow() -> None:
    code = "import sys, hpattn_dist, hpattn_dist.comm.halo; assert 'idx_flow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_strict_names_every_unknown_module_and_changes_nothing() -> None:
    model = nn.Sequential(_conv(), nn.BatchNorm1d(12), nn.LayerNorm((12, 2)), nn.LayerNorm(2))
    with pytest.raises(ValueError) as err:
        convert_model(model)
    text = str(err.value)
    assert "1 (torch.nn.modules.batchnorm.BatchNorm1d)" in text
    assert "2 (torch.nn.modules.normalization.LayerNorm)" in text  # spans pixels
    assert " 3 (" not in text and "; 3 (" not in text  # LayerNorm over channels only: per pixel
    assert type(model[0]) is idx_flow.SpatialConv  # refused before anything was converted
    convert_model(model, strict=False)
    assert type(model[0]) is not idx_flow.SpatialConv


def test_user_modules_need_pixelwise() -> None:
    with pytest.raises(ValueError, match=r"\(root\) \(.*MyRoot\)"):
        convert_model(MyRoot())
    model = MyRoot()
    names = [n for n, _ in model.named_parameters()] + list(model.state_dict())
    params = list(model.parameters())
    assert convert_model(model, pixelwise=(MyRoot,)) is model
    assert [n for n, _ in model.named_parameters()] + list(model.state_dict()) == names
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert convert_model(model, pixelwise=(MyRoot,)) is model  # converting again changes nothing
    with pytest.raises(ValueError, match="sequence of module types"):
        convert_model(MyRoot(), pixelwise=MyRoot)


def test_refuses_lazy_parameters() -> None:
    with pytest.raises(ValueError, match="has not created its parameters yet"):
        convert_model(nn.Sequential(_conv(initialized=False)))
    # The MLPs' batch norms are sharded (tests/integration/test_idx_flow_dropout.py), not refused.
    gmlp = idx_flow.GlobalMLP(hidden_units=(4,), activations=("relu",), use_batch_norm=True)
    gmlp(torch.zeros(2, 5, 3))
    convert_model(gmlp)
    assert type(gmlp.bn_layers[0]).__name__ == "ShardedBatchNorm1d"
    with pytest.raises(ValueError, match="strategy"):
        convert_model(_conv(), strategy="nope")
    with pytest.raises(ValueError, match="'auto'"):
        convert_model(_conv(), strategy="hybrid")


def test_one_process_equals_the_layer() -> None:
    torch.manual_seed(0)
    conv = _conv().double()
    ref = copy.deepcopy(conv)
    convert_model(conv)
    x = torch.randn(2, 48, 3, dtype=torch.float64)
    assert torch.equal(conv(x), ref(x))
    assert torch.equal(copy.deepcopy(conv)(x), ref(x))


def test_plan_checks_and_negative_entries() -> None:
    idx, _ = compute_connection_indices(2, 1, 4)
    table = torch.from_numpy(idx)
    with pytest.raises(ValueError, match="outside the input grid"):
        plan_halo(table, [(0, 20), (20, 40)], [(0, 6), (6, 12)], 0)
    with pytest.raises(ValueError, match="contiguous"):
        plan_halo(table, [(0, 20), (21, 48)], [(0, 6), (6, 12)], 0)
    wrapped = torch.where(table > 40, table - 48, table)  # -1 is pixel 47, as in x[:, table]
    for r in range(2):
        a, b = plan_halo(table, [(0, 30), (30, 48)], [(0, 6), (6, 12)], r), \
            plan_halo(wrapped, [(0, 30), (30, 48)], [(0, 6), (6, 12)], r)
        assert torch.equal(a.local_table, b.local_table) and a.send_counts == b.send_counts
    summary = halo_summary(table, 48, 3)
    assert sum(s["rows_sent"] for s in summary) == sum(s["rows_received"] for s in summary) > 0
    owned = np.array([s["n_in_local"] for s in summary])
    assert owned.sum() == 48


# --------------------------------------------------------------------------------------------
# Issue 25: conversion that is total or refuses (one process; the numerics on real ranks are in
# test_idx_flow_user_models.py)
# --------------------------------------------------------------------------------------------


def _attention() -> idx_flow.SpatialSelfAttention:
    return idx_flow.SpatialSelfAttention(2, 1, attn_backend="manual")


class Aliased(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = idx_flow.SpatialBatchNorm(2)
        self.norm = self.bn  # two names in one parent
        self.attn = _attention()
        self.proc = nn.Sequential(self.attn, nn.Linear(2, 2), self.attn)
        self.global_attn = self.attn
        self.body = nn.Sequential(_conv(), nn.GELU())
        self.first = self.body[0]  # reachable through two parents

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.first(x))
        return self.global_attn(self.proc(h))


def test_aliases_and_shared_modules_convert_at_every_path() -> None:
    model = Aliased()
    params = list(model.parameters())
    convert_model(model, pixelwise=(Aliased,))
    by_path = dict(model.named_modules(remove_duplicate=False))
    for group in (("bn", "norm"), ("attn", "proc.0", "proc.2", "global_attn"), ("body.0", "first")):
        modules = {id(by_path[p]) for p in group}
        assert len(modules) == 1, group  # still one module at every path
        assert by_path[group[0]].__class__.__module__.startswith("hpattn_dist"), group
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]


def test_a_failing_conversion_leaves_the_model_untouched() -> None:
    conv, squeeze = _conv(), idx_flow.Squeeze("mean")
    squeeze.reduction = "median"  # its converter raises, after the conv was converted in place
    mlp = idx_flow.SpatialMLP(12, compute_connection_indices(1, 1, 4)[0], hidden_units=(2,),
                              activations=("relu",), dropout=0.1, use_batch_norm=True)
    mlp(torch.zeros(2, 12, 2))  # its batch norm and dropout are changed in place by its converter
    model = nn.Sequential(squeeze, nn.Sequential(conv, mlp))
    before = [(name, type(m), dict(m._modules), dict(m.__dict__)) for name, m in model.named_modules()]
    with pytest.raises(ValueError, match="median"):
        convert_model(model)
    after = [(name, type(m), dict(m._modules), dict(m.__dict__)) for name, m in model.named_modules()]
    assert after == before
    assert type(conv) is idx_flow.SpatialConv and type(mlp.bn_layers[0]) is nn.BatchNorm1d
    assert not mlp._forward_pre_hooks


def test_hooks_move_to_the_replacements() -> None:
    calls: list[str] = []
    model = nn.Sequential(_conv(), idx_flow.SpatialBatchNorm(2), nn.Dropout(0.0), _attention(),
                          idx_flow.Squeeze("sum"))
    handles = [m.register_forward_hook(lambda mod, i, o, k=k: calls.append(k))
               for k, m in enumerate(model)]
    handles.append(model[1].register_forward_pre_hook(lambda mod, i: calls.append("pre")))
    handles.append(model[4].register_full_backward_hook(lambda mod, gi, go: calls.append("bwd")))
    convert_model(model)
    assert all(type(m).__module__.startswith("hpattn_dist") for m in model)  # every one replaced
    x = torch.zeros(1, 48, 3, requires_grad=True)
    model(x).sum().backward()
    assert calls == [0, "pre", 1, 2, 3, 4, "bwd"]
    for handle in handles:  # the handles of the old modules remove the hooks from the new ones
        handle.remove()
    calls.clear()
    model(x).sum().backward()
    assert calls == []


class MyConv(idx_flow.SpatialConv):
    def __init__(self) -> None:
        super().__init__(12, compute_connection_indices(2, 1, 4)[0], filters=2)


class OwnForward(idx_flow.SpatialConv):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_subclasses_and_parametrizations_convert() -> None:
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    sub, spectral, weighted = MyConv(), _conv(), _conv()
    sub(torch.zeros(1, 48, 3))
    parametrizations.spectral_norm(spectral, name="kernel")
    parametrizations.weight_norm(weighted, name="kernel")
    head = parametrizations.spectral_norm(nn.Linear(2, 2))
    model = nn.ModuleList([sub, spectral, weighted, head]).double().eval()
    ref = copy.deepcopy(model)
    convert_model(model)
    assert isinstance(model[0], MyConv) and type(model[0]).__name__ == "HaloMyConv"
    assert isinstance(model[1], type(ref[1])) and type(model[1]).__name__ == "HaloParametrizedSpatialConv"
    x = torch.randn(2, 48, 3, dtype=torch.float64)
    for got, want in zip(model[:3], ref[:3]):
        assert torch.allclose(got(x), want(x), rtol=1e-14, atol=0)
    own = OwnForward(12, compute_connection_indices(2, 1, 4)[0], filters=2)
    own(torch.zeros(1, 48, 3))
    with pytest.raises(ValueError) as err:
        convert_model(nn.Sequential(own))
    text = str(err.value)
    assert "0 (" in text and "its own forward" in text and "pixelwise" not in text


@pytest.mark.parametrize("layer, instead", [
    (nn.BatchNorm1d(3), "idx_flow.SpatialBatchNorm"),
    (nn.GroupNorm(1, 3), "idx_flow.SpatialGroupNorm"),
    (nn.MultiheadAttention(4, 2), "SpatialSelfAttention"),
    (nn.Upsample(scale_factor=2), "idx_flow.SpatialUpsampling"),
    (nn.Flatten(), "idx_flow.Squeeze"),
    (nn.Conv1d(3, 3, 3), "idx_flow.SpatialConv"),
])
def test_refusals_name_the_path_and_the_layer_to_use(layer: nn.Module, instead: str) -> None:
    model = nn.Sequential(nn.ModuleDict({"enc": nn.Sequential(_conv(), layer)}))
    with pytest.raises(ValueError) as err:
        convert_model(model)
    assert f"0.enc.1 ({type(layer).__module__}.{type(layer).__qualname__}) cannot act per pixel" in str(err.value)
    assert instead in str(err.value)
    assert type(model[0]["enc"][0]) is idx_flow.SpatialConv


class WithPos(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = _conv()
        self.pos = nn.Parameter(torch.randn(1, 12, 2))
        self.register_buffer("mask", torch.ones(12, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv(x) + self.pos) * self.mask


def test_pixel_tensors_are_declared_or_refused_with_the_fix() -> None:
    with pytest.raises(ValueError) as err:
        convert_model(WithPos(), pixelwise=(WithPos,))
    text = str(err.value)
    assert "pixel_tensors={'pos': 1}" in text and "pixel_tensors={'mask': 0}" in text
    model = WithPos().double()
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    convert_model(model, pixelwise=(WithPos,), pixel_tensors={"pos": 1, "mask": None})
    x = torch.randn(2, 48, 3, dtype=torch.float64)
    assert torch.equal(model(x), ref(x)) and list(model.state_dict()) == keys
    for bad, match in (({"nope.pos": 1}, "no module"), ({"posx": 1}, "no parameter or buffer"),
                       ({"pos": 3}, "not a dim"), ({"conv.kernel": 0}, "leave it out")):
        with pytest.raises(ValueError, match=match):
            convert_model(WithPos(), pixelwise=(WithPos,), pixel_tensors={"mask": None, **bad})


def test_pickling_a_converted_model_without_a_group() -> None:
    import io

    model = nn.Sequential(_conv(), idx_flow.SpatialBatchNorm(2), _attention()).double()
    convert_model(model)
    x = torch.randn(2, 48, 3, dtype=torch.float64)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)  # process_group=None is kept: no binding needed
    assert torch.equal(loaded(x), model(x))


def test_layers_already_distributed_are_kept() -> None:
    from hpattn_dist import convert_spatial_attention

    model = convert_spatial_attention(nn.Sequential(_conv(), _attention()))
    attn = model[1]
    assert convert_model(model) is model and model[1] is attn
