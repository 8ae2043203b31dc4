"""One rank wrong: every call raises the same error on EVERY rank within seconds, never a silent
wrong result and never a hang (issue 23; Note [one agreement per call] in
``hpattn_dist/strategies/plan.py``, Note [fail together] in ``hpattn_dist/comm/agreement.py``).

One spawned job (P = 2 gloo ranks, the exchange timeout at a few seconds so that a hang becomes an
``ExchangeError`` instead of stalling the suite) runs every case in turn; each case perturbs rank 1
only (a scale, a permuted weight, ...). A healthy call after all of them checks that no case left
the group out of step.

Legend: B batch, H heads, N global pixels (12: the nside-1 field), D head dim, E embed dim, P = 2.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import pytest
import torch

from hpattn_dist import DistributedSpatialSelfAttention, healpix_local_attention, ring_cross_attention
from hpattn_dist.comm import ExchangeError, set_exchange_timeout
from hpattn_dist.strategies import sharded_attention
from tests.harness import run_ranks
from tests.reference import reference_attention

B, H, N, D, E = 2, 2, 12, 4, 8
WORLD = 2
BUDGET_S = 5.0  # an error must reach every rank within this (the exchange timeout is 3 s)


def _full(seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(3))


def _shard(t: torch.Tensor, rank: int, dim: int = 2) -> torch.Tensor:
    half = t.shape[dim] // 2
    return t.narrow(dim, 0, half) if rank == 0 else t.narrow(dim, half, t.shape[dim] - half)


def _outcome(fn: Callable[[], Any]) -> dict:
    start = time.monotonic()
    try:
        out = fn()
    except Exception as err:  # noqa: BLE001 - the error is the result
        return {"error": type(err).__name__, "message": str(err), "s": time.monotonic() - start,
                "hang": isinstance(err, ExchangeError)}
    return {"error": None, "s": time.monotonic() - start, "hang": False,
            "out": out.detach() if isinstance(out, torch.Tensor) else None}


def _layer(rank: int) -> DistributedSpatialSelfAttention:
    torch.manual_seed(0)
    return DistributedSpatialSelfAttention(E, H, attn_backend="manual", healpix_field=True,
                                           name="attn").double()


# --------------------------------------------------------------------------------------------
# The cases: name -> (the call on this rank, the error fragment every rank must raise)


def _scale_cases(rank: int) -> dict:
    """Issue 23 item 3: a score scale that differs on one rank."""
    q, k, v = (_shard(t, rank) for t in _full(0))
    scale = 0.3 if rank == 1 else None
    cases = {
        f"scale, {s}": (functools.partial(sharded_attention, s, q, k, v, scale=scale), "disagree on scale")
        for s in ("ring", "ulysses", "auto")
    }
    cases["scale, hybrid"] = (functools.partial(sharded_attention, "hybrid", q, k, v, scale=scale,
                                                ulysses_degree=2), "disagree on scale")
    cases["scale, ring_cross_attention"] = (functools.partial(ring_cross_attention, q, k, v, scale=scale),
                                            "disagree on scale")
    cases["scale, key_bias (autograd path)"] = (functools.partial(
        sharded_attention, "ulysses", q, k, v, scale=scale, key_bias=torch.zeros(B, q.shape[2])),
        "disagree on scale")
    cases["scale, local"] = (functools.partial(healpix_local_attention, q, k, v, window_nside=1, scale=scale),
                             "disagree on scale")
    layer = _layer(rank)
    if rank == 1:
        layer.scale = 0.1
    x = _shard(torch.randn(B, N, E, generator=torch.Generator().manual_seed(3), dtype=torch.float64), rank, 1)
    cases["scale, layer"] = (functools.partial(layer, x), "disagree on scale")
    return cases


def _permuted_weight_cases(rank: int) -> dict:
    """Issue 23 item 4: weights permuted on one rank pass no fingerprint (sum, sum|p|, sum p^2
    cannot see them)."""
    from hpattn_dist import DistributedSpatialCrossAttention

    x = _shard(torch.randn(B, N, E, generator=torch.Generator().manual_seed(3), dtype=torch.float64), rank, 1)
    cases = {}
    for name, permute in (
        ("transposed out_proj.weight", lambda m: m.out_proj.weight.copy_(m.out_proj.weight.T.clone())),
        ("q and k blocks of qkv_proj swapped",
         lambda m: m.qkv_proj.weight.copy_(m.qkv_proj.weight[torch.cat([torch.arange(E, 2 * E),
                                                                        torch.arange(E),
                                                                        torch.arange(2 * E, 3 * E)])])),
    ):
        layer = _layer(rank)
        if rank == 1:
            with torch.no_grad():
                permute(layer)
        cases[f"permuted, {name}"] = (functools.partial(layer, x), "hold different parameters")
    torch.manual_seed(0)
    cross = DistributedSpatialCrossAttention(E, H, attn_backend="manual", healpix_field=False).double()
    if rank == 1:  # two parameters of one shape exchanged
        with torch.no_grad():
            q_w = cross.q_proj.weight.clone()
            cross.q_proj.weight.copy_(cross.out_proj.weight)
            cross.out_proj.weight.copy_(q_w)
    cases["permuted, cross q_proj and out_proj exchanged"] = (functools.partial(cross, x, x),
                                                              "hold different parameters")
    return cases


def _hang_cases(rank: int) -> dict:
    """Issue 23 item 6: what made the peer block until the exchange timeout."""
    import idx_flow

    from hpattn_dist import DistributedSpatialCrossAttention, ring_attention
    from hpattn_dist.integrations.idx_flow import convert_model
    from hpattn_dist.local import DistributedLocalSpatialSelfAttention

    x = _shard(torch.randn(B, N, E, generator=torch.Generator().manual_seed(3), dtype=torch.float64), rank, 1)
    x_in = x.float() if rank == 1 else x
    cases = {}
    # The input's dtype is not the weights' on one rank: the projection raised there alone.
    cases["hang, layer input dtype"] = (functools.partial(_layer(rank), x_in), "the layer's weights are")
    torch.manual_seed(0)
    cross = DistributedSpatialCrossAttention(E, H, attn_backend="manual", healpix_field=False).double()
    cases["hang, cross layer input dtype"] = (functools.partial(cross, x_in, x), "the layer's weights are")
    torch.manual_seed(0)
    local = DistributedLocalSpatialSelfAttention(E, H, attn_backend="manual", window_nside=1).double()
    cases["hang, local layer input dtype"] = (functools.partial(local, x_in), "the layer's weights are")
    # Meta tensors on one rank: refused at the door, where every rank hears of it.
    q, k, v = (_shard(t, rank) for t in _full(0))
    qm, km, vm = (t.to("meta") if rank == 1 else t for t in (q, k, v))
    cases["hang, meta q/k/v"] = (functools.partial(ring_attention, qm, km, vm), "meta tensors")
    cases["hang, meta q/k/v, key_bias"] = (functools.partial(
        sharded_attention, "ulysses", qm, km, vm, key_bias=torch.zeros(B, q.shape[2], device=qm.device)),
        "meta tensors")
    meta_layer = _layer(rank).to("meta") if rank == 1 else _layer(rank)
    cases["hang, meta layer"] = (functools.partial(meta_layer, x.to("meta") if rank == 1 else x), "meta tensors")
    # A converted SpatialBatchNorm in training on one rank and in eval on the other.
    bn = convert_model(idx_flow.SpatialBatchNorm(E).double())
    bn.train(rank == 0)
    cases["hang, SpatialBatchNorm train on one rank, eval on the other"] = (
        functools.partial(bn, x), "disagree on batch_stats")
    # Two converted layers, rank 1 skipping the first: their agreements are told apart.
    two = convert_model(torch.nn.Sequential(idx_flow.SpatialBatchNorm(E), idx_flow.SpatialBatchNorm(E)).double())
    cases["hang, one rank skips a layer"] = (
        functools.partial(two if rank == 0 else two[1], x), "called with different signatures")
    drop = convert_model(torch.nn.Sequential(torch.nn.Dropout(0.5)))
    drop.train(rank == 0)
    cases["hang, dropout train on one rank, eval on the other"] = (functools.partial(drop, x), "disagree on drops")
    # A head dim of 0 on one rank: its default scale D ** -0.5 raised ZeroDivisionError there alone,
    # before the agreement its peer waited in.
    q0, k0, v0 = (t[..., :0] if rank == 1 else t for t in (q, k, v))
    cases["hang, D = 0 on one rank"] = (functools.partial(ring_attention, q0, k0, v0), "D >= 1")
    cases["hang, D = 0 on one rank, local"] = (functools.partial(healpix_local_attention, q0, k0, v0, window_nside=1),
                                               "D >= 1")
    # No head dim, or no head, on every rank: refused by the door (the CPU flash kernel killed the
    # process with SIGFPE on H = 0; local attention failed inside its executor).
    qd, kd, vd = (t[..., :0] for t in (q, k, v))
    cases["hang, D = 0"] = (functools.partial(ring_attention, qd, kd, vd), "D >= 1")
    cases["hang, D = 0, local"] = (functools.partial(healpix_local_attention, qd, kd, vd, window_nside=1), "D >= 1")
    qh, kh, vh = (t[:, :0] for t in (q, k, v))
    cases["hang, H = 0"] = (functools.partial(ring_attention, qh, kh, vh), "H >= 1")
    cases["hang, H = 0, local"] = (functools.partial(healpix_local_attention, qh, kh, vh, window_nside=1), "H >= 1")
    return cases


def _sync_gradients_cases(rank: int) -> dict:
    """Issue 23 item 7: sync_gradients over parameters whose buffers differ between ranks aborted
    the process inside gloo (a size mismatch)."""
    from hpattn_dist.grad_sync import sync_gradients

    def params(frozen: bool = False, dtype: torch.dtype = torch.float64, sparse: bool = False) -> list:
        ps = [torch.nn.Parameter(torch.ones(3, dtype=torch.float64)), torch.nn.Parameter(torch.ones(2, dtype=dtype))]
        ps[1].requires_grad_(not frozen)
        for p in ps:
            p.grad = torch.ones_like(p).to_sparse() if sparse and p is ps[1] else torch.ones_like(p)
        return ps

    one = rank == 1
    return {
        "sync_gradients, requires_grad": (functools.partial(sync_gradients, params(frozen=one)),
                                          "differ at parameter 1"),
        "sync_gradients, dtype": (functools.partial(sync_gradients, params(dtype=torch.float32 if one else
                                                                           torch.float64)), "differ at parameter 1"),
        "sync_gradients, sparse": (functools.partial(sync_gradients, params(sparse=one)), "is sparse"),
    }


def _layout_cases(rank: int) -> dict:
    """Issue 23 item 1 at P = 2: rank 1 passes q, k, v as views of a [B, H, D, N_r] buffer (a
    non-unit last stride), with the default kernel; no error, the reference's gradients."""
    from hpattn_dist import ring_attention

    def call(fn):
        q, k, v = (_shard(t, rank) for t in _full(0))
        if rank == 1:
            q, k, v = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v))
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out = fn(q, k, v)
        w = _shard(torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64), rank)
        return torch.stack([out, *torch.autograd.grad((w * out).sum(), (q, k, v))])

    return {f"layout, {fn.__name__}": (functools.partial(call, fn), None)
            for fn in (ring_attention, ring_cross_attention)}


