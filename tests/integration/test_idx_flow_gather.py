"""idx-flow index-gather layers and SpatialViT run sharded by convert_model, against idx-flow itself.

Each case builds an idx-flow model (tables from ``idx_flow.utils.compute_connection_indices``, in
RING order as idx-flow builds them, or renumbered to NESTED), creates its lazy parameters with one
float32 forward, and switches it to float64. On every rank of a real gloo group (world 1..5, uneven
shards) a copy of the UNCONVERTED model runs on the full field: the reference. The converted model
runs on the rank's shard; its output, its input gradient and every parameter gradient after
``sync_gradients`` must match the reference to a relative error of 1e-10, and the halo bytes it
sends must equal the rows that the table makes it send (counted here with sets, not with the
planner).
"""

from __future__ import annotations

import copy
from functools import lru_cache

import healpy as hp
import idx_flow
import numpy as np
import pytest
import torch
import torch.nn as nn
from idx_flow.utils import compute_connection_indices

from hpattn_dist.comm.counters import count_communication
from hpattn_dist.grad_sync import sync_gradients
from hpattn_dist.healpix import shard_bounds
from tests.harness import run_ranks

RTOL = 1e-10
BATCH, C_IN = 2, 3


@lru_cache(maxsize=None)
def _table(nside_in: int, nside_out: int, k: int, nest: bool) -> tuple[np.ndarray, np.ndarray]:
    """idx-flow's table and distances; with ``nest``, both grids renumbered to NESTED order."""
    idx, dist = compute_connection_indices(nside_in, nside_out, k)
    if not nest:
        return idx, dist
    ring_of_nest_out = hp.nest2ring(nside_out, np.arange(12 * nside_out**2))
    idx_nest = hp.ring2nest(nside_in, idx[ring_of_nest_out])
    return idx_nest.astype(np.int64), dist[ring_of_nest_out]


def _layer(kind: str, nest: bool) -> tuple[nn.Module, int]:
    """A gather layer (parameters not created yet) and its input pixel count."""
    if kind == "conv":  # downsampling nside 4 -> 2, k = 9, with distance weights
        idx, d = _table(4, 2, 9, nest)
        w = 1.0 / (d + 1.0)
        return idx_flow.SpatialConv(48, idx, kernel_weights=w / w.sum(1, keepdims=True), filters=4), 192
    if kind == "conv_same":  # same grid nside 2, k = 7
        idx, _ = _table(2, 2, 7, nest)
        return idx_flow.SpatialConv(48, idx, filters=2, bias=False), 48
    if kind == "transpose":  # upsampling nside 2 -> 4
        idx, d = _table(2, 4, 4, nest)
        return idx_flow.SpatialTransposeConv(192, idx, kernel_weights=np.exp(-d / 500.0), filters=2), 48
    if kind == "upsampling":
        idx, d = _table(2, 4, 4, nest)
        return idx_flow.SpatialUpsampling(192, idx, d, interpolation="idw"), 48
    if kind == "patch":
        idx, _ = _table(4, 2, 4, nest)
        return idx_flow.SpatialPatchEmbedding(48, idx, embed_dim=5), 192
    if kind == "mlp":
        idx, _ = _table(4, 2, 4, nest)
        return idx_flow.SpatialMLP(48, idx, hidden_units=(6, 4), activations=("gelu", "linear"),
                                   residual=True), 192
    if kind in ("pool_mean", "pool_max"):
        idx, _ = _table(4, 2, 4, nest)
        return idx_flow.SpatialPooling(48, idx, pool_type=kind[5:]), 192
    if kind == "vit":  # patch embedding + pos_embed + final norm + output projection
        idx, _ = _table(4, 2, 4, nest)
        return idx_flow.SpatialViT(48, idx, embed_dim=8, depth=0, num_heads=2, output_dim=3), 192
    raise AssertionError(kind)


