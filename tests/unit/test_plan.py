"""The capacity planner without ranks: its halo count, its command line, and ``auto`` reading the same model.

The planner's bytes and peak memory are held to measurements on real ranks in
``tests/distributed/test_cost_model.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from hpattn_dist.cost_model import halo_rows
from hpattn_dist.healpix import shard_sizes
from hpattn_dist.local import window_traffic
from hpattn_dist.strategies import choose_strategy
from hpattn_dist.tools.plan import PlanConfig, format_plan, parse_bytes, plan_layer, recommend


@pytest.mark.parametrize("nside, window, mode, world", [
    (16, 4, "neighbourhood", 3), (16, 2, "cell", 5), (32, 4, "neighbourhood", 7), (8, 1, "neighbourhood", 4),
    (2, 1, "neighbourhood", 50),  # more ranks than pixels: empty shards
])
def test_halo_rows_equal_the_executed_plan(nside, window, mode, world):
    sizes = shard_sizes(12 * nside**2, world)
    mine = halo_rows(sizes, window, mode)
    plan = window_traffic(sizes, None, window, mode)  # the layer's own planner, pixel by pixel
    assert [(m.received, m.sent) for m in mine] == [(r.rows_received, r.rows_sent) for r in plan.ranks]


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("450GB/s", per_second=True) == 450e9
    assert parse_bytes("1e9") == 1e9
    for bad in ("", "-1GB", "80 parsecs", "0GiB"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


@pytest.mark.parametrize("heads, world, dtype", [(16, 64, "bfloat16"), (6, 4, "float32"), (3, 4, "float32"),
                                                 (8, 8, "float64"), (4, 6, "bfloat16")])
def test_auto_picks_the_planners_fewest_bytes(heads, world, dtype):
    """One cost model: ``auto`` chooses, among the planner's global candidates, the one sending the
    fewest bytes (ties to the smaller Ulysses degree)."""
    cfg = PlanConfig(nside=4, embed=heads * 8, heads=heads, batch=1, world=world, dtype=dtype)
    candidates = [e for e in plan_layer(cfg) if e.ulysses_degree is not None]
    fewest = min(candidates, key=lambda e: (max(e.bytes_sent), e.ulysses_degree))
    choice = choose_strategy(heads, world, dtype=getattr(torch, dtype))
    assert choice.ulysses_degree == fewest.ulysses_degree


def test_plan_command_line_json(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run(
        [sys.executable, "-m", "hpattn_dist", "plan", "--nside", "64", "--embed", "256", "--heads", "8",
         "--world", "4,8", "--dtype", "bfloat16", "--gpu-memory", "80GiB", "--window-nside", "8",
         "--mode", "neighbourhood", "--link", "450GB/s", "--json", str(out)],
        capture_output=True, text=True, timeout=120, check=True)
    assert "PREDICTED" in proc.stdout and "recommended" in proc.stdout
    records = json.loads(out.read_text())
    assert {r["world"] for r in records} == {4, 8}
    for r in records:
        assert {"strategy", "bytes_sent_per_rank", "peak_bytes_per_rank", "fits"} <= set(r)
        assert r["predicted"] is True
    names = {r["strategy"] for r in records if r["world"] == 8}
    assert names == {"ring", "hybrid:U2", "hybrid:U4", "ulysses", "local:neighbourhood:8"}
    assert sum(r["recommended"] for r in records) == 2  # one per table


def test_the_table_says_why_ulysses_is_missing():
    """A candidate left out is named with the reason, not dropped from the table in silence."""
    cfg = PlanConfig(nside=8, embed=64, heads=4, batch=1, world=8)
    estimates = plan_layer(cfg)
    assert "ulysses" not in {e.strategy for e in estimates}
    assert "ulysses: not a candidate (H = 4 is not divisible by P = 8)" in format_plan(cfg, estimates)
    fine = PlanConfig(nside=8, embed=64, heads=4, batch=1, world=4)
    assert "not a candidate" not in format_plan(fine, plan_layer(fine))


def test_nothing_fits_a_tiny_device():
    cfg = PlanConfig(nside=64, embed=256, heads=8, batch=1, world=4, gpu_memory=2**20)
    estimates = plan_layer(cfg)
    assert not any(e.fits for e in estimates) and recommend(estimates) is None
    roomy = PlanConfig(nside=64, embed=256, heads=8, batch=1, world=4)
    assert all(e.fits for e in plan_layer(roomy))


def test_bad_plan_arguments_exit_2():
    proc = subprocess.run([sys.executable, "-m", "hpattn_dist", "plan", "--nside", "6", "--embed", "64",
                           "--heads", "4", "--world", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "power of two" in proc.stderr
