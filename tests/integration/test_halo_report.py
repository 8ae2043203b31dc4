"""launch/halo_report.py at a tiny size, against an independent count with healpy and numpy sets."""

from __future__ import annotations

import contextlib
import io
import json

import healpy
import numpy as np
from idx_flow.utils import compute_connection_indices

from hpattn_dist.healpix import shard_bounds
from launch import halo_report


def _halo_rows(table: np.ndarray, n_in: int, world: int) -> list[int]:
    """Input rows each rank's outputs read outside its own input range (numpy sets)."""
    out_b, in_b = shard_bounds(table.shape[0], world), shard_bounds(n_in, world)
    rows = []
    for (c, d), (a, b) in zip(out_b, in_b):
        needed = set(np.unique(table[c:d]).tolist())
        rows.append(len({p for p in needed if not a <= p < b}))
    return rows


def test_report_counts_the_halo_of_ring_and_nested_tables() -> None:
    nside, k, worlds = 4, 9, (2, 3, 5)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = halo_report.main(["--nside", str(nside), "--k", str(k), "--world", *map(str, worlds),
                                 "--batch", "2", "--channels", "3", "--dtype", "float64", "--json"])
    assert code == 0
    rows = {(r["P"], r["layout"]): r for r in json.loads(buf.getvalue())}
    n = 12 * nside**2
    ring, _ = compute_connection_indices(nside, nside, k)
    q = np.arange(n)
    nested = healpy.ring2nest(nside, ring[healpy.nest2ring(nside, q)])
    for world in worlds:
        for layout, table in (("RING", ring), ("NESTED", nested)):
            got = rows[(world, layout)]
            expected = _halo_rows(table, n, world)
            assert [r["rows_received"] for r in got["per_rank"]] == expected, (world, layout)
            assert got["halo_rows_max"] == max(expected)
            assert got["halo_bytes_max"] == max(expected) * 2 * 3 * 8
            assert got["allgather_rows"] == n - min(b - a for a, b in shard_bounds(n, world))
            assert 0 < got["halo_rows_max"] < got["allgather_rows"]
    assert rows[(5, "NESTED")]["halo_rows_max"] != rows[(5, "RING")]["halo_rows_max"]


def test_report_prints_a_table() -> None:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert halo_report.main(["--nside", "2", "--world", "2"]) == 0
    text = buf.getvalue()
    assert "RING" in text and "NESTED" in text and "all-gather" in text