CASES: tuple[Callable[[int], dict], ...] = (_scale_cases, _permuted_weight_cases, _hang_cases, _sync_gradients_cases,
                                            _layout_cases)


def _job(rank: int, world: int) -> dict:
    set_exchange_timeout(3.0)
    res: dict[str, Any] = {}
    for make in CASES:
        for name, (call, fragment) in make(rank).items():
            res[name] = dict(_outcome(call), fragment=fragment)
    q, k, v = (_shard(t, rank) for t in _full(0))
    res["healthy"] = _outcome(lambda: sharded_attention("ulysses", q, k, v))
    return res


@functools.lru_cache(maxsize=None)
def _results() -> list:
    return run_ranks(_job, WORLD, timeout=120)


def _names(prefix: str) -> list[str]:
    return sorted(n for n in _results()[0] if n.startswith(prefix))


def _assert_raised_everywhere(name: str) -> None:
    got = [r[name] for r in _results()]
    fragment = got[0]["fragment"]
    for rank, res in enumerate(got):
        assert not res["hang"], (name, rank, res["message"])
        assert res["error"] == "ValueError" and fragment in res["message"], (name, rank, res)
        assert res["s"] < BUDGET_S, (name, rank, res["s"])
    assert len({res["message"] for res in got}) == 1, (name, got)


