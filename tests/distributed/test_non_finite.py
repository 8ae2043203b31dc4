"""NaN and inf are defined once (Note [non-finite inputs] in ``hpattn_dist/masks.py``), and every
path and every oracle follows that definition (issue 23 item 5).

The reference is :func:`tests.reference.reference_attention`: the explicit float64 softmax of each
query over its allowed keys only (unmasked, in its window; healpy's neighbours for windows). A
NaN or an infinity in a query makes its row NaN, in a key or value NaN exactly the rows that
attend to it; a key a row does not attend to (masked, outside its window) never reaches it. On P = 2 gloo ranks
(one job) the functional entry points and the distributed layers are gathered and compared with
it, and so are the library's single-device oracles (``SpatialSelfAttention``,
``SpatialCrossAttention``, ``LocalSpatialSelfAttention``, ``local.oracle.dense_local_attention``),
computed in the parent: NaN positions equal, +-inf positions equal, finite values to 1e-12.

Windows of padded squares (nside 8, window 4: a face is a square of 4 x 4 cells, with the zero blocks
where three faces meet) run their own cases on the same ranks: the non-finite flags are found once
per call and read like the keys (Note [known finite inputs] in ``masks.py``), so an infinite key in a
column beside a zero block (computed twice: Note [local attention plan]), an infinite value that
reaches the other rank through the halo, and a NaN query each mark exactly the reference's rows.

Legend: B batch, H heads, N pixels (48: nside 2), D head dim, E embed dim, P = 2.
"""

from __future__ import annotations

import functools

import pytest
import torch

from hpattn_dist import (DistributedLocalSpatialSelfAttention, DistributedSpatialCrossAttention,
                         DistributedSpatialSelfAttention, LocalSpatialSelfAttention, SpatialCrossAttention,
                         SpatialSelfAttention, healpix_local_attention, ring_cross_attention)
from hpattn_dist.healpix import shard_bounds
from hpattn_dist.local.oracle import dense_local_attention
from hpattn_dist.local.plan import plan_local_attention
from hpattn_dist.masks import known_finite
from hpattn_dist.strategies import sharded_attention
from tests.harness import run_ranks
from tests.local_reference import (healpy_cross_window_mask, healpy_window_cells, healpy_window_mask,
                                   reference_local_attention)
from tests.reference import reference_attention

WORLD, B, H, N, D, E = 2, 2, 2, 48, 4, 8
NAN, INF = float("nan"), float("inf")


