"""HEALPix windows and the local-attention plan, against healpy (no communication here).

- cell_neighbours equals healpy's get_all_neighbours(nest=True) for every cell up to nside 64
  and for samples at nside 256 and 8192;
- the dense oracle's window mask equals the healpy-built mask;
- every rank's planned halo is exactly the set of window pixels other ranks own (healpy sets),
  for even, uneven and tiny splits;
- the halo follows the boundary of the shard, not its area (fixed window pixel count);
- the sharded op in one process (all kernels, dtypes, masks, dropout) equals the dense reference;
- the padded faces hold every window as a 3 x 3 block (healpy), the squares of a cell range are
  its aligned runs (healpy's xyf2pix), a folded dropout block drops what each window's own
  block drops (the reference definition), and dropout costs no kernel call per cell.
"""

from __future__ import annotations

import healpy as hp
import numpy as np
import pytest
import torch

from hpattn_dist import healpix_local_attention
from hpattn_dist.healpix import shard_bounds
from hpattn_dist.kernels import DropoutSpec
from hpattn_dist.kernels import keep_mask
from hpattn_dist.local import cell_neighbours, plan_local_attention, window_cells, window_mask
from hpattn_dist.local.windows import cell_squares, padded_face_cells
from hpattn_dist.local.oracle import dense_local_attention
from tests.local_reference import halo_pixels, healpy_window_mask, reference_local_attention


@pytest.mark.parametrize("window_nside", [1, 2, 4, 8, 16, 32, 64])
def test_neighbours_equal_healpy_for_every_cell(window_nside: int) -> None:
    cells = np.arange(12 * window_nside**2)
    ref = hp.get_all_neighbours(window_nside, cells, nest=True).T
    assert np.array_equal(cell_neighbours(window_nside).numpy(), ref)