def _model(kind: str, nest: bool, seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Model in float64 with its parameters created, input ``[B, N_in, C_IN]``, output weights."""
    torch.manual_seed(seed)
    model, n_in = _layer(kind, nest)
    with torch.no_grad():
        n_out = model(torch.zeros(1, n_in, C_IN)).shape[1]  # idx-flow creates parameters here
    model = model.double()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(BATCH, n_in, C_IN, generator=gen, dtype=torch.float64)
    weights = torch.randn(BATCH, n_out, 8, generator=gen, dtype=torch.float64)
    return model, x, weights


def _loss(out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A per-pixel weighted sum: summed over ranks' shards it is the full field's value."""
    return (out * weights[..., : out.shape[-1]]).sum()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _expected_rows(table: np.ndarray, n_in: int, world: int, rank: int) -> tuple[int, int]:
    """Rows ``rank`` sends and receives for ``table``, counted with sets."""
    in_b, out_b = shard_bounds(n_in, world), shard_bounds(table.shape[0], world)
    mine = set(range(*in_b[rank]))
    needs = [set(table[a:b].ravel().tolist()) for a, b in out_b]
    received = len(needs[rank] - mine)
    sent = sum(len(need & mine) for q, need in enumerate(needs) if q != rank)
    return sent, received


def _run_case(rank: int, world: int, kind: str, nest: bool, seed: int) -> dict:
    from hpattn_dist.integrations.idx_flow import convert_model

    model, x, weights = _model(kind, nest, seed)
    reference = copy.deepcopy(model)
    x_ref = x.clone().requires_grad_(True)
    out_ref = reference(x_ref)
    _loss(out_ref, weights).backward()

    convert_model(model)
    n_in, n_out = x.shape[1], out_ref.shape[1]
    (a, b), (c, d) = shard_bounds(n_in, world)[rank], shard_bounds(n_out, world)[rank]
    x_local = x[:, a:b].clone().requires_grad_(True)
    with count_communication() as stats:
        out = model(x_local)
        _loss(out, weights[:, c:d]).backward()
    sync_gradients(model)

    table = model.patch_embed.connection_indices if kind == "vit" else model.connection_indices
    sent, received = _expected_rows(table.numpy(), n_in, world, rank)
    row_bytes = BATCH * C_IN * 8
    grads = {n: p.grad for n, p in model.named_parameters()}
    return {
        "kind": kind, "nest": nest,
        "out": _rel(out, out_ref[:, c:d]) if d > c else 0.0,
        "x_grad": _rel(x_local.grad, x_ref.grad[:, a:b]) if b > a else 0.0,
        "params": {n: _rel(grads[n], p.grad) for n, p in reference.named_parameters()},
        "names_kept": list(model.state_dict()) == list(reference.state_dict()),
        "bytes": (stats.bytes_sent["halo.forward"], stats.bytes_sent["halo.backward"]),
        "bytes_expected": (sent * row_bytes, received * row_bytes),
    }


CASES = [
    ("conv", False), ("conv", True), ("conv_same", True), ("transpose", False),
    ("upsampling", True), ("patch", False), ("mlp", True), ("pool_mean", False),
    ("pool_max", True), ("vit", False), ("vit", True),
]


def _ranks_layers(rank: int, world: int) -> list:
    return [_run_case(rank, world, kind, nest, 10 * i + world) for i, (kind, nest) in enumerate(CASES)]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_gather_layers_match_idx_flow(world: int) -> None:
    results = run_ranks(_ranks_layers, world, timeout=120.0)
    for rank, per_rank in enumerate(results):
        for res in per_rank:
            where = f"rank {rank}/{world} {res['kind']} {'NESTED' if res['nest'] else 'RING'}"
            assert res["out"] <= RTOL, (where, res["out"])
            assert res["x_grad"] <= RTOL, (where, res["x_grad"])
            assert bool(res["params"]) != res["kind"].startswith(("pool", "upsampling")), where
            assert max(res["params"].values(), default=0.0) <= RTOL, (where, res["params"])
            assert res["names_kept"], where
            assert res["bytes"] == res["bytes_expected"], (where, res["bytes"], res["bytes_expected"])
    if world > 1:  # the exchange did run (a k = 9 convolution reads across every shard edge)
        for case in (0, 1):
            assert all(per_rank[case]["bytes"][0] > 0 for per_rank in results)


def _ranks_extras(rank: int, world: int) -> dict:
    """World 3: a skewed input split, a table reloaded in place, pixels along dim 2, a rank
    with another table."""
    from hpattn_dist.comm.groups import resolve_group
    from hpattn_dist.comm.halo import HaloExchanger
    from hpattn_dist.integrations.idx_flow import convert_model

    res: dict = {}
    # 1. Input split [100, 0, 92] (not shard_bounds): refused on every rank with the same error, at
    #    the model's call and by the layer itself (called on its own, outside the model's call).
    model, x, weights = _model("conv", False, 7)
    reference = copy.deepcopy(model)
    model = convert_model(nn.Sequential(model))
    sizes = [100, 0, 92]
    a = sum(sizes[:rank])
    c, d = shard_bounds(48, world)[rank]
    x_local = x[:, a:a + sizes[rank]]
    for key, call in (("split_model", model), ("split_layer", model[0])):
        try:
            call(x_local)
            res[key] = None
        except ValueError as err:
            res[key] = str(err)
    model = model[0]

    # 2. load_state_dict puts a NESTED table into the converted layer: it is replanned.
    nested = _model("conv", True, 7)[0]
    state = {k: v for k, v in nested.state_dict().items() if k in ("connection_indices", "kernel_weights")}
    model.load_state_dict(state, strict=False)
    reference.load_state_dict(state, strict=False)
    (a, b) = shard_bounds(192, world)[rank]
    with torch.no_grad():
        res["reloaded_out"] = _rel(model(x[:, a:b]), reference(x)[:, c:d])

    # 3. Pixels along dim 2 ([B, H, N, D], as local attention will use it), forward and adjoint.
    info = resolve_group(None)
    table = torch.from_numpy(_table(4, 2, 9, True)[0])
    gen = torch.Generator().manual_seed(3)
    full = torch.randn(2, 2, 192, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 48, 9, 3, generator=gen, dtype=torch.float64)
    x_local = full.detach()[:, :, a:b].clone().requires_grad_(True)
    x_ext, plan = HaloExchanger(info, "dim-2 test")(x_local, table, dim=2)
    gathered = x_ext[:, :, plan.local_table]  # [B, H, O_r, K, D]
    expected = full[:, :, table[c:d]]
    res["dim2_out"] = _rel(gathered, expected.detach())
    (gathered * w[:, :, c:d]).sum().backward()
    (full[:, :, table] * w).sum().backward()
    res["dim2_grad"] = _rel(x_local.grad, full.grad[:, :, a:b])

    # 4. Rank 1's table differs: every rank raises the same ValueError.
    model2, x2, _ = _model("pool_mean", False, 5)
    convert_model(model2)
    if rank == 1:
        model2.connection_indices[0, 0] = 1
    try:
        model2(x2[:, a:b])
        res["mismatch"] = None
    except ValueError as err:
        res["mismatch"] = str(err)
    return res


def test_split_reload_dim2_and_mismatch() -> None:
    results = run_ranks(_ranks_extras, 3, timeout=120.0)
    for rank, res in enumerate(results):
        for key in ("reloaded_out", "dim2_out", "dim2_grad"):
            assert res[key] <= RTOL, (rank, key, res[key])
        for key in ("split_model", "split_layer"):
            assert res[key] is not None and "shard_bounds(192, 3) = [64, 64, 64]" in res[key], (rank, key)
        # Caught by the model's one agreement per call, which compares every gather layer's table.
        assert res["mismatch"] is not None and "tables_crc32" in res["mismatch"], (rank, res["mismatch"])
    for key in ("mismatch", "split_model", "split_layer"):
        assert len({res[key] for res in results}) == 1, key
