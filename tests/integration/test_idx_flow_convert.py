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