@pytest.mark.parametrize("window_nside", [256, 8192])
def test_neighbours_equal_healpy_on_samples(window_nside: int) -> None:
    rng = np.random.default_rng(window_nside)
    n = 12 * window_nside**2
    # random cells plus every cell touching a face corner (where neighbours go missing)
    corners = [f * window_nside**2 + m for f in range(12)
               for m in (0, window_nside**2 - 1, (window_nside**2 - 1) // 3, 2 * (window_nside**2 - 1) // 3)]
    cells = np.unique(np.concatenate([rng.integers(0, n, 4000), corners]))
    ref = hp.get_all_neighbours(window_nside, cells, nest=True).T
    assert np.array_equal(cell_neighbours(window_nside, torch.from_numpy(cells)).numpy(), ref)


@pytest.mark.parametrize("window_nside", [1, 2, 4, 16])
def test_window_sizes(window_nside: int) -> None:
    cells = window_cells(window_nside, "neighbourhood")
    sizes = (cells >= 0).sum(1)
    for row in cells.tolist():
        present = [u for u in row if u >= 0]
        assert len(set(present)) == len(present)  # a window is a set of distinct cells
    if window_nside == 1:
        assert sizes.tolist() == [7] * 12  # each base face and its 6 neighbours
    else:
        # 24 cells touch a corner where only three base faces meet (8 such corners, 3 cells each)
        assert int((sizes == 8).sum()) == 24 and int((sizes == 9).sum()) == sizes.numel() - 24
    assert window_cells(window_nside, "cell").tolist() == [[u] for u in range(cells.shape[0])]


@pytest.mark.parametrize("nside,window_nside,mode", [(4, 1, "neighbourhood"), (4, 2, "cell"),
                                                     (8, 2, "neighbourhood"), (8, 8, "neighbourhood")])
def test_dense_window_mask_equals_healpy(nside: int, window_nside: int, mode: str) -> None:
    assert torch.equal(window_mask(nside, window_nside, mode), healpy_window_mask(nside, window_nside, mode))


SPLITS = [
    (4, 1, "neighbourhood", [192]),
    (4, 1, "neighbourhood", [96, 96]),
    (4, 1, "neighbourhood", [3, 100, 10, 0, 79]),  # shards smaller than a cell (16), an empty one
    (4, 2, "cell", [50, 50, 50, 42]),
    (8, 2, "neighbourhood", [154, 154, 153, 153, 154]),
    (8, 4, "neighbourhood", [1, 2, 765]),
]


@pytest.mark.parametrize("nside,window_nside,mode,sizes", SPLITS)
def test_planned_halo_is_exactly_the_foreign_window_pixels(nside, window_nside, mode, sizes) -> None:
    start = 0
    for rank, size in enumerate(sizes):
        plan = plan_local_attention(tuple(sizes), window_nside, mode, rank)
        expect = halo_pixels(nside, window_nside, mode, start, start + size)
        assert plan.halo.recv_pixels.tolist() == sorted(expect)
        start += size
    total_sent = sum(plan_local_attention(tuple(sizes), window_nside, mode, r).halo.rows_sent
                     for r in range(len(sizes)))
    assert total_sent == plan.halo.total_rows


def test_halo_follows_the_shard_boundary_not_its_area() -> None:
    """Fixed window (16 pixels per cell) and P = 2: each time nside doubles the field grows 4x,
    each rank's halo about 2x (the length of the shard's boundary, a band as wide as the
    window), so its share of the shard halves. (A halo cannot be constant on the sphere: the
    boundary between two patches grows with nside; it is constant per unit of boundary.)"""
    rows, shares = [], []
    for nside, window_nside in ((8, 2), (16, 4), (32, 8)):
        sizes = tuple(b - a for a, b in shard_bounds(12 * nside**2, 2))
        received = max(plan_local_attention(sizes, window_nside, "neighbourhood", r).halo.rows_received
                       for r in range(2))
        rows.append(received)
        shares.append(received / max(sizes))
    for small, large in zip(rows, rows[1:]):
        assert 1.5 * small <= large <= 2.2 * small, rows
    for small, large in zip(shares, shares[1:]):
        assert large <= 0.55 * small, shares


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_halo_in_window_cells_does_not_grow_with_n(world_size: int) -> None:
    """Fixed window grid (window_nside 2, cells of c = (nside/2)**2 pixels) and fixed P: each
    rank's halo is the same number of cells at nside 8, 16 and 32 (so the same share of N)."""
    cells = []
    for nside in (8, 16, 32):
        sizes = tuple(b - a for a, b in shard_bounds(12 * nside**2, world_size))
        rows = [plan_local_attention(sizes, 2, "neighbourhood", r).halo.rows_received
                for r in range(world_size)]
        c = (nside // 2) ** 2
        assert all(n % c == 0 for n in rows), rows  # whole cells
        cells.append([n // c for n in rows])
    assert cells[0] == cells[1] == cells[2] and max(cells[0]) > 0, cells


def _qkv(n: int, dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, n, 8, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
            for _ in range(3)]


@pytest.mark.parametrize("nside,window_nside", [(4, 2), (8, 4)])  # windows as lists, as padded faces
@pytest.mark.parametrize("backend", ["auto", "manual"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2.5e-2)])
def test_single_process_op_matches_reference(backend, dtype, tol, nside, window_nside) -> None:
    mode = "neighbourhood"
    q, k, v = _qkv(12 * nside**2, dtype, 1)
    out = healpix_local_attention(q, k, v, window_nside=window_nside, mode=mode, backend=backend)
    assert out.dtype == dtype
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_local_attention(qr, kr, vr, healpy_window_mask(nside, window_nside, mode))
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), g.to(dtype))
    refs = torch.autograd.grad(ref, (qr, kr, vr), g)
    for a, b in [(out, ref), *zip(grads, refs)]:
        assert (a.double() - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def test_single_process_dropout_and_masks_match_reference() -> None:
    nside, window_nside = 4, 1
    n = 12 * nside**2
    q, k, v = _qkv(n, torch.float64, 2)
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(2, n, generator=gen) > 0.6
    mask[1, :16] = False  # a whole cell masked in one batch element
    bias = torch.randn(2, 2, n, generator=gen, dtype=torch.float64, requires_grad=True)
    out = healpix_local_attention(q, k, v, window_nside=window_nside, mode="cell", dropout_p=0.3,
                                  dropout_seed=11, key_mask=mask, key_bias=bias)
    ref_bias = bias.masked_fill(~mask[:, None, :], float("-inf"))
    ref = reference_local_attention(q, k, v, healpy_window_mask(nside, window_nside, "cell"),
                                    key_bias=ref_bias, dropout=DropoutSpec(0.3, 11))
    dense = dense_local_attention(q, k, v, window_nside=window_nside, mode="cell", key_bias=ref_bias,
                                  dropout_p=0.3, dropout_seed=11)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v, bias), g)
    want = torch.autograd.grad(ref, (q, k, v, bias), g)
    assert (out - ref).abs().max() < 1e-12 and (dense - ref).abs().max() < 1e-12
    assert torch.isfinite(out).all() and (out[1, :, :16] == 0).all()
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-12


@pytest.mark.parametrize("window_nside", [1, 2, 4, 8, 16])
def test_padded_faces_hold_every_window_as_a_block(window_nside: int) -> None:
    """Note [padded faces]: in face f's padded grid the 3 x 3 block around cell (x, y) holds that
    cell's window, each healpy neighbour at its step (SW, W, NW, N, NE, E, SE, S), -1 where healpy
    has none; every cell sits at its own (x, y)."""
    n = window_nside
    padded = padded_face_cells(n)
    steps = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))
    cells = np.arange(12 * n * n)
    ref = hp.get_all_neighbours(n, cells, nest=True).T
    face, pix = np.divmod(cells, n * n)
    x = np.array([sum(((p >> (2 * b)) & 1) << b for b in range(8)) for p in pix])
    y = np.array([sum(((p >> (2 * b + 1)) & 1) << b for b in range(8)) for p in pix])
    assert np.array_equal(padded[face, x + 1, y + 1].numpy(), cells)
    for d, (dx, dy) in enumerate(steps):
        assert np.array_equal(padded[face, x + dx + 1, y + dy + 1].numpy(), ref[:, d]), (d, dx, dy)


