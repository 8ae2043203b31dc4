#!/usr/bin/env python
"""The halo an idx-flow convolution needs per rank, RING vs NESTED layout (planning arithmetic only).

    python launch/halo_report.py                       # SpatialConv k=9, nside 64, P = 2, 4, 8
    python launch/halo_report.py --nside 32 --k 4 --nside-out 16 --world 2 3 4 --batch 8 --channels 128
    python launch/halo_report.py --json                # one JSON list instead of the table

No process group, no data: the connection table comes from
``idx_flow.utils.compute_connection_indices`` (RING-ordered pixels, healpy's default), its NESTED
twin is the same graph with both grids renumbered (``table_nest[q] = ring2nest(table[nest2ring(q)])``),
and :func:`hpattn_dist.comm.halo.halo_summary` plans every rank's halo as
``convert_model`` would (contiguous ``shard_bounds`` ranges of input and output grids).

Columns, per P and layout: the largest and mean number of input rows a rank receives per call
(its halo), the largest number of ranks it receives from, the largest halo in bytes for a
``[B, N_r, C]`` input of ``--dtype`` (``rows * B * C * itemsize``, each way: the backward sends
the same rows back), and the rows and bytes the rank with the smallest shard would receive if it
all-gathered the whole field (``N_in - N_r``), as a naive port would.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from hpattn_dist.comm.halo import halo_summary
from hpattn_dist.healpix import nest2ring, ring2nest, nside2npix


def nested_table(table: torch.Tensor, nside_in: int, nside_out: int) -> torch.Tensor:
    """The RING table ``[N_out, K]`` with both grids renumbered in NESTED order."""
    n_out = nside2npix(nside_out)
    ring_of_out = nest2ring(nside_out, torch.arange(n_out, dtype=torch.int64))
    rows = table[ring_of_out]  # NESTED output q reads the RING row of its pixel
    return ring2nest(nside_in, rows.reshape(-1)).reshape(rows.shape)


def report(nside_in: int, nside_out: int, k: int, worlds: list[int], row_bytes: int) -> list[dict]:
    """One dict per (P, layout): halo rows / peers / bytes per rank, and the all-gather's."""
    from idx_flow.utils import compute_connection_indices  # optional dependency

    ring, _ = compute_connection_indices(nside_in, nside_out, k)
    ring = torch.from_numpy(ring).to(torch.int64)
    tables = {"RING": ring, "NESTED": nested_table(ring, nside_in, nside_out)}
    n_in = nside2npix(nside_in)
    out = []
    for world in worlds:
        for layout, table in tables.items():
            ranks = halo_summary(table, n_in, world)
            received = [r["rows_received"] for r in ranks]
            gather_rows = n_in - min(r["n_in_local"] for r in ranks)
            out.append({
                "P": world, "layout": layout, "nside_in": nside_in, "nside_out": nside_out, "k": k,
                "halo_rows_max": max(received), "halo_rows_mean": sum(received) / world,
                "peers_max": max(r["peers_received_from"] for r in ranks),
                "halo_bytes_max": max(received) * row_bytes,
                "allgather_rows": gather_rows, "allgather_bytes": gather_rows * row_bytes,
                "per_rank": ranks,
            })
    return out


def _table(rows: list[dict]) -> str:
    head = (f"{'P':>3} {'layout':<7} {'halo rows max':>14} {'mean':>9} {'peers':>6} "
            f"{'halo bytes max':>15} {'all-gather rows':>16} {'all-gather bytes':>17} {'ratio':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['P']:>3} {r['layout']:<7} {r['halo_rows_max']:>14,} {r['halo_rows_mean']:>9.1f} "
            f"{r['peers_max']:>6} {r['halo_bytes_max']:>15,} {r['allgather_rows']:>16,} "
            f"{r['allgather_bytes']:>17,} {r['halo_rows_max'] / r['allgather_rows']:>7.2%}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nside", type=int, default=64, help="input grid nside (default 64)")
    parser.add_argument("--nside-out", type=int, default=None, help="output nside (default: --nside)")
    parser.add_argument("--k", type=int, default=9, help="connections per output pixel (default 9)")
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4, 8], help="group sizes P")
    parser.add_argument("--batch", type=int, default=1, help="B of the [B, N_r, C] input")
    parser.add_argument("--channels", type=int, default=64, help="C of the [B, N_r, C] input")
    parser.add_argument("--dtype", default="float32", help="torch dtype name (default float32)")
    parser.add_argument("--json", action="store_true", help="print JSON (per-rank details too)")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype):
        parser.error(f"unknown dtype {args.dtype!r}")
    if any(w < 1 for w in args.world):
        parser.error("--world values must be >= 1")
    itemsize = torch.empty((), dtype=dtype).element_size()
    row_bytes = args.batch * args.channels * itemsize
    nside_out = args.nside if args.nside_out is None else args.nside_out
    rows = report(args.nside, nside_out, args.k, args.world, row_bytes)
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        print()
        return 0
    print(f"idx-flow table: nside {args.nside} -> {nside_out}, k = {args.k}; a row is "
          f"B x C x itemsize = {args.batch} x {args.channels} x {itemsize} = {row_bytes} bytes")
    print(_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
