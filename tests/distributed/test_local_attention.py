"""Sharded HEALPix local attention on real gloo ranks, against the healpy-built float64 reference.

One job per world size (1..5); each runs every case on its shard (uneven splits, shards smaller
than a window cell, cells straddling shard boundaries, an empty shard) and returns its errors and
the bytes it sent, which the parent compares with the halo computed from healpy's neighbour sets.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from hpattn_dist import (
    DistributedLocalSpatialSelfAttention, LocalSpatialSelfAttention, count_communication,
    healpix_local_attention,
)
from hpattn_dist.kernels import DropoutSpec
from tests.harness import run_ranks
from tests.local_reference import halo_pixels, healpy_window_mask, reference_local_attention

B, H, D = 2, 2, 4
F64 = 8  # bytes per float64

# Splits of N = 192 (nside 4) and N = 768 (nside 8) per world size: uneven, smaller than a cell
# of 16 or 64 pixels, straddling cells, one empty shard at P = 5.
SPLITS = {
    192: {1: [192], 2: [90, 102], 3: [5, 180, 7], 4: [48, 49, 47, 48], 5: [3, 100, 10, 0, 79]},
    768: {1: [768], 2: [300, 468], 3: [256, 257, 255], 4: [1, 383, 100, 284], 5: [154, 154, 153, 153, 154]},
}

# (nside, window_nside, mode, backend, mask, bias heads (0 none, 1, H), dropout_p)
CASES = [
    (4, 1, "neighbourhood", "auto", False, 0, 0.0),
    (4, 2, "cell", "manual", False, 0, 0.0),
    (8, 2, "neighbourhood", "sdpa", False, 0, 0.0),
    (8, 8, "cell", "auto", False, 0, 0.0),
    (4, 2, "neighbourhood", "manual", True, H, 0.0),
    (4, 1, "cell", "auto", True, 1, 0.25),
    # window_nside 4: squares of padded faces, with the zero blocks where three faces meet
    (8, 4, "neighbourhood", "auto", False, 0, 0.0),
    (8, 4, "neighbourhood", "manual", False, 0, 0.2),
    (8, 4, "neighbourhood", "manual", True, 1, 0.0),
    # window_nside 8: faces of 8 x 8 cells, cut into squares of 4 x 4 where a rank holds fewer
    # than four faces' worth (P = 4, 5: Note [local attention plan])
    (8, 8, "neighbourhood", "auto", False, 0, 0.0),
    (8, 8, "neighbourhood", "manual", True, H, 0.2),
]


def _full_inputs(i: int, n: int):
    gen = torch.Generator().manual_seed(100 + i)
    q, k, v, g = (torch.randn(B, H, n, D, generator=gen, dtype=torch.float64) for _ in range(4))
    mask = torch.rand(B, n, generator=gen) > 0.5
    mask[1, : n // 12] = False  # a whole base face masked in one batch element
    bias = torch.randn(B, H, n, generator=gen, dtype=torch.float64)
    return q, k, v, g, mask, bias


def _cases(rank: int, world_size: int, only: tuple[int, ...] = ()) -> list[dict]:
    results = []
    for i, (nside, window_nside, mode, backend, with_mask, bias_heads, dropout_p) in enumerate(CASES):
        if only and i not in only:
            continue
        n = 12 * nside**2
        sizes = SPLITS[n][world_size]
        start = sum(sizes[:rank])
        sl = slice(start, start + sizes[rank])
        q, k, v, g, mask, bias = _full_inputs(i, n)
        if bias_heads == 1:
            bias = bias[:, 0]
        q_l, k_l, v_l = (t[:, :, sl].clone().requires_grad_() for t in (q, k, v))
        bias_l = bias[..., sl].clone().requires_grad_() if bias_heads else None
        mask_l = mask[:, sl].contiguous() if with_mask else None
        with count_communication() as stats:
            out = healpix_local_attention(q_l, k_l, v_l, window_nside=window_nside, mode=mode,
                                          backend=backend, dropout_p=dropout_p, dropout_seed=7 + rank,
                                          key_mask=mask_l, key_bias=bias_l)
            out.backward(g[:, :, sl])

        q_r, k_r, v_r = (t.clone().requires_grad_() for t in (q, k, v))
        bias_r = bias.clone().requires_grad_()
        full_bias = bias_r if bias_heads else torch.zeros(B, n, dtype=torch.float64)
        if with_mask:
            full_bias = full_bias.masked_fill(~(mask[:, None] if full_bias.dim() == 3 else mask), float("-inf"))
        spec = DropoutSpec(dropout_p, 7) if dropout_p else None  # rank 0's seed
        ref = reference_local_attention(q_r, k_r, v_r, healpy_window_mask(nside, window_nside, mode),
                                        key_bias=full_bias if (with_mask or bias_heads) else None,
                                        dropout=spec)
        ref.backward(g)
        pairs = [(out, ref[:, :, sl]), (q_l.grad, q_r.grad[:, :, sl]), (k_l.grad, k_r.grad[:, :, sl]),
                 (v_l.grad, v_r.grad[:, :, sl])]
        if bias_heads:
            pairs.append((bias_l.grad, bias_r.grad[..., sl]))
        rel = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item() if a.numel() else 0.0
                  for a, b in pairs)
        results.append({
            "rel": rel, "finite": all(bool(torch.isfinite(a).all()) for a, _ in pairs),
            "fwd_bytes": stats.bytes_sent["local.halo.forward"], "fwd_calls": stats.calls["local.halo.forward"],
            "bwd_bytes": stats.bytes_sent["local.halo.backward"], "bwd_calls": stats.calls["local.halo.backward"],
            "other": {k: v for k, v in stats.bytes_sent.items() if not k.startswith(("local.halo", "all_gather.meta"))},
        })
    return results


def _rows_sent(nside: int, window_nside: int, mode: str, sizes: list[int], rank: int) -> int:
    """Rows rank ``rank`` must send: its pixels in other ranks' halos (healpy sets)."""
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    mine = set(range(starts[rank], starts[rank] + sizes[rank]))
    return sum(len(halo_pixels(nside, window_nside, mode, starts[r], starts[r] + sizes[r]) & mine)
               for r in range(len(sizes)) if r != rank)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_local_attention_and_layer_match_float64_references(world_size: int) -> None:
    per_rank = run_ranks(_job, world_size, timeout=120)
    for rank, (results, layer, low, one_row) in enumerate(per_rank):
        assert layer["keys"] and layer["rel"] <= 1e-10, (rank, layer)
        for i, res in zip(ONE_ROW_CASES, one_row):
            assert res["finite"] and res["rel"] <= 1e-10, (rank, CASES[i], "one row per call", res)
        for kept_dtype, violation, finite in low.values():  # error / allowed error
            assert kept_dtype and finite and violation <= 1.0, low
        for case, res in zip(CASES, results):
            nside, window_nside, mode, _, with_mask, bias_heads, _ = case
            assert res["finite"] and res["rel"] <= 1e-10, (rank, case, res)
            rows = _rows_sent(nside, window_nside, mode, SPLITS[12 * nside**2][world_size], rank)
            row_bytes = 2 * B * H * D * F64 + (B * max(bias_heads, 1) * F64 if (with_mask or bias_heads) else 0)
            grad_row_bytes = 2 * B * H * D * F64 + (B * bias_heads * F64 if bias_heads else 0)
            assert res["fwd_bytes"] == rows * row_bytes, (rank, case, res, rows)
            starts = [0, *torch.tensor(SPLITS[12 * nside**2][world_size]).cumsum(0).tolist()]
            received = len(halo_pixels(nside, window_nside, mode, starts[rank], starts[rank + 1]))
            # backward: the gradients of the rows this rank received go home
            assert res["bwd_bytes"] == received * grad_row_bytes, (rank, case, res, received)
            any_halo = any(halo_pixels(nside, window_nside, mode, a, b) for a, b in zip(starts, starts[1:]))
            assert res["fwd_calls"] == res["bwd_calls"] == int(any_halo), (rank, case, res)
            assert not res["other"], res  # no ring, no all-gather of K/V