@pytest.mark.parametrize("first,stop,window_nside", [(0, 192, 4), (3, 40, 4), (17, 700, 8), (5, 6, 2), (0, 12, 1)])
def test_cell_squares_cover_the_range_once(first: int, stop: int, window_nside: int) -> None:
    """The squares are aligned runs of NESTED cells, in order, covering [first, stop) exactly;
    their cells (face, x0 + i, y0 + j) are the run's cells (healpy's xyf2pix)."""
    n = window_nside
    covered = []
    for face, x0, y0, side in cell_squares(first, stop, n):
        run = sorted(int(hp.xyf2pix(n, x0 + i, y0 + j, face, nest=True)) for i in range(side) for j in range(side))
        assert run == list(range(run[0], run[0] + side * side)) and run[0] % (side * side) == 0
        covered += run
    assert covered == list(range(first, stop))


def test_folded_keep_mask_is_each_windows_own_mask() -> None:
    """Note [position-keyed dropout] for a block folding windows into its batch dims: window
    (x, y), batch element b and head h drop what the independent definition drops for their
    global query and key pixels, in either layout of the batch dims."""
    from hpattn_dist.kernels.dropout import FoldedIndex
    from tests.reference import reference_keep_mask

    gen = torch.Generator().manual_seed(4)
    windows, batch, heads, y, n_q, n_k = 3, 2, 3, 4, 5, 6
    q_index = torch.randint(0, 3000, (windows, y, n_q), generator=gen)
    k_index = torch.randint(0, 3000, (windows, y, n_k), generator=gen)
    spec = DropoutSpec(0.4, 1234, h_offset=2, folded=FoldedIndex(heads, q_index, k_index))
    rows = windows * batch * heads
    got = keep_mask(spec, rows, y, n_q, n_k, "cpu")
    assert torch.equal(keep_mask(spec, rows * y, 1, n_q, n_k, "cpu").view(rows, y, n_q, n_k), got)
    got = got.view(windows, batch, heads, y, n_q, n_k)
    for x in range(windows):
        for w in range(y):
            for i in range(n_q):  # one query row at a time: the reference takes a query offset
                one = DropoutSpec(0.4, 1234, q_offset=int(q_index[x, w, i]), h_offset=2, k_index=k_index[x, w])
                want = reference_keep_mask(one, batch, heads, 1, n_k)[:, :, 0]
                assert torch.equal(got[x, :, :, w, i], want), (x, w, i)


def test_dropout_runs_a_few_calls_not_one_per_cell(monkeypatch) -> None:
    """Windows with dropout are folded into the batch like any other (one call per group of cells;
    for a group of squares three, and two more for the columns that hold a missing cell): the
    manual kernel runs a few times per forward, not once per cell (192 here)."""
    from hpattn_dist.kernels import dispatch

    calls = []
    real = dispatch.manual_forward
    monkeypatch.setattr(dispatch, "manual_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    nside, window_nside = 16, 4  # 192 cells
    q, k, v = _qkv(12 * nside**2, torch.float64, 5)
    for mode in ("cell", "neighbourhood"):
        calls.clear()
        healpix_local_attention(q, k, v, window_nside=window_nside, mode=mode, dropout_p=0.2, dropout_seed=3)
        assert 0 < len(calls) <= 20, (mode, len(calls))
