"""Whole idx-flow models converted by convert_model, against the unconverted model (float64).

- an encoder-decoder: SpatialConv -> SpatialBatchNorm -> GELU -> SpatialPooling ->
  SpatialTransformerBlock -> SpatialUpsampling -> SpatialTransposeConv (RING tables from
  ``idx_flow.utils.compute_connection_indices``, nside 4 -> 2 -> 1 -> 2 -> 4);
- a SpatialViT with two transformer blocks.

On real gloo ranks (world 2, 3, 5: uneven shards) each rank also runs the unconverted model on the
full field. Compared at relative error 1e-10: output, input gradient, every parameter gradient
after ``sync_gradients``, the BatchNorm running statistics, and the parameters after one SGD step
(followed by a second forward). Needs the sharded reductions (``reductions.py``) and an attention
converter that recognises idx-flow's ``SpatialSelfAttention``; skipped with the reason otherwise.
"""

from __future__ import annotations

import copy
from functools import lru_cache

import idx_flow
import pytest
import torch
import torch.nn as nn
from idx_flow.utils import compute_connection_indices

from hpattn_dist.grad_sync import sync_gradients
from hpattn_dist.healpix import shard_bounds
from hpattn_dist.integrations.idx_flow import CONVERTERS
from tests.harness import run_ranks

RTOL = 1e-10
BATCH, C_IN = 2, 3


def _missing() -> str:
    if idx_flow.SpatialBatchNorm not in CONVERTERS:
        return "no converter for SpatialBatchNorm (hpattn_dist/integrations/idx_flow/reductions.py)"
    from hpattn_dist.modules import DistributedSpatialSelfAttention, convert_spatial_attention

    try:
        converted = convert_spatial_attention(idx_flow.SpatialSelfAttention(4, 2))
    except ValueError as err:
        return f"convert_spatial_attention does not convert idx-flow's attention: {err}"
    if not isinstance(converted, DistributedSpatialSelfAttention):
        return "convert_spatial_attention does not convert idx-flow's attention"
    return ""


pytestmark = pytest.mark.skipif(bool(_missing()), reason=_missing() or "-")


@lru_cache(maxsize=None)
def _table(nside_in: int, nside_out: int, k: int):
    return compute_connection_indices(nside_in, nside_out, k)


def _encoder_decoder() -> nn.Module:
    down, _ = _table(4, 2, 9)
    pool, _ = _table(2, 1, 4)
    up, up_dist = _table(1, 2, 4)
    up2, _ = _table(2, 4, 4)
    return nn.Sequential(
        idx_flow.SpatialConv(48, down, filters=8, bias=False),  # a bias before BN has ~0 grad
        idx_flow.SpatialBatchNorm(8),
        nn.GELU(),
        idx_flow.SpatialPooling(12, pool, pool_type="max"),
        idx_flow.SpatialTransformerBlock(8, 2, mlp_ratio=2.0, attn_backend="manual"),
        idx_flow.SpatialUpsampling(48, up, up_dist, interpolation="linear"),
        idx_flow.SpatialTransposeConv(192, up2, filters=2),
    )


def _vit() -> nn.Module:
    idx, _ = _table(4, 2, 4)
    return idx_flow.SpatialViT(48, idx, embed_dim=8, depth=2, num_heads=2, mlp_ratio=2.0,
                               output_dim=3, attn_backend="manual")


def _build(kind: str, seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = _encoder_decoder() if kind == "encoder_decoder" else _vit()
    with torch.no_grad():
        model.eval()(torch.zeros(1, 192, C_IN))  # idx-flow creates its lazy parameters here
    model = model.double().train()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(BATCH, 192, C_IN, generator=gen, dtype=torch.float64)
    n_out = 192 if kind == "encoder_decoder" else 48
    w = torch.randn(BATCH, n_out, 3, generator=gen, dtype=torch.float64)
    return model, x, w


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _step(model: nn.Module, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * w[..., : out.shape[-1]]).sum().backward()
    return out, x.grad


def _ranks_models(rank: int, world: int) -> dict:
    from hpattn_dist.integrations.idx_flow import convert_model

    results = {}
    for i, kind in enumerate(("encoder_decoder", "vit")):
        model, x, w = _build(kind, 100 + i)
        reference = copy.deepcopy(model)
        opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        convert_model(model)
        (a, b) = shard_bounds(192, world)[rank]
        n_out = w.shape[1]
        (c, d) = shard_bounds(n_out, world)[rank]

        out_ref, x_grad_ref = _step(reference, x, w)
        out, x_grad = _step(model, x[:, a:b], w[:, c:d])
        sync_gradients(model)
        grads = dict(model.named_parameters())
        errors = {
            "out": _rel(out, out_ref[:, c:d]),
            "x_grad": _rel(x_grad, x_grad_ref[:, a:b]),
            **{f"grad {n}": _rel(grads[n].grad, p.grad) for n, p in reference.named_parameters()},
            **{f"buffer {n}": _rel(buf.double(), ref.double())
               for (n, buf), (_, ref) in zip(model.named_buffers(), reference.named_buffers())
               if buf.is_floating_point()},
        }
        opt_ref.step()
        opt.step()
        errors.update({f"param {n}": _rel(grads[n], p) for n, p in reference.named_parameters()})
        with torch.no_grad():
            errors["out after step"] = _rel(model(x[:, a:b]), reference(x)[:, c:d])
        results[kind] = errors
        results[kind + " names kept"] = list(model.state_dict()) == list(reference.state_dict())
    return results


@pytest.mark.parametrize("world", [2, 3, 5])  # world 1 and 4: test_idx_flow_gather.py
def test_whole_models_match_idx_flow(world: int) -> None:
    results = run_ranks(_ranks_models, world, timeout=180.0)
    for rank, res in enumerate(results):
        for kind in ("encoder_decoder", "vit"):
            assert res[kind + " names kept"], (rank, kind)
            bad = {k: v for k, v in res[kind].items() if not v <= RTOL}
            assert not bad, (f"rank {rank}/{world} {kind}", bad)
            assert any(k.startswith("buffer") for k in res[kind]) == (kind == "encoder_decoder")