def _rel(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor) -> float:
    return float((got - want).abs().max() / scale.abs().max()) if got.numel() else 0.0


def _layer(rank: int, world_size: int, sizes: list[int], dropout: float) -> dict:
    torch.manual_seed(0)
    oracle = LocalSpatialSelfAttention(8, 2, dropout=dropout, window_nside=2, mode="neighbourhood").double()
    layer = DistributedLocalSpatialSelfAttention(8, 2, dropout=dropout, window_nside=2,
                                                 mode="neighbourhood").double()
    layer.load_state_dict(oracle.state_dict())
    n = sum(sizes)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(B, n, 8, generator=gen, dtype=torch.float64)
    g = torch.randn(B, n, 8, generator=gen, dtype=torch.float64)
    mask = torch.rand(B, n, generator=gen) > 0.3
    start = sum(sizes[:rank])
    sl = slice(start, start + sizes[rank])
    x_l = x[:, sl].clone().requires_grad_()
    torch.manual_seed(9)
    y_l = layer(x_l, key_mask=mask[:, sl].contiguous())
    y_l.backward(g[:, sl])
    x_r = x.clone().requires_grad_()
    torch.manual_seed(9)
    y = oracle(x_r, key_mask=mask)
    y.backward(g)
    errs = [_rel(y_l, y[:, sl], y), _rel(x_l.grad, x_r.grad[:, sl], x_r.grad)]
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    if dist.is_initialized():
        for t in grads.values():
            dist.all_reduce(t)
    for name, p in oracle.named_parameters():
        errs.append(_rel(grads[name], p.grad, p.grad))
    return {"rel": max(errs), "keys": list(layer.state_dict()) == list(oracle.state_dict())}


