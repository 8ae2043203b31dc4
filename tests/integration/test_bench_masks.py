"""``hpattn-dist bench --mode masks`` end to end (3 spawned gloo ranks): the JSON schema, and the
bytes and compute it reports against closed forms of the ring's masked-key compaction (Note
[masked key compaction] in ``hpattn_dist/strategies/ring.py``). Speed is not tested.
"""

from __future__ import annotations

import json

import pytest

from hpattn_dist.tools.bench import BenchConfig
from hpattn_dist.tools.cli import main

pytestmark = pytest.mark.timeout(60)

B, H, D, P, NSIDE = 2, 4, 4, 3, 2
FRACTIONS = (0.0, 0.3, 0.7, 1.0)


@pytest.mark.parametrize("bad", [(1.5,), (-0.1,), (), ("x",)])
def test_land_fractions_are_validated(bad):
    with pytest.raises(ValueError, match="land_fractions"):
        BenchConfig(mode="masks", land_fractions=bad)


def test_bench_masks_bytes_and_scores_match_the_closed_forms(tmp_path):
    out = tmp_path / "masks.json"
    rc = main(["bench", "--mode", "masks", "--nsides", str(NSIDE), "--nproc", str(P),
               "--batch", str(B), "--embed-dim", str(H * D), "--heads", str(H),
               "--warmup", "0", "--repeats", "1", "--land-fractions", "0.3,0.7,1",
               "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["mode"] == "masks" and report["world_size"] == P
    records = report["records"]
    # 0 % land (the baseline) is always measured, once per scenario
    assert [(r["scenario"], r["land_fraction"]) for r in records] == \
        [(s, f) for s in ("one_rank", "global") for f in FRACTIONS]

    npix = 12 * NSIDE**2
    n = [npix // P] * P  # 16 pixels per rank
    c = 2 * B * H * D * 4  # K and V of one pixel, fp32
    by_case = {}
    for r in records:
        f, scenario = r["land_fraction"], r["scenario"]
        land = [round(f * n_s) if scenario == "global" or s == 0 else 0 for s, n_s in enumerate(n)]
        kept = [n_s - l_s for n_s, l_s in zip(n, land)]
        assert r["sizes"] == n and r["land_pixels_per_rank"] == land
        assert r["kept_keys_per_rank"] == kept  # the land mask is shared by the batch
        for key in ("fwd_s_per_rank", "fwd_bwd_s_per_rank", "fwd_bytes_per_rank",
                    "payload_bytes_per_rank", "scores_computed_per_rank", "expected_bytes_per_rank"):
            assert len(r[key]) == P, key
        assert r["fwd_s"] > 0 and r["fwd_bwd_s"] > 0
        for rank in range(P):
            # rank r forwards the blocks of ranks r, r-1, ..., r-P+2, each with its kept keys only
            fwd = c * sum(kept[(rank - s) % P] for s in range(P - 1))
            assert r["fwd_bytes_per_rank"][rank] == fwd, (r["scenario"], f, rank)
            # backward: K/V again, plus P fp32 dK/dV accumulators (every kept block once)
            assert r["payload_bytes_per_rank"][rank] == 2 * fwd + c * sum(kept)
            assert r["expected_bytes_per_rank"][rank]["total"] == 2 * fwd + c * sum(kept)
            assert r["scores_computed_per_rank"][rank] == B * H * n[rank] * sum(kept)
            assert r["keys_computed_per_rank"][rank] == sum(kept)
            assert r["key_blocks_computed_per_rank"][rank] == sum(m > 0 for m in kept)
        sav = r["savings_vs_no_land"]
        assert sav["fwd_bytes_ratio"] == pytest.approx(
            sum(r["fwd_bytes_per_rank"]) / (c * (P - 1) * npix))
        assert sav["scores_ratio"] == pytest.approx(sum(kept) / npix)
        assert sav["fwd_time_ratio"] > 0 and sav["fwd_bwd_time_ratio"] > 0
        by_case[scenario, f] = r

    # 100 % land on rank 0: its block costs nothing -- each rank that forwards it (every rank but
    # P - 1, which receives it last) sends exactly that block's bytes less than at 0 % land
    full, none = by_case["one_rank", 1.0], by_case["one_rank", 0.0]
    saved = [a - b for a, b in zip(none["fwd_bytes_per_rank"], full["fwd_bytes_per_rank"])]
    assert saved == [c * n[0]] * (P - 1) + [0]
    assert full["key_blocks_computed_per_rank"] == [P - 1] * P
    # 100 % land everywhere: nothing is sent or computed
    assert by_case["global", 1.0]["payload_bytes_per_rank"] == [0] * P
    assert by_case["global", 1.0]["scores_computed_per_rank"] == [0] * P
