"""Windowed cross-grid attention (``ring_cross_attention(..., window_nside=W)``) on real gloo ranks.

Queries on a NESTED grid of nside_q, keys on one of nside_k, split over P = 1..5 ranks
independently and unevenly (an empty rank on each side at P >= 3). The parent assembles every
rank's output and gradient shards and compares them with a dense float64 reference whose
allowed (query, key) pairs come from healpy (``get_all_neighbours(W, nest=True)`` and integer
division of the NESTED indices, :func:`tests.local_reference.healpy_cross_window_mask`), not from
the library's windows. Bytes sent must equal :func:`hpattn_dist.local.window_traffic` and the halo
counted from healpy's neighbour sets, and be fewer than the global ring's.

Legend: B batch, H heads, D head dim, Nq / Nk query / key pixels, W window nside, P group size.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from hpattn_dist import (
    DistributedSpatialCrossAttention, SpatialCrossAttention, count_communication, ring_cross_attention,
)
from hpattn_dist.kernels import DropoutSpec
from hpattn_dist.local import window_traffic
from hpattn_dist.strategies import sharded_attention
from tests.distributed.test_cross_attention import split  # uneven splits, one rank empty at P >= 3
from tests.harness import run_ranks
from tests.local_reference import healpy_cross_window_mask, healpy_window_cells, reference_local_attention

B, H, D = 2, 2, 4
F64 = 8
TOL = 1e-10
SEED = 11  # dropout_seed of the functional cases
TORCH_SEED = 4321  # torch.manual_seed before each layer call (the layer draws its dropout seed)

# name: (nside_q, nside_k, W, mode, backend, mask, bias ("", "bn", "bhn"), dropout_p)
CASES = {
    "enc-nbhd": (2, 4, 2, "neighbourhood", "manual", False, "", 0.0),          # Nq < Nk
    "dec-cell-mask-bias": (4, 2, 1, "cell", "auto", True, "bhn", 0.0),         # Nq > Nk
    "dec-nbhd-mask-bias": (8, 1, 1, "neighbourhood", "sdpa", True, "bn", 0.0),  # 64 queries per cell
    "same-nside-cell": (4, 4, 2, "cell", "manual", False, "", 0.0),             # same grid, two splits
    "enc-dropout": (2, 4, 1, "neighbourhood", "manual", True, "bn", 0.3),
    "enc-squares-dropout": (4, 8, 4, "neighbourhood", "manual", False, "", 0.25),  # padded faces
}

# name: (E, H, kv_dim, nside_q, nside_k, W, mode, dropout)
LAYER_CASES = {
    "encoder-nbhd": (8, 2, 5, 2, 4, 2, "neighbourhood", 0.0),
    "decoder-cell-dropout": (8, 2, 3, 4, 2, 1, "cell", 0.3),
}


def _splits(name: str, p: int) -> tuple[list[int], list[int]]:
    nside_q, nside_k = CASES[name][:2] if name in CASES else LAYER_CASES[name][3:5]
    salt = sorted([*CASES, *LAYER_CASES]).index(name)
    return split(12 * nside_q**2, p, salt), split(12 * nside_k**2, p, salt + 1)


def _data(name: str) -> dict:
    nside_q, nside_k, _, _, _, mask, bias, _ = CASES[name]
    nq, nk = 12 * nside_q**2, 12 * nside_k**2
    g = torch.Generator().manual_seed(100 + list(CASES).index(name))
    data = {x: torch.randn(B, H, n, D, generator=g, dtype=torch.float64)
            for x, n in (("q", nq), ("k", nk), ("v", nk), ("dout", nq))}
    data["mask"] = data["bias"] = None
    if mask:
        data["mask"] = torch.rand(B, nk, generator=g) > 0.4
        data["mask"][1, : nk // 2] = False  # half the keys of batch 1: some windows fully masked
    if bias:
        data["bias"] = torch.randn(*((B, nk) if bias == "bn" else (B, H, nk)), generator=g, dtype=torch.float64)
    return data


def _slices(sizes: list[int], rank: int) -> slice:
    return slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))


# --------------------------------------------------------------------------------------------
# Rank side


def _job(rank: int, p: int) -> dict:
    out = {name: _run_case(rank, p, name) for name in CASES}
    out["layer"] = {name: _run_layer(rank, p, name) for name in LAYER_CASES}
    if p == 3:
        out["errors"] = _fail_together(rank)
    return out


def _run_case(rank: int, p: int, name: str) -> dict:
    _, _, w, mode, backend, _, _, dropout_p = CASES[name]
    data = _data(name)
    q_sizes, k_sizes = _splits(name, p)
    qs, ks = _slices(q_sizes, rank), _slices(k_sizes, rank)
    q = data["q"][:, :, qs].clone().requires_grad_()
    k, v = (data[x][:, :, ks].clone().requires_grad_() for x in ("k", "v"))
    mask = None if data["mask"] is None else data["mask"][:, ks].clone()
    bias = None if data["bias"] is None else data["bias"][..., ks].clone().requires_grad_()
    with count_communication() as fwd:
        out = ring_cross_attention(q, k, v, backend=backend, dropout_p=dropout_p, key_mask=mask, key_bias=bias,
                                   dropout_seed=SEED, window_nside=w, mode=mode)
    with count_communication() as bwd:
        out.backward(data["dout"][:, :, qs])
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad,
            "dbias": None if bias is None else bias.grad, "fwd": fwd.as_dict(), "bwd": bwd.as_dict()}


def _layers(name: str):
    e, h, kv_dim, _, _, w, mode, dropout = LAYER_CASES[name]
    torch.manual_seed(7)
    oracle = SpatialCrossAttention(e, h, kv_dim, dropout=dropout, window_nside=w, mode=mode).double()
    layer = DistributedSpatialCrossAttention(e, h, kv_dim, dropout=dropout, attn_backend="manual",
                                             window_nside=w, mode=mode).double()
    layer.load_state_dict(oracle.state_dict())
    return oracle, layer


def _layer_data(name: str) -> dict:
    e, _, kv_dim, nside_q, nside_k, *_ = LAYER_CASES[name]
    nq, nk = 12 * nside_q**2, 12 * nside_k**2
    g = torch.Generator().manual_seed(3 + list(LAYER_CASES).index(name))
    mask = torch.rand(2, nk, generator=g) > 0.3
    return {"x_q": torch.randn(2, nq, e, generator=g, dtype=torch.float64),
            "x_kv": torch.randn(2, nk, kv_dim, generator=g, dtype=torch.float64),
            "dout": torch.randn(2, nq, e, generator=g, dtype=torch.float64),
            "mask": mask, "bias": torch.randn(2, nk, generator=g, dtype=torch.float64)}


def _run_layer(rank: int, p: int, name: str) -> dict:
    _, layer = _layers(name)
    layer.train(LAYER_CASES[name][-1] > 0)
    data = _layer_data(name)
    q_sizes, k_sizes = _splits(name, p)
    qs, ks = _slices(q_sizes, rank), _slices(k_sizes, rank)
    x_q, x_kv = data["x_q"][:, qs].clone().requires_grad_(), data["x_kv"][:, ks].clone().requires_grad_()
    bias = data["bias"][:, ks].clone().requires_grad_()
    torch.manual_seed(TORCH_SEED)
    out = layer(x_q, x_kv, data["mask"][:, ks], bias)
    out.backward(data["dout"][:, qs])
    grads = {n: prm.grad.clone() for n, prm in layer.named_parameters()}
    if dist.is_initialized():
        for t in grads.values():
            dist.all_reduce(t)
    return {"out": out.detach(), "dx_q": x_q.grad, "dx_kv": x_kv.grad, "dbias": bias.grad, "params": grads}


def _attempt(fn) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the parent checks the type
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _fail_together(rank: int) -> dict:
    """Every bad window is refused on EVERY rank (even when only one rank is wrong)."""
    q = torch.randn(1, 2, 16, 4, dtype=torch.float64)  # 3 x 16 = 48 queries: nside 2
    k = torch.randn(1, 2, 64, 4, dtype=torch.float64)  # 3 x 64 = 192 keys: nside 4
    odd = rank == 1
    attempts = {
        "finer_than_pixel": lambda: ring_cross_attention(q, k, k, window_nside=4),  # nside_q = 2
        "not_power_of_two": lambda: ring_cross_attention(q, k, k, window_nside=3 if odd else 1),
        "bad_mode": lambda: ring_cross_attention(q, k, k, window_nside=1, mode="ring" if odd else "cell"),
        "keys_not_healpix": lambda: ring_cross_attention(q, k[:, :, :63] if odd else k, k[:, :, :63] if odd else k,
                                                         window_nside=1),
        "windows_differ": lambda: ring_cross_attention(q, k, k, window_nside=2 if odd else 1),
        "ulysses": lambda: sharded_attention("ulysses", q, k, k, cross=True, window_nside=1),
    }
    torch.manual_seed(3)
    layer = DistributedSpatialCrossAttention(8, 2, kv_dim=3, window_nside=1)
    attempts["layer_source_not_healpix"] = lambda: layer(torch.randn(1, 4, 8), torch.randn(1, 17 if odd else 16, 3))
    found = {n: _attempt(fn) for n, fn in attempts.items()}
    found["after"] = tuple(ring_cross_attention(q, k, k, window_nside=2).shape)
    return found


# --------------------------------------------------------------------------------------------
# Parent side


@functools.lru_cache(maxsize=None)
def _results(p: int) -> list[dict]:
    return run_ranks(_job, p, timeout=240.0)


def _assembled(p: int, name: str) -> dict:
    shards = [r[name] for r in _results(p)]
    full = {t: torch.cat([s[t] for s in shards], 2) for t in ("out", "dq", "dk", "dv")}
    full["dbias"] = None if shards[0]["dbias"] is None else torch.cat([s["dbias"] for s in shards], -1)
    return full


def _reference(name: str, dropout: bool = True) -> dict:
    nside_q, nside_k, w, mode, _, _, _, dropout_p = CASES[name]
    data = _data(name)
    q, k, v = (data[x].clone().requires_grad_() for x in ("q", "k", "v"))
    leaf = None if data["bias"] is None else data["bias"].clone().requires_grad_()
    bias = leaf
    if data["mask"] is not None:
        bias = torch.zeros(B, k.shape[2], dtype=torch.float64) if bias is None else bias
        bias = bias.masked_fill(~(data["mask"] if bias.dim() == 2 else data["mask"][:, None]), float("-inf"))
    spec = DropoutSpec(dropout_p, SEED) if dropout and dropout_p > 0 else None
    out = reference_local_attention(q, k, v, healpy_cross_window_mask(nside_q, nside_k, w, mode), bias, spec)
    out.backward(data["dout"])
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad,
            "dbias": None if leaf is None else leaf.grad}


def _rel_errors(got: dict, ref: dict) -> dict[str, float]:
    errs = {}
    for t, r in ref.items():
        if r is None or t == "params":
            continue
        assert got[t].shape == r.shape and torch.isfinite(got[t]).all(), t
        errs[t] = (got[t] - r).abs().max().item() / max(r.abs().max().item(), 1e-300)
    return errs


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_fp64_output_and_gradients_match_healpy_reference(world):
    for name in CASES:
        errs = _rel_errors(_assembled(world, name), _reference(name))
        assert max(errs.values()) <= TOL, (world, name, errs)
    if world >= 3:
        for name in CASES:
            q_sizes, k_sizes = _splits(name, world)
            assert 0 in q_sizes and 0 in k_sizes and q_sizes != k_sizes, (name, q_sizes, k_sizes)


def test_dropout_is_p_invariant():
    one, three = _assembled(1, "enc-dropout"), _assembled(3, "enc-dropout")
    for t in ("out", "dq", "dk", "dv", "dbias"):
        assert (one[t] - three[t]).abs().max().item() <= 1e-13, t
    assert (one["out"] - _reference("enc-dropout", dropout=False)["out"]).abs().max().item() > 1e-2


def _healpy_halo(name: str, q_sizes: list[int], k_sizes: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Rows each rank receives and sends, and its allowed (query, key) pairs, from healpy's sets."""
    nside_q, nside_k, w, mode = CASES[name][:4]
    c_q, c_k = (nside_q // w) ** 2, (nside_k // w) ** 2
    cells = healpy_window_cells(w, mode)
    qb = [(sum(q_sizes[:r]), sum(q_sizes[:r + 1])) for r in range(len(q_sizes))]
    kb = [(sum(k_sizes[:r]), sum(k_sizes[:r + 1])) for r in range(len(k_sizes))]
    need = []
    for a, b in qb:
        keys: set[int] = set()
        for u in {i // c_q for i in range(a, b)}:
            for cell in cells[u]:
                keys.update(range(cell * c_k, (cell + 1) * c_k))
        need.append(keys)
    allowed = healpy_cross_window_mask(nside_q, nside_k, w, mode)
    received = [len({j for j in need[r] if not kb[r][0] <= j < kb[r][1]}) for r in range(len(qb))]
    sent = [sum(len({j for j in need[o] if kb[r][0] <= j < kb[r][1]}) for o in range(len(qb)) if o != r)
            for r in range(len(qb))]
    pairs = [int(allowed[a:b].sum()) for a, b in qb]
    return received, sent, pairs


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_bytes_equal_window_traffic_and_healpy_halo_and_beat_the_ring(world):
    results = _results(world)
    for name, (_, _, w, mode, _, mask, bias, _) in CASES.items():
        q_sizes, k_sizes = _splits(name, world)
        traffic = window_traffic(q_sizes, k_sizes, w, mode, batch=B, heads=H, head_dim=D, itemsize=F64)
        received, sent, pairs = _healpy_halo(name, q_sizes, k_sizes)
        bias_heads = H if bias == "bhn" else 1
        extra_fwd = B * bias_heads * F64 if (mask or bias) else 0  # bias row packed beside K/V
        extra_bwd = B * bias_heads * F64 if bias else 0  # dbias only for a given key_bias
        any_halo = any(received)
        for r, res in enumerate(results):
            t = traffic.ranks[r]
            assert (t.rows_received, t.rows_sent, t.pairs) == (received[r], sent[r], pairs[r]), (name, r)
            fwd, bwd = res[name]["fwd"], res[name]["bwd"]
            assert fwd["bytes_sent"].get("cross.halo.forward", 0) == t.bytes_sent + t.rows_sent * extra_fwd, name
            assert bwd["bytes_sent"].get("cross.halo.backward", 0) == t.rows_received * (
                2 * B * H * D * F64 + extra_bwd), name
            assert fwd["calls"].get("cross.halo.forward", 0) == int(any_halo), name
            moved = {k for k in (*fwd["bytes_sent"], *bwd["bytes_sent"]) if k != "all_gather.meta"}
            assert moved <= {"cross.halo.forward", "cross.halo.backward"}, moved  # no ring, no gather
            assert t.ring_rows_received == (sum(k_sizes) - k_sizes[r] if world > 1 else 0)
        ring = sum(t.ring_bytes_sent for t in traffic.ranks)
        halo = sum(t.bytes_sent for t in traffic.ranks)
        assert ring == (world - 1) * sum(k_sizes) * 2 * B * H * D * F64
        assert halo < ring if world > 1 and w > 1 else halo <= ring, (name, halo, ring)
        assert 0.0 < traffic.pairs_skipped < 1.0 and 0.0 < traffic.blocks_skipped < 1.0, name


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_layer_matches_windowed_oracle(world):
    for name in LAYER_CASES:
        shards = [r["layer"][name] for r in _results(world)]
        got = {t: torch.cat([s[t] for s in shards], 1) for t in ("out", "dx_q", "dx_kv", "dbias")}
        oracle, _ = _layers(name)
        oracle.train(LAYER_CASES[name][-1] > 0)
        data = _layer_data(name)
        x_q, x_kv = data["x_q"].clone().requires_grad_(), data["x_kv"].clone().requires_grad_()
        bias = data["bias"].clone().requires_grad_()
        torch.manual_seed(TORCH_SEED)
        out = oracle(x_q, x_kv, data["mask"], bias)
        out.backward(data["dout"])
        ref = {"out": out.detach(), "dx_q": x_q.grad, "dx_kv": x_kv.grad, "dbias": bias.grad}
        errs = _rel_errors(got, ref)
        for n, prm in oracle.named_parameters():
            errs[n] = (shards[0]["params"][n] - prm.grad).abs().max().item() / prm.grad.abs().max().item()
        assert max(errs.values()) <= TOL, (world, name, errs)


def test_errors_are_raised_on_every_rank():
    results = _results(3)
    expect = {"finer_than_pixel": "cannot be finer than a pixel", "not_power_of_two": "power of two",
              "bad_mode": "mode must be one of", "keys_not_healpix": "key field",
              "windows_differ": "window_nside", "ulysses": "strategy must be 'ring' or 'auto'",
              "layer_source_not_healpix": "(keys and values)"}
    for name, word in expect.items():
        texts = {r["errors"][name] for r in results}
        assert len(texts) == 1, (name, texts)
        text = texts.pop()
        assert text.startswith("ValueError") and word in text, (name, text)
    assert all(r["errors"]["after"] == (1, 2, 16, 4) for r in results)


def test_oracle_window_equals_written_out_healpy_reference():
    """SpatialCrossAttention(window_nside) = projections around the healpy-masked dense softmax."""
    torch.manual_seed(0)
    layer = SpatialCrossAttention(8, 2, kv_dim=3, window_nside=2, mode="neighbourhood").double()
    x_q, x_kv = torch.randn(2, 192, 8, dtype=torch.float64), torch.randn(2, 48, 3, dtype=torch.float64)
    mask = torch.rand(2, 48) > 0.5
    w = {n: t for n, t in layer.state_dict().items()}
    q = (x_q @ w["q_proj.weight"].T + w["q_proj.bias"]).view(2, 192, 2, 4).transpose(1, 2)
    kv = (x_kv @ w["kv_proj.weight"].T + w["kv_proj.bias"]).view(2, 48, 2, 2, 4).permute(2, 0, 3, 1, 4)
    bias = torch.zeros(2, 48, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    att = reference_local_attention(q, kv[0], kv[1], healpy_cross_window_mask(4, 2, 2, "neighbourhood"), bias)
    ref = att.transpose(1, 2).reshape(2, 192, 8) @ w["out_proj.weight"].T + w["out_proj.bias"]
    assert (layer(x_q, x_kv, mask) - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()
    with pytest.raises(ValueError, match="strategy 'ring' or 'auto'"):
        DistributedSpatialCrossAttention(8, 2, window_nside=1, strategy="ulysses")
