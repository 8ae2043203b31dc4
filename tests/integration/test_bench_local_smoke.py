"""launch/bench_local.py smoke: the whole script at a tiny size on 2 gloo ranks (a benchmark, not a
test of speed: it only checks that every measurement runs and the halo bytes are counted)."""

from __future__ import annotations

from tests.harness import run_ranks


def _bench(rank: int, world_size: int) -> list[dict]:
    from launch import bench_local

    return bench_local.main(["--nsides", "4", "--window-div", "2", "--embed-dim", "8", "--heads", "2",
                             "--warmup", "0", "--repeats", "1"])


def test_bench_local_runs_every_measurement() -> None:
    rows = run_ranks(_bench, 2, timeout=120)[0]
    assert [r["impl"] for r in rows] == ["local", "ring (global)", "local, single process"]
    local, ring, single = rows
    assert all(r["fwd_bwd_s"] > 0 for r in rows)
    assert local["comm_per_rank"][0]["bytes_sent"]["local.halo.forward"] > 0
    assert "ring.forward" in ring["comm_per_rank"][0]["bytes_sent"] and single["world_size"] == 1
