"""``torch.compile(fullgraph=True)`` of a block (LayerNorm + the distributed layer + MLP) on gloo:
no graph break (``torch._dynamo.explain``), compiled forward and gradients equal to eager in float64,
and eager equal to the float64 single-device block (Note [compiling the attention] in
:mod:`hpattn_dist.strategies.ops`).

Legend: B batch, N global pixels, E embed dim, P = 2 ranks (uneven shards).
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.harness import run_ranks
from tests.training_model import bounds, field, make_block

N, WORLD = 11, 2
STRATEGIES = ("ring", "ulysses")


def _fwd_bwd(block, x, w):
    x = x.clone().requires_grad_()
    block.zero_grad()
    y = block(x)
    (w * y).sum().backward()
    return y.detach(), x.grad, {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in block.named_parameters()}


def _job(rank: int, world: int) -> dict:
    import torch._dynamo

    x, w = field(N)
    local = bounds(N, world, rank)
    x, w = x[:, local], w[:, local]
    res = {}
    for strategy in STRATEGIES:
        torch._dynamo.reset()
        # Ulysses' head-layout residuals have a size set by the peers' shards (a dynamic size).
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=strategy != "ring"):
            block = make_block(True, strategy=strategy)
            explained = torch._dynamo.explain(block)(x)
            eager = _fwd_bwd(block, x, w)
            compiled = _fwd_bwd(torch.compile(block, fullgraph=True), x, w)
        res[strategy] = {"breaks": explained.graph_break_count, "graphs": explained.graph_count,
                         "eager": eager, "compiled": compiled}
    return res


@functools.lru_cache(maxsize=None)
def _results() -> list:
    return run_ranks(_job, WORLD, timeout=300)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-12) -> bool:
    return bool((a - b).abs().max() <= tol * b.abs().max())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_compiled_block_has_no_graph_break_and_equals_eager(strategy):
    for rank, r in enumerate(_results()):
        r = r[strategy]
        assert r["breaks"] == 0 and r["graphs"] == 1, (rank, r["breaks"], r["graphs"])
        (ye, dxe, ge), (yc, dxc, gc) = r["eager"], r["compiled"]
        assert _close(yc, ye) and _close(dxc, dxe), rank
        for name in ge:
            assert _close(gc[name], ge[name]), (rank, name)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_compiled_block_equals_float64_single_device(strategy):
    x, w = field(N)
    y_ref, dx_ref, g_ref = _fwd_bwd(make_block(False), x, w)
    results = _results()
    y = torch.cat([r[strategy]["compiled"][0] for r in results], 1)
    dx = torch.cat([r[strategy]["compiled"][1] for r in results], 1)
    assert _close(y, y_ref) and _close(dx, dx_ref)
    for name, g in g_ref.items():
        assert _close(sum(r[strategy]["compiled"][2][name] for r in results), g, 1e-11), name
