"""``hpattn-dist bench --mode cross`` smoke: the whole mode at a tiny size on 2 gloo ranks, with and
without the locality option (a benchmark, not a test of speed: it checks the record structure,
that the bytes each rank counted equal the closed form written out here, what the windows skip,
and that the ratios are the ones the table claims)."""

from __future__ import annotations

import json

import pytest

from hpattn_dist.tools.bench_report import format_tables
from hpattn_dist.tools.cli import main

pytestmark = pytest.mark.timeout(120)

WINDOWS = ["none", "cell:1", "neighbourhood:1"]
# window_nside 1: 12 cells (the base faces), a neighbourhood is a face and its 6 neighbours
CELLS_SEEN = {"cell:1": 1, "neighbourhood:1": 7}
B, E, H, C, S, A = 1, 8, 2, 4, 4, 4  # batch, embed, heads, kv_dim, fp32 item and accumulator bytes


def _closed_form(strategy: str, q_sizes: list[int], k_sizes: list[int], r: int) -> tuple[int, int]:
    """Forward and backward bytes rank r sends (README, Cross-grid attention), written out."""
    p, d, nq, nk = len(q_sizes), E // H, sum(q_sizes), sum(k_sizes)
    if strategy == "ring":  # K and V of P - 1 blocks forward; again, plus the fp32 dK/dV, back
        kv = 2 * S * B * H * d * sum(k_sizes[(r - j) % p] for j in range(p - 1))
        return kv, kv + 2 * A * B * H * d * nk
    h = H // p  # ulysses: q, k, v to head layout and the output back; the transposes in backward
    fwd = S * B * d * ((H - h) * q_sizes[r] + 2 * (H - h) * k_sizes[r] + h * (nq - q_sizes[r]))
    bwd = S * B * d * ((H - h) * q_sizes[r] + h * (nq - q_sizes[r]) + 2 * h * (nk - k_sizes[r]))
    return fwd, bwd


def test_bench_cross_mode_records_and_bytes(tmp_path) -> None:
    out = tmp_path / "cross.json"
    assert main(["bench", "--mode", "cross", "--data-nside", "4", "--latent-nside", "2", "--nproc", "2",
                 "--warmup", "0", "--repeats", "1", "--embed-dim", str(E), "--heads", str(H),
                 "--kv-dim", str(C), "--windows", ",".join(WINDOWS), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["mode"] == "cross" and report["world_size"] == 2
    records = report["records"]
    # each (case, window): the 1-process baseline (with a window: the windowed layer on a group
    # of one, Note [windowed baseline]), then the strategies on 2 ranks
    expected_rows = [(case, w, impl) for case in ("encoder", "decoder") for w in WINDOWS
                     for impl in ("oracle" if w == "none" else "windowed_single", "ring", "ulysses")]
    assert [(r["case"], r["window"], r["strategy"] if r["impl"] == "hpattn_dist" else r["impl"])
            for r in records] == expected_rows
    for r in records:
        nq, nk = (192, 48) if r["case"] == "decoder" else (48, 192)  # nside 4 / 2 pixels
        assert (r["npix_q"], r["npix_k"]) == (nq, nk)
        assert r["kv_dim"] == (C if r["case"] == "encoder" else E)
        assert r["full_score_matrix_bytes"] == B * H * nq * nk * A
        if r["impl"] != "hpattn_dist":
            assert r["world_size"] == 1 and r["bytes_per_rank"] == [0]  # one process sends nothing
            assert len(r["peak_mem_bytes_per_rank"]) == 1
            oracle = r
            continue
        if "skipped" in r:  # the locality option is the halo exchange: ring (or auto) only
            assert r["window"] != "none" and r["strategy"] == "ulysses" and "ring" in r["skipped"], r
            continue
        assert r["world_size"] == 2 and oracle["threads_per_rank"] == 2 * r["threads_per_rank"]
        assert r["q_sizes"] == [nq // 2] * 2 and r["k_sizes"] == [nk // 2] * 2
        assert len(r["peak_mem_bytes_per_rank"]) == 2
        assert r["efficiency_fwd_bwd"] == pytest.approx(oracle["fwd_bwd_s"] / r["fwd_bwd_s"])
        single_peak = oracle["peak_mem_bytes_per_rank"][0]  # may be 0 at this size: no ratio then
        assert r["peak_mem_vs_single"] == (
            pytest.approx(max(r["peak_mem_bytes_per_rank"]) / single_peak) if single_peak else None)
        for rank in range(2):
            sent = r["comm_per_rank"][rank]["bytes_sent"]
            assert r["fwd_bytes_per_rank"][rank] + r["bwd_bytes_per_rank"][rank] == \
                r["payload_bytes_per_rank"][rank] == sum(v for k, v in sent.items() if not k.endswith(".meta"))
            fwd, bwd = (r["fwd_bytes_per_rank"][rank], r["bwd_bytes_per_rank"][rank])
            assert r["expected_bytes_per_rank"][rank] == {"forward": fwd, "backward": bwd, "total": fwd + bwd}
            if r["window"] == "none":
                assert (fwd, bwd) == _closed_form(r["strategy"], r["q_sizes"], r["k_sizes"], rank), r
        if r["window"] == "none":
            assert "locality" not in r
            continue
        seen = CELLS_SEEN[r["window"]]
        loc = r["locality"]
        assert loc["pairs_skipped"] == pytest.approx(1 - seen / 12)
        assert loc["blocks_skipped"] == pytest.approx(1 - seen / 12)
        ring_fwd = sum(_closed_form("ring", r["q_sizes"], r["k_sizes"], rank)[0] for rank in range(2))
        assert loc["fwd_bytes_skipped"] == pytest.approx(1 - sum(r["fwd_bytes_per_rank"]) / ring_fwd)
        if r["window"] == "cell:1":  # 6 faces per rank on both grids: no key crosses
            assert r["fwd_bytes_per_rank"] == r["bwd_bytes_per_rank"] == [0, 0]
        else:  # each face has a neighbour on the other rank: halo rows out, their dK/dV back
            assert 0 < r["fwd_bytes_per_rank"][0] <= ring_fwd // 2
            assert r["bwd_bytes_per_rank"] == r["fwd_bytes_per_rank"]  # fp32 rows both ways
    table = format_tables(records, "cross")
    assert "1-process layer" in table and "1 process, window" in table
    assert "hpattn ring" in table and "hpattn Ulysses" in table
    assert " NO " not in table