def _qkv(case: str):
    g = torch.Generator().manual_seed(len(case))
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(3))
    mask = None
    if case == "nan query":
        q[0, 1, 5, 2] = NAN
    elif case == "nan pixel":  # a NaN input pixel: its key and value
        k[1, :, 30] = NAN
        v[1, :, 30] = NAN
    elif case == "nan value":
        v[0, 0, 7, 1] = NAN
    elif case == "inf value":
        v[0, 1, 40, 3] = INF
    elif case == "inf query":  # every score of its row -inf: the kernels gave zeros (fuzz-5)
        q[0, 0, 9, 1] = -INF
        k[0, 0, :, 1] = k[0, 0, :, 1].abs()
    elif case == "inf keys on one rank":  # rank 1's keys of (0, 0): a block of -inf scores for
        k[0, 0, N // 2:, 1] = INF         # the queries with q[..., 1] < 0 (the CPU flash kernel
        # returned zeros with lse 0 for it, which the ring merged as a block of real keys)
    elif case == "masked nan pixel":  # masked in batch element 1 only: it stays in the ring
        k[1, :, 30] = NAN
        v[1, :, 30] = NAN
        mask = torch.ones(B, N, dtype=torch.bool)
        mask[1, 30] = False
    elif case == "masked nan query, no key":  # batch element 1: every key masked
        q[1, 0, 3, 0] = NAN
        mask = torch.ones(B, N, dtype=torch.bool)
        mask[1] = False
    return q, k, v, mask


CASES = ("nan query", "nan pixel", "nan value", "inf value", "inf query", "inf keys on one rank", "masked nan pixel",
         "masked nan query, no key")
WINDOW = (1, "neighbourhood")


def _bias(mask):
    return None if mask is None else torch.zeros(B, N, dtype=torch.float64).masked_fill(~mask, -INF)


def _reference(path: str, case: str) -> torch.Tensor:
    q, k, v, mask = _qkv(case)
    if path.startswith("local"):
        return reference_local_attention(q, k, v, healpy_window_mask(2, *WINDOW), key_bias=_bias(mask))
    if path.startswith("cross window"):
        allowed = healpy_cross_window_mask(2, 2, *WINDOW)
        return reference_attention(q, k, v, key_bias=_bias(mask), allowed=allowed)
    return reference_attention(q, k, v, key_bias=_bias(mask))


PATHS = {
    "ring": lambda q, k, v, m: sharded_attention("ring", q, k, v, key_mask=m),
    "ulysses": lambda q, k, v, m: sharded_attention("ulysses", q, k, v, key_mask=m),
    "ring, sdpa kernel": lambda q, k, v, m: sharded_attention("ring", q, k, v, key_mask=m, backend="sdpa"),
    "local": lambda q, k, v, m: healpix_local_attention(q, k, v, window_nside=WINDOW[0], mode=WINDOW[1],
                                                        key_mask=m),
    "cross window": lambda q, k, v, m: ring_cross_attention(q, k, v, key_mask=m, window_nside=WINDOW[0],
                                                            mode=WINDOW[1]),
}


# --------------------------------------------------------------------------------------------
# Layers: a NaN in one input pixel of x, single-device oracle vs distributed layer

LAYERS = ("self", "cross", "cross window", "local")


def _x(case: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(B, N, E, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    mask = torch.ones(B, N, dtype=torch.bool)
    if case == "nan pixel":
        x[1, 30, 2] = NAN
    elif case == "masked nan pixel":
        x[1, 30, 2] = NAN
        mask[1, 30] = False
    return x, mask


def _layer(kind: str, distributed: bool):
    torch.manual_seed(0)
    kw = {"attn_backend": "manual"}
    if kind == "self":
        layer = (DistributedSpatialSelfAttention if distributed else SpatialSelfAttention)(E, H, **kw)
    elif kind.startswith("cross"):
        if kind == "cross window":
            kw.update(window_nside=1, mode="neighbourhood")
        layer = (DistributedSpatialCrossAttention if distributed else SpatialCrossAttention)(E, H, **kw)
    else:
        layer = (DistributedLocalSpatialSelfAttention if distributed else LocalSpatialSelfAttention)(
            E, H, window_nside=1, mode="neighbourhood", **kw)
    return layer.double()


def _call_layer(layer, kind: str, x, mask):
    if kind.startswith("cross"):
        return layer(x, x, key_mask=mask)
    return layer(x, key_mask=mask)


# Windows of padded squares: nside 8, window 4 (cells of 4 pixels), neighbourhood and cell windows.
SQ_NSIDE, SQ_WINDOW, SQ_C = 8, 4, 4
SQ_N = 12 * SQ_NSIDE**2
SQ_CASES = ("inf key beside a missing cell", "inf value sent in the halo", "nan query", "masked nan key")


def _beside_missing_cell() -> int:
    """A cell in a window's column (dx = +-1) that holds the zero block of a missing cell (three
    faces meet): that column is computed again from its two cells (``LocalPlan.fixes``), so a key
    there reaches the window only through that second computation."""
    fix = next(f for f in plan_local_attention((SQ_N,), SQ_WINDOW, "neighbourhood", 0).fixes if f.dx != 0)
    return int(fix.k_cells[0, 0])


def _sq_qkv(case: str):
    g = torch.Generator().manual_seed(3 + len(case))
    q, k, v = (torch.randn(B, H, SQ_N, D, generator=g, dtype=torch.float64) for _ in range(3))
    mask = None
    half = SQ_N // 2  # rank 1's first pixel: face 6, next to face 5 on rank 0
    if case == "inf key beside a missing cell":  # a score of -inf weighs 0: the rule marks the row
        k[1, 0, _beside_missing_cell() * SQ_C + 1, 2] = INF
    elif case == "inf value sent in the halo":  # on rank 0, read by windows of rank 1
        window = healpy_window_cells(SQ_WINDOW, "neighbourhood")
        w = next(w for u in range(half // SQ_C, SQ_N // SQ_C) for w in sorted(window[u]) if w < half // SQ_C)
        v[1, 0, w * SQ_C + 2, 3] = INF
    elif case == "nan query":
        q[0, 1, half + 77, 0] = NAN
    elif case == "masked nan key":  # masked in batch element 0 only
        k[0, :, 200] = NAN
        mask = torch.ones(B, SQ_N, dtype=torch.bool)
        mask[0, 200] = False
    return q, k, v, mask


def _sq_reference(mode: str, case: str) -> torch.Tensor:
    q, k, v, mask = _sq_qkv(case)
    bias = None if mask is None else torch.zeros(B, SQ_N, dtype=torch.float64).masked_fill(~mask, -INF)
    return reference_local_attention(q, k, v, healpy_window_mask(SQ_NSIDE, SQ_WINDOW, mode), key_bias=bias)


def _job(rank: int, world: int) -> dict:
    res = {}
    lo, hi = shard_bounds(SQ_N, world)[rank]
    for mode in ("neighbourhood", "cell"):
        for case in SQ_CASES:
            q, k, v, mask = (None if t is None else t[:, :, lo:hi] if t.dim() == 4 else t[:, lo:hi]
                             for t in _sq_qkv(case))
            for backend in ("auto", "manual"):
                res["squares", mode, case, backend] = healpix_local_attention(
                    q, k, v, window_nside=SQ_WINDOW, mode=mode, key_mask=mask, backend=backend)
    lo, hi = shard_bounds(N, world)[rank]
    for path, call in PATHS.items():
        for case in CASES:
            q, k, v, mask = (None if t is None else t[:, :, lo:hi] if t.dim() == 4 else t[:, lo:hi]
                             for t in _qkv(case))
            res[path, case] = call(q, k, v, mask)
    for kind in LAYERS:
        for case in ("nan pixel", "masked nan pixel"):
            x, mask = _x(case)
            with torch.no_grad():
                res["layer " + kind, case] = _call_layer(_layer(kind, True), kind, x[:, lo:hi], mask[:, lo:hi])
    return res


@functools.lru_cache(maxsize=None)
def _results() -> list:
    return run_ranks(_job, WORLD, timeout=120)


def _assert_same(got: torch.Tensor, want: torch.Tensor, what) -> None:
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (what, torch.isnan(got).sum().item(),
                                                              torch.isnan(want).sum().item())
    assert torch.equal(torch.isposinf(got), torch.isposinf(want)), what
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), what
    finite = torch.isfinite(want)
    assert (got[finite] - want[finite]).abs().max() <= 1e-12 * want[finite].abs().max(), what


def _gathered(key) -> torch.Tensor:
    return torch.cat([r[key] for r in _results()], dim=2 if not key[0].startswith("layer") else 1)


@pytest.mark.parametrize("case", SQ_CASES)
@pytest.mark.parametrize("mode", ["neighbourhood", "cell"])
def test_windows_of_padded_squares_follow_the_definition(mode, case):
    want = _sq_reference(mode, case)
    rows_nan = torch.isnan(want).any(dim=-1)
    assert rows_nan.any() != (case == "masked nan key") and not rows_nan.all()
    if case == "inf value sent in the halo" and mode == "neighbourhood":  # rank 1's rows read it
        assert rows_nan[..., SQ_N // 2:].any()
    for backend in ("auto", "manual"):
        _assert_same(_gathered(("squares", mode, case, backend)), want, (mode, case, backend))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("path", PATHS)
def test_paths_follow_the_definition(path, case):
    want = _reference(path, case)
    assert not torch.isfinite(want).all() or case.startswith("masked")  # the case is non-finite
    _assert_same(_gathered((path, case)), want, (path, case))


@pytest.mark.parametrize("case", CASES)
def test_local_oracle_follows_the_definition(case):
    """Was: a NaN query row gave 0.0, one NaN pixel made 48/48 rows NaN (the window gives 28)."""
    q, k, v, mask = _qkv(case)
    got = dense_local_attention(q, k, v, window_nside=WINDOW[0], mode=WINDOW[1],
                                key_bias=None if mask is None else _bias(mask)[:, None])
    _assert_same(got, _reference("local", case), case)


@pytest.mark.parametrize("case", ["nan pixel", "masked nan pixel"])
@pytest.mark.parametrize("kind", LAYERS)
def test_single_device_layers_and_distributed_layers_agree(kind, case):
    """The oracles follow the definition (the windowed cross oracle stayed finite at a NaN target;
    a masked NaN pixel reached every row through 0 * NaN), and the distributed layers equal them."""
    x, mask = _x(case)
    with torch.no_grad():
        want = _call_layer(_layer(kind, False), kind, x, mask)
    rows_nan = torch.isnan(want).any(dim=-1)
    if case == "nan pixel":  # the pixel's own row, and the rows attending to it
        assert rows_nan[1, 30] and rows_nan[1].sum() == (N if kind in ("self", "cross") else 28), rows_nan.sum()
    else:  # masked: only the rows its own (NaN) query gives
        assert rows_nan[1, 30] and rows_nan.sum() == 1, rows_nan.sum()
    _assert_same(_gathered(("layer " + kind, case)), want, (kind, case))


def test_known_finite():
    """Note [known finite inputs]: a NaN or an infinity anywhere answers False, so does a sum that
    overflows, a bias of NaN or +inf, and a tensor off the CPU; a bias of -inf masks a key."""
    t = torch.randn(3, 5, dtype=torch.float64)
    bias = torch.zeros(3)
    assert known_finite(t, t, biases=(bias, None)) and known_finite(biases=(bias.fill_(-INF),))
    for bad in (NAN, INF, -INF):
        u = t.clone()
        u[1, 2] = bad
        assert not known_finite(t, u)
    assert not known_finite(torch.full((4,), 1e308, dtype=torch.float64))  # finite, but the sum overflows
    assert not known_finite(biases=(torch.tensor([0.0, NAN]),)) and not known_finite(biases=(torch.tensor([INF]),))
    assert not known_finite(torch.empty(3, device="meta"))


def test_finite_values_whose_sum_overflows_are_not_marked():
    """known_finite answers False for them; the search per row then finds no non-finite value.
    (A window reads 9 of the large values: its rows' sums do not overflow.)"""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, H, SQ_N, D, generator=g, dtype=torch.float64) for _ in range(3))
    v[0, 0, ::SQ_C, 0] = 1e307
    assert torch.isfinite(v).all() and not known_finite(v)
    want = reference_local_attention(q, k, v, healpy_window_mask(SQ_NSIDE, SQ_WINDOW, "neighbourhood"))
    got = healpix_local_attention(q, k, v, window_nside=SQ_WINDOW, mode="neighbourhood")
    assert torch.isfinite(want).all() and torch.allclose(got, want, rtol=1e-10, atol=1e-12)