@pytest.mark.parametrize("name", [n for n in ("ring", "ulysses", "auto", "hybrid", "ring_cross_attention",
                                              "key_bias (autograd path)", "local", "layer")])
def test_a_scale_on_one_rank_raises_on_every_rank(name):
    _assert_raised_everywhere(f"scale, {name}")


@pytest.mark.parametrize("name", ["transposed out_proj.weight", "q and k blocks of qkv_proj swapped",
                                  "cross q_proj and out_proj exchanged"])
def test_weights_permuted_on_one_rank_raise_on_every_rank(name):
    _assert_raised_everywhere(f"permuted, {name}")


HANGS = ("layer input dtype", "cross layer input dtype", "local layer input dtype", "meta q/k/v",
         "meta q/k/v, key_bias", "meta layer", "SpatialBatchNorm train on one rank, eval on the other",
         "one rank skips a layer", "dropout train on one rank, eval on the other", "D = 0 on one rank",
         "D = 0 on one rank, local", "D = 0", "D = 0, local", "H = 0", "H = 0, local")


@pytest.mark.parametrize("name", HANGS)
def test_what_hung_raises_on_every_rank(name):
    _assert_raised_everywhere(f"hang, {name}")


@pytest.mark.parametrize("name", ["requires_grad", "dtype", "sparse"])
def test_sync_gradients_over_different_parameters_raises_on_every_rank(name):
    _assert_raised_everywhere(f"sync_gradients, {name}")


@pytest.mark.parametrize("name", ["ring_attention", "ring_cross_attention"])
def test_strided_views_on_one_rank_give_the_reference_gradients(name):
    got = torch.cat([r[f"layout, {name}"]["out"] for r in _results()], dim=3)  # [4, B, H, N, D]
    q, k, v = (t.requires_grad_() for t in _full(0))
    out = reference_attention(q, k, v)
    w = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    want = torch.stack([out.detach(), *torch.autograd.grad((w * out).sum(), (q, k, v))])
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()


def test_the_group_is_healthy_after_every_case():
    got = torch.cat([r["healthy"]["out"] for r in _results()], dim=2)
    torch.testing.assert_close(got, reference_attention(*_full(0)), rtol=0, atol=1e-12)