def _low_precision(rank: int, world_size: int) -> dict:
    """fp32 and bf16 with a mask and a per-head bias (fp32 bias rows packed beside bf16 K/V)."""
    nside, window_nside, mode = 4, 1, "neighbourhood"
    sizes = SPLITS[192][world_size]
    start = sum(sizes[:rank])
    sl = slice(start, start + sizes[rank])
    q, k, v, g, mask, bias = _full_inputs(50, 192)
    full_bias = bias.masked_fill(~mask[:, None], float("-inf"))
    ref = reference_local_attention(q, k, v, healpy_window_mask(nside, window_nside, mode), key_bias=full_bias)
    errs = {}
    for dtype in (torch.float32, torch.bfloat16):
        q_l, k_l, v_l = (t[:, :, sl].to(dtype).requires_grad_() for t in (q, k, v))
        out = healpix_local_attention(q_l, k_l, v_l, window_nside=window_nside, mode=mode,
                                      key_mask=mask[:, sl].contiguous(), key_bias=bias[..., sl].to(dtype))
        out.backward(g[:, :, sl].to(dtype))
        want = ref[:, :, sl]
        allowed = 1e-5 if dtype == torch.float32 else 2.5e-2 * (1 + want.abs())  # atol = rtol for bf16
        ratio = float(((out.double() - want).abs() / allowed).max()) if out.numel() else 0.0
        errs[str(dtype)] = (out.dtype == dtype, ratio, bool(torch.isfinite(k_l.grad).all()))
    return errs


# The fused-kernel square groups (window_nside 4 and 8 at nside 8) once more with every backward
# kernel call cut to one row of a group's windows (Note [cache-sized calls] in
# hpattn_dist/local/execute.py): the test sizes fit one call otherwise.
ONE_ROW_CASES = (6, 9)


def _one_row_calls(rank: int, world_size: int) -> list[dict]:
    from hpattn_dist.local import execute

    budget = execute.CPU_CALL_BYTES
    execute.CPU_CALL_BYTES = 0
    try:
        return _cases(rank, world_size, ONE_ROW_CASES)
    finally:
        execute.CPU_CALL_BYTES = budget


def _job(rank: int, world_size: int) -> tuple[list[dict], dict, dict, list[dict]]:
    """The functional cases, the layer (dropout at odd world sizes) on the N = 768 split, the
    low-precision check and the square groups' backward in calls of one row."""
    return (_cases(rank, world_size), _layer(rank, world_size, SPLITS[768][world_size], 0.2 * (world_size % 2)),
            _low_precision(rank, world_size), _one_row_calls(rank, world_size))


def _bad_calls(rank: int, world_size: int) -> list:
    q, k, v = (torch.randn(1, 2, 64, 4, dtype=torch.float64) for _ in range(3))  # 3 x 64 = 192
    calls = [
        dict(window_nside=4 if rank == 1 else 2, mode="cell"),  # ranks disagree on the window
        dict(window_nside=8, mode="cell"),  # does not divide nside 4
        dict(window_nside=2, mode="ring" if rank == 2 else "cell"),  # bad mode on one rank
        dict(window_nside=2, mode="cell", key_mask=torch.ones(1, 65 if rank == 0 else 64, dtype=torch.bool)),
        # dropout rates that differ below a part per million: each rank would drop with its own p
        dict(window_nside=2, mode="cell", dropout_p=0.1 + 2e-7 if rank == 1 else 0.1, dropout_seed=5),
    ]
    messages = []
    for kwargs in calls:
        try:
            healpix_local_attention(q, k, v, **kwargs)
            messages.append(None)
        except ValueError as err:
            messages.append(str(err))
    # a short shard: N = 190 is not a HEALPix grid
    try:
        healpix_local_attention(q[:, :, :62], k[:, :, :62], v[:, :, :62], window_nside=1, mode="cell") \
            if rank == 0 else healpix_local_attention(q, k, v, window_nside=1, mode="cell")
        messages.append(None)
    except ValueError as err:
        messages.append(str(err))
    layer = DistributedLocalSpatialSelfAttention(8, 2, window_nside=2).double()
    try:  # one rank's input has the wrong embedding dim: the layer fails on every rank
        layer(torch.randn(1, 64, 7 if rank == 2 else 8, dtype=torch.float64))
        messages.append(None)
    except ValueError as err:
        messages.append(str(err))
    # a numpy integer window on one rank: the op takes it there too (before: that rank's door
    # alone, its peers in the op's exchanges, a hang)
    out = healpix_local_attention(q, k, v, window_nside=np.int64(2) if rank == 1 else 2, mode="cell")
    messages.append(bool(torch.isfinite(out).all()))
    out = healpix_local_attention(q, k, v, window_nside=2, mode="neighbourhood")  # still usable
    messages.append(bool(torch.isfinite(out).all()))
    return messages


def test_bad_input_and_disagreement_fail_together() -> None:
    per_rank = run_ranks(_bad_calls, 3, timeout=90)
    expected = ["window_nside", "must divide", "mode must be one of", "key_mask", "disagree on dropout_p (", "12 * nside**2",
                "embed_dim=8"]
    for i, word in enumerate(expected):
        texts = {res[i] for res in per_rank}
        assert len(texts) == 1 and None not in texts, (i, texts)
        assert word in texts.pop(), (i, per_rank[0][i])
    assert all(res[-2] is True and res[-1] is True for res in per_rank)
