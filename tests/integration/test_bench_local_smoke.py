"""``hpattn-dist bench --mode local`` smoke: the whole mode at a tiny size on 2 gloo ranks (a
benchmark, not a test of speed: it checks that every measurement runs, the halo bytes are counted
and the ratios are the ones the table claims)."""

from __future__ import annotations

import json

import pytest

from hpattn_dist.tools.bench_report import format_tables
from hpattn_dist.tools.cli import main


def test_bench_local_mode_runs_every_measurement(tmp_path) -> None:
    out = tmp_path / "local.json"
    assert main(["bench", "--mode", "local", "--nsides", "4", "--nproc", "2", "--warmup", "0",
                 "--repeats", "1", "--embed-dim", "8", "--heads", "2", "--local-modes", "neighbourhood",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["mode"] == "local" and report["world_size"] == 2
    local, ring, single, attention, *flex = report["records"]
    assert [r["impl"] for r in (local, ring, single, attention)] == ["local", "ring", "local_single", "attention"]
    assert local["window_nside"] == 1 and local["cell_pixels"] == 16  # nside 4 / 8, at least 1
    assert [r["world_size"] for r in (local, ring, single)] == [2, 2, 1]
    assert single["threads_per_rank"] == 2 * local["threads_per_rank"]
    for rank in range(2):  # every rank sends halo rows, and no ring step
        sent = local["comm_per_rank"][rank]["bytes_sent"]
        assert sent["local.halo.forward"] > 0 and not any(k.startswith("ring") for k in sent), sent
        assert "ring.forward" in ring["comm_per_rank"][rank]["bytes_sent"]
    assert single["bytes_per_rank"] == [0]  # one process: nothing sent
    assert local["efficiency_fwd_bwd"] == pytest.approx(single["fwd_bwd_s"] / local["fwd_bwd_s"])
    assert local["speed_vs_ring_fwd_bwd"] == pytest.approx(ring["fwd_bwd_s"] / local["fwd_bwd_s"])
    # The attention alone against FlexAttention (Note [flex baseline]): block sizes 128 and 16
    # (the cell), each built or reported as not built; the ratio from the faster one's minimum.
    assert [r["impl"] for r in flex] == ["flex", "flex"] and [r["block_size"] for r in flex] == [128, 16]
    built = [r["fwd_min_s"] for r in flex if "error" not in r]
    if built:
        assert attention["speed_vs_flex_fwd"] == pytest.approx(min(built) / attention["fwd_min_s"])
    assert attention["fwd_bwd_over_fwd"] == pytest.approx(attention["fwd_bwd_min_s"] / attention["fwd_min_s"])
    table = format_tables(report["records"], "local")
    assert "local (neighbourhood)" in table and "global ring" in table and "local, 1 process" in table
    assert "healpix_local_attention" in table and "FlexAttention, block 16" in table
