"""``hpattn-dist bench --mode cross`` smoke: the whole mode at a tiny size on 2 gloo ranks (a
benchmark, not a test of speed: it checks the record structure, that the bytes each rank counted
equal the closed form written out here, and that the ratios are the ones the table claims), and
the window accounting (``window_reach``) against healpy's neighbours."""

from __future__ import annotations

import inspect
import json

import pytest

from hpattn_dist.cross import DistributedSpatialCrossAttention, SpatialCrossAttention
from hpattn_dist.tools.bench import _check_locality_option, window_reach
from hpattn_dist.tools.bench_report import format_tables
from hpattn_dist.tools.cli import main

pytestmark = pytest.mark.timeout(120)

# the locality option (window_nside, mode) may not be in this build yet: then only "none" runs
LOCALITY = "window_nside" in inspect.signature(DistributedSpatialCrossAttention).parameters
WINDOWS = ["none", "cell:1", "neighbourhood:1"] if LOCALITY else ["none"]
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
    expected_rows = [(case, w, impl) for case in ("encoder", "decoder") for w in WINDOWS
                     for impl in ("oracle", "ring", "ulysses")]
    assert [(r["case"], r["window"], r["strategy"] or r["impl"]) for r in records] == expected_rows
    for r in records:
        nq, nk = (192, 48) if r["case"] == "decoder" else (48, 192)  # nside 4 / 2 pixels
        assert (r["npix_q"], r["npix_k"]) == (nq, nk)
        assert r["kv_dim"] == (C if r["case"] == "encoder" else E)
        assert r["full_score_matrix_bytes"] == B * H * nq * nk * A
        if r["impl"] == "oracle":
            assert r["world_size"] == 1 and r["bytes_per_rank"] == [0]
            assert len(r["peak_mem_bytes_per_rank"]) == 1
            oracle = r
            continue
        if "skipped" in r:
            assert r["window"] != "none" and r["strategy"] != "ring", r  # the dense layer always runs
            continue
        assert r["world_size"] == 2 and oracle["threads_per_rank"] == 2 * r["threads_per_rank"]
        assert r["q_sizes"] == [nq // 2] * 2 and r["k_sizes"] == [nk // 2] * 2
        assert len(r["peak_mem_bytes_per_rank"]) == 2
        assert r["efficiency_fwd_bwd"] == pytest.approx(oracle["fwd_bwd_s"] / r["fwd_bwd_s"])
        assert r["peak_mem_vs_oracle"] == pytest.approx(
            max(r["peak_mem_bytes_per_rank"]) / oracle["peak_mem_bytes_per_rank"][0])
        for rank in range(2):
            fwd, bwd = _closed_form(r["strategy"], r["q_sizes"], r["k_sizes"], rank)
            sent = r["comm_per_rank"][rank]["bytes_sent"]
            assert r["fwd_bytes_per_rank"][rank] + r["bwd_bytes_per_rank"][rank] == \
                r["payload_bytes_per_rank"][rank] == sum(v for k, v in sent.items() if not k.endswith(".meta"))
            if r["window"] == "none":
                assert (r["fwd_bytes_per_rank"][rank], r["bwd_bytes_per_rank"][rank]) == (fwd, bwd), r
                assert r["expected_bytes_per_rank"][rank] == {"forward": fwd, "backward": bwd,
                                                              "total": fwd + bwd}
            else:
                loc = r["locality"]
                assert loc["dense_expected_bytes_per_rank"][rank]["forward"] == fwd
                assert r["fwd_bytes_per_rank"][rank] <= fwd
        if r["window"] == "cell:1":  # 12 base cells, 6 per rank on both grids: nothing crosses
            assert r["locality"]["blocks_with_pairs"] == [[True, False], [False, True]]
            assert r["locality"]["block_skip_fraction"] == 0.5
            if r["strategy"] == "ring":  # blocks without an allowed pair are not sent
                assert r["fwd_bytes_per_rank"] == [0, 0]
    table = format_tables(records, "cross")
    assert "1-process layer" in table and "hpattn ring" in table and "hpattn Ulysses" in table
    assert " NO " not in table


def test_locality_option_is_refused_clearly_where_the_layers_lack_it() -> None:
    if LOCALITY:
        _check_locality_option(SpatialCrossAttention, DistributedSpatialCrossAttention)
    else:
        with pytest.raises(ValueError, match="window_nside"):
            _check_locality_option(SpatialCrossAttention, DistributedSpatialCrossAttention)


@pytest.mark.parametrize("mode,w,nside_q,nside_k,world", [
    ("cell", 1, 2, 4, 2), ("neighbourhood", 1, 4, 2, 3), ("neighbourhood", 2, 2, 4, 2),
    ("cell", 2, 4, 2, 5),
])
def test_window_reach_matches_healpy_neighbours(mode, w, nside_q, nside_k, world) -> None:
    healpy = pytest.importorskip("healpy")
    import numpy as np

    nq, nk = 12 * nside_q**2, 12 * nside_k**2
    qcell, kcell = np.arange(nq) // (nside_q // w) ** 2, np.arange(nk) // (nside_k // w) ** 2
    cells = np.arange(12 * w * w)
    win = np.zeros((cells.size, cells.size), dtype=bool)  # [query cell, key cell]
    win[cells, cells] = True
    if mode == "neighbourhood":
        nb = healpy.get_all_neighbours(w, cells, nest=True)  # [8, N_c], -1 = none
        for c in cells:
            win[c, nb[:, c][nb[:, c] >= 0]] = True
    allowed = win[qcell[:, None], kcell[None, :]]  # [Nq, Nk]
    def split(n: int) -> list[tuple[int, int]]:  # N // P each, the first N % P ranks one more
        stops = np.cumsum([n // world + (i < n % world) for i in range(world)])
        return [(int(b - a), int(b)) for a, b in zip([n // world + (i < n % world) for i in range(world)], stops)]

    qb, kb = split(nq), split(nk)
    got = window_reach((mode, w), nside_q, nside_k, world)
    assert got["allowed_pair_fraction"] == pytest.approx(allowed.mean())
    assert got["blocks_with_pairs"] == [[bool(allowed[a:b, c:d].any()) for c, d in kb] for a, b in qb]
    assert got["needed_keys_sent_per_rank"] == [
        sum(int(allowed[a:b, c:d].any(axis=0).sum()) for t, (a, b) in enumerate(qb) if t != r)
        for r, (c, d) in enumerate(kb)]
