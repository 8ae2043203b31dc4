"""``torch.compile`` of windowed attention (Note [windowed attention as one op] in
:mod:`hpattn_dist.local.ops`): a block of the local layer (cell and neighbourhood windows) and a
block of the windowed cross layer, on 2 gloo ranks (uneven shards) and in one process without
torch.distributed, compile with ``fullgraph=True`` and no graph break (``torch._dynamo.explain``);
the compiled forward and gradients equal eager and the float64 single-device block; the compiled
block sends the eager block's bytes. So does ``ring_cross_attention(..., window_nside=W)`` with a
differentiable key bias and dropout (a given seed). Also the op's fake outside dynamo.

Legend: B batch, N pixels of the field (nside 2, or nside 4 for the cross blocks' source grid),
E embed dim, P = 2 ranks.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn

from hpattn_dist import (DistributedLocalSpatialSelfAttention, DistributedSpatialCrossAttention,
                         LocalSpatialSelfAttention, SpatialCrossAttention, ring_cross_attention)
from tests.distributed.test_compile import _check_eager_equals_compiled, _close, _fwd_bwd
from tests.harness import run_ranks
from tests.local_reference import healpy_cross_window_mask, reference_local_attention
from tests.training_model import Block, CrossBlock, E, H, bounds, field

N, NK, E_KV, WORLD = 48, 192, 8, 2
# name: layer kwargs (a "cross" name: the windowed cross layer, source grid of NK pixels)
RUNS = {
    "local cell": {"window_nside": 1, "mode": "cell", "attn_backend": "manual"},
    "local neighbourhood, auto kernel": {"window_nside": 1, "mode": "neighbourhood", "attn_backend": "auto"},
    "cross neighbourhood": {"window_nside": 1, "mode": "neighbourhood", "attn_backend": "manual"},
}


def _source() -> torch.Tensor:
    return torch.randn(2, NK, E_KV, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def make(name: str, distributed: bool, kv_rows: slice = slice(None)) -> nn.Module:
    """The float64 block of run ``name``, weights from seed 0 (equal for oracle and distributed)."""
    torch.manual_seed(0)
    kw = dict(RUNS[name])
    if name.startswith("cross"):
        cls = DistributedSpatialCrossAttention if distributed else SpatialCrossAttention
        if distributed:
            kw["strategy"] = "ring"
        block = CrossBlock(cls(E, H, kv_dim=E_KV, **kw), _source()[:, kv_rows])
    else:
        cls = DistributedLocalSpatialSelfAttention if distributed else LocalSpatialSelfAttention
        block = Block(cls(E, H, **kw))
    block = block.double()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return block


def _cross_fn_inputs(world: int, rank: int):
    """q on nside 2, k, v and a [B, H, Nk] key bias on nside 4 (this rank's rows), output weights."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, H, N, 4, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, H, NK, 4, generator=g, dtype=torch.float64) for _ in range(2))
    bias = torch.randn(2, H, NK, generator=g, dtype=torch.float64)
    w = torch.randn(2, H, N, 4, generator=g, dtype=torch.float64)
    qs, ks = bounds(N, world, rank), bounds(NK, world, rank)
    return q[:, :, qs], k[:, :, ks], v[:, :, ks], bias[:, :, ks], w[:, :, qs]


def _cross_fn(q, k, v, bias):
    return ring_cross_attention(q, k, v, window_nside=1, mode="neighbourhood", key_bias=bias, dropout_p=0.25,
                                dropout_seed=11)


def _cross_fn_run(fn, q, k, v, bias, w):
    q, k, v, bias = (t.clone().requires_grad_() for t in (q, k, v, bias))
    y = fn(q, k, v, bias)
    (w * y).sum().backward()
    return [y.detach(), q.grad, k.grad, v.grad, bias.grad]


def _job(rank: int, world: int, names: tuple = tuple(RUNS)) -> dict:
    import torch._dynamo

    x, w = field(N)
    local = bounds(N, world, rank)
    x, w = x[:, local], w[:, local]
    res = {}
    for name in names:
        torch._dynamo.reset()
        block = make(name, True, bounds(NK, world, rank))
        params = dict(block.named_parameters())
        explained = torch._dynamo.explain(block)(x)
        eager = _fwd_bwd(block, params, x, w)
        compiled = _fwd_bwd(torch.compile(block, fullgraph=True), params, x, w)
        res[name] = {"breaks": explained.graph_break_count, "graphs": explained.graph_count,
                     "eager": eager, "compiled": compiled}
    torch._dynamo.reset()
    inputs = _cross_fn_inputs(world, rank)
    explained = torch._dynamo.explain(_cross_fn)(*inputs[:4])
    res["cross function"] = {"breaks": explained.graph_break_count, "graphs": explained.graph_count,
                             "eager": _cross_fn_run(_cross_fn, *inputs),
                             "compiled": _cross_fn_run(torch.compile(_cross_fn, fullgraph=True), *inputs)}
    res["fake"] = _fakes()
    return res


def _fakes() -> dict:
    """Shapes (as text) or the exception name from ``window_attention_fwd`` under fake modes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from hpattn_dist.strategies.ops import group_name_of

    res = {}
    for env in ("none", "shape_env"):
        mode = FakeTensorMode(shape_env=ShapeEnv(allow_dynamic_output_shape_ops=False) if env == "shape_env" else None)
        try:
            with mode:
                q = torch.empty(2, 4, 5, 8, dtype=torch.float64)
                k = torch.empty(2, 4, 7, 8, dtype=torch.float64)
                outs = torch.ops.hpattn.window_attention_fwd(
                    q, k, k, None, None, group_name_of(None), 1, "neighbourhood", "manual", 0.0, 0.5, None, [], "",
                    True, None, False, False, True, "", "ring_cross_attention")
                res[env] = [str(tuple(t.shape)) for t in outs]
        except Exception as e:  # noqa: BLE001  (the test asserts which)
            res[env] = type(e).__name__
    return res


@functools.lru_cache(maxsize=None)
def _results() -> list:
    return run_ranks(_job, WORLD, timeout=600)


SINGLE = ("local neighbourhood, auto kernel",)


@functools.lru_cache(maxsize=None)
def _single_process() -> dict:
    """Runs in this process, without torch.distributed (group None): one local block and the cross
    function (compiling costs seconds each)."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    return _job(0, 1, SINGLE)


@pytest.mark.parametrize("name", RUNS)
def test_compiled_windowed_block_has_no_graph_break_and_equals_eager(name):
    for rank, r in enumerate(_results()):
        _check_eager_equals_compiled(r[name], ("P = 2", rank))
        assert r[name]["compiled"][3:] == r[name]["eager"][3:], rank  # the eager bytes
    if name in SINGLE:
        _check_eager_equals_compiled(_single_process()[name], "no process group")


@pytest.mark.parametrize("name", RUNS)
def test_compiled_windowed_block_equals_float64_single_device(name):
    x, w = field(N)
    ref = make(name, False)
    y_ref, dx_ref, g_ref, *_ = _fwd_bwd(ref, dict(ref.named_parameters()), x, w)
    results = _results()
    y = torch.cat([r[name]["compiled"][0] for r in results], 1)
    dx = torch.cat([r[name]["compiled"][1] for r in results], 1)
    assert _close(y, y_ref) and _close(dx, dx_ref)
    if name in SINGLE:
        assert _close(_single_process()[name]["compiled"][0], y_ref)
    for p, g in g_ref.items():
        assert _close(sum(r[name]["compiled"][2][p] for r in results), g, 1e-11), p


def test_compiled_windowed_cross_function_with_bias_and_dropout():
    """``ring_cross_attention(..., window_nside=1)`` with a differentiable ``[B, H, Nk]`` key bias and
    dropout (seed given): no graph break, compiled equals eager, both equal the healpy-built float64
    reference on the gathered shards (whose dropout mask is the reference's own definition)."""
    from hpattn_dist.kernels import DropoutSpec

    q, k, v, bias, w = _cross_fn_inputs(1, 0)
    q, k, v, bias = (t.clone().requires_grad_() for t in (q, k, v, bias))
    ref = reference_local_attention(q, k, v, healpy_cross_window_mask(2, 4, 1, "neighbourhood"), bias,
                                    DropoutSpec(0.25, 11))
    (w * ref).sum().backward()
    want = [ref.detach(), q.grad, k.grad, v.grad, bias.grad]
    for where, results in (("P = 2", _results()), ("no process group", [_single_process()])):
        parts = [r["cross function"] for r in results]
        for r in parts:
            assert r["breaks"] == 0 and r["graphs"] == 1, (where, r["breaks"])
            for a, b in zip(r["compiled"], r["eager"]):
                assert _close(a, b), where
        for i, dim in enumerate((2, 2, 2, 2, 2)):
            got = torch.cat([r["compiled"][i] for r in parts], dim)
            assert _close(got, want[i], 1e-10), (where, i)


def test_fake_needs_a_shape_environment_for_the_edge_cells():
    """The edge cells' count is set by the peers' shards: an unbacked size under a shape
    environment, torch's ``DynamicOutputShapeException`` without one; the other outputs are static:
    ``out [B, H, Nq_r, D]``, ``plan [2 + 2P]``, ``lse [B, H, Nq_r]``."""
    for r in [*_results(), _single_process()]:
        p = 1 if r is _single_process() else WORLD
        assert r["fake"]["none"] == "DynamicOutputShapeException"
        outs = r["fake"]["shape_env"]
        assert outs[:3] == ["(2, 4, 5, 8)", f"({2 + 2 * p},)", "(2, 4, 5)"], outs
        assert outs[3].startswith("(2, 8, u") and outs[4].startswith("(u"), outs
