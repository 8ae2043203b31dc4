"""``torch.compile`` of a block (LayerNorm + the distributed layer + MLP) on gloo, with no user
configuration: no graph break (``torch._dynamo.explain``) for every strategy (and for a block of
:class:`~hpattn_dist.cross.DistributedSpatialCrossAttention`, queries and keys on two grids of
different sizes sharded independently), compiled forward and
gradients equal to eager in float64 and to the float64 single-device block, and the compiled
block sends exactly the eager block's bytes (Note [compiling the attention] in
:mod:`hpattn_dist.strategies.ops`). Also the fake of ``hpattn::attention_fwd`` outside dynamo.

Legend: B batch, N global pixels (NK those of the cross blocks' source grid), E embed dim, P = 2
ranks (uneven shards).
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from hpattn_dist import (DistributedSpatialCrossAttention, SpatialCrossAttention, checkpoint_context_fn,
                         count_communication)
from tests.harness import run_ranks
from tests.training_model import CrossBlock, E, H, bounds, field, make_block

N, NK, E_KV, WORLD = 11, 7, 8, 2
# name: (layer kwargs, how the block is compiled). Ulysses and hybrid (and auto, which picks a
# Ulysses layout here) have head-layout residuals sized by the peers' shards.
RUNS = {
    "ring": ({"strategy": "ring"}, "fullgraph"),
    "ulysses": ({"strategy": "ulysses"}, "fullgraph"),
    "hybrid": ({"strategy": "hybrid", "ulysses_degree": 2}, "fullgraph"),
    "auto": ({"strategy": "auto"}, "fullgraph"),
    "ulysses, fullgraph=False": ({"strategy": "ulysses"}, "graphs"),
    "hybrid, checkpoint_context_fn": ({"strategy": "hybrid", "ulysses_degree": 2}, "policy"),
    # The default kernel (SDPA here) and a plain sum loss, whose broadcast dout gives
    # non-contiguous block gradients: the op's outputs must have the strides its fake promises.
    "ring, auto kernel, sum loss": ({"strategy": "ring", "attn_backend": "auto"}, "fullgraph"),
    "ulysses, auto kernel, sum loss": ({"strategy": "ulysses", "attn_backend": "auto"}, "fullgraph"),
    # Cross-grid blocks (make_cross_block): Nq != Nk, and for Ulysses two residual lengths.
    "cross ring": ({"strategy": "ring"}, "fullgraph"),
    "cross ulysses": ({"strategy": "ulysses"}, "fullgraph"),
}


def make_cross_block(distributed: bool, x_kv: torch.Tensor, **kw) -> CrossBlock:
    """float64, weights from seed 0 (identical for the oracle and the distributed layer)."""
    torch.manual_seed(0)
    cls = DistributedSpatialCrossAttention if distributed else SpatialCrossAttention
    if distributed:
        kw["healpix_field"] = False  # point sets of any size
    block = CrossBlock(cls(E, H, kv_dim=E_KV, attn_backend="manual", **kw), x_kv).double()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return block


def _source() -> torch.Tensor:
    """The cross blocks' source field ``[B, NK, E_KV]`` (float64)."""
    return torch.randn(2, NK, E_KV, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def _fwd_bwd(fn, params, x, w):
    """``(y, dx, grads, bytes sent forward, bytes sent backward)``; ``w`` None: loss ``y.sum()``."""
    x = x.clone().requires_grad_()
    for p in params.values():
        p.grad = None
    with count_communication() as fwd:
        y = fn(x)
    with count_communication() as bwd:
        (y if w is None else w * y).sum().backward()
    grads = {n: p.grad.clone() for n, p in params.items()}
    return y.detach(), x.grad, grads, fwd.total_bytes, bwd.total_bytes


def _loss_weights(name: str, w):
    return None if name.endswith("sum loss") else w


def _job(rank: int, world: int) -> dict:
    import torch._dynamo

    x, w = field(N)
    local = bounds(N, world, rank)
    x, w = x[:, local], w[:, local]
    res = {}
    for name, (kw, how) in RUNS.items():
        torch._dynamo.reset()
        if name.startswith("cross"):
            block = make_cross_block(True, _source()[:, bounds(NK, world, rank)], **kw)
        else:
            block = make_block(True, **kw)
        params = dict(block.named_parameters())
        fn = block
        if how == "policy":
            def fn(x, block=block):
                return checkpoint(block, x, use_reentrant=False, context_fn=checkpoint_context_fn)
        explained = torch._dynamo.explain(fn)(x)
        wt = _loss_weights(name, w)
        eager = _fwd_bwd(fn, params, x, wt)
        compiled = _fwd_bwd(torch.compile(fn, fullgraph=how != "graphs"), params, x, wt)
        plain = _fwd_bwd(block, params, x, wt)  # un-checkpointed eager: the bytes to match
        res[name] = {"breaks": explained.graph_break_count, "graphs": explained.graph_count,
                     "eager": eager, "compiled": compiled, "plain_bytes": plain[3:]}
    res["fake"] = _fakes(rank)
    res["empty shard"] = _empty_shard(rank, world)
    res["functional"] = _functional(rank, world)
    return res


# The functional API with a differentiable key bias, and a hybrid over explicit groups: one op
# family, so fullgraph with no break (they took the autograd executors, which dynamo traced into).
FUNCTIONAL = ("ring, key bias", "ulysses, key bias per head", "hybrid groups, key bias and mask",
              "hybrid groups, key bias per head", "hybrid groups, frozen key bias")


def _functional(rank: int, world: int) -> dict:
    import torch._dynamo

    from hpattn_dist import build_hybrid_groups, hybrid_attention, ring_attention, ulysses_attention

    groups = build_hybrid_groups(None, world)  # U = 2: the bias travels to heads
    g = torch.Generator().manual_seed(5 + rank)
    n = 3 + 2 * rank
    q, k, v, dout = (torch.randn(2, 4, n, 8, generator=g, dtype=torch.float64) for _ in range(4))
    mask = torch.rand(2, n, generator=g) > 0.3
    res = {}
    for name in FUNCTIONAL:
        bias = torch.randn((2, 4, n) if "per head" in name else (2, n), generator=g, dtype=torch.float64)
        key_mask = mask if "mask" in name else None

        def fn(q, k, v, bias, name=name, key_mask=key_mask):
            if name.startswith("ring"):
                return ring_attention(q, k, v, key_bias=bias, key_mask=key_mask)
            if name.startswith("ulysses"):
                return ulysses_attention(q, k, v, key_bias=bias, key_mask=key_mask)
            return hybrid_attention(q, k, v, ulysses_group=groups.ulysses_group, ring_group=groups.ring_group,
                                    key_bias=bias, key_mask=key_mask)

        torch._dynamo.reset()
        frozen = "frozen" in name  # no gradient for the bias: the ops' outputs keep their fake shapes

        def leaves():
            return [t.clone().requires_grad_(not (frozen and i == 3)) for i, t in enumerate((q, k, v, bias))]

        explained = torch._dynamo.explain(fn)(*leaves())
        runs = {}
        for how, f in (("eager", fn), ("compiled", torch.compile(fn, fullgraph=True))):
            inputs = leaves()
            out = f(*inputs)
            out.backward(dout)
            runs[how] = [out.detach()] + [t.grad for t in inputs]
        res[name] = {"breaks": explained.graph_break_count, **runs}
    return res


def _empty_shard(rank: int, world: int) -> dict:
    """Inductor on a field of ONE pixel: rank 1's shard is empty, so every gradient its
    ``attention_bwd`` returns has no element; a pure op was dead code there and its peer blocked
    in the ring (Note [ops that communicate are never dead code]). Caches off: a graph cached by
    an older registration would hide the regression."""
    import torch._dynamo
    import torch._inductor.config

    x, w = field(1)
    local = bounds(1, world, rank)
    torch._dynamo.reset()
    res = {}
    with torch._inductor.config.patch(force_disable_caches=True):
        for strategy in ("ring", "ulysses"):
            block = make_block(True, strategy=strategy)
            compiled = torch.compile(block, backend="inductor", fullgraph=True)
            res[strategy] = _fwd_bwd(compiled, dict(block.named_parameters()), x[:, local], w[:, local])
    return res


def _fakes(rank: int) -> dict:
    """Shapes (as text) or the exception name from ``attention_fwd`` under fake modes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from hpattn_dist.strategies.ops import group_name_of

    res = {}
    for strategy in ("ring", "ulysses"):
        for env in ("none", "shape_env"):
            mode = FakeTensorMode(shape_env=ShapeEnv(allow_dynamic_output_shape_ops=False)
                                  if env == "shape_env" else None)
            try:
                with mode:
                    q = torch.empty(2, 4, 5 + rank, 8, dtype=torch.float64)
                    k = torch.empty(2, 4, 3 - rank, 8, dtype=torch.float64)
                    for cross in (False, True):
                        outs = torch.ops.hpattn.attention_fwd(q, k if cross else q, k if cross else q, None,
                                                              None, group_name_of(None), strategy, 0, "manual",
                                                              0.0, 0.5, None, [], "", True, None, False, False,
                                                              False, cross)
                        res[strategy, env, cross] = [str(tuple(t.shape)) for t in outs]
            except Exception as e:  # noqa: BLE001  (the test asserts which)
                res[strategy, env, False] = res[strategy, env, True] = type(e).__name__
    return res


@functools.lru_cache(maxsize=None)
def _results() -> list:
    return run_ranks(_job, WORLD, timeout=400)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-12) -> bool:
    return bool((a - b).abs().max() <= tol * b.abs().max())


def _check_eager_equals_compiled(r: dict, where) -> None:
    assert r["breaks"] == 0 and r["graphs"] == 1, (where, r["breaks"], r["graphs"])
    (ye, dxe, ge, *_), (yc, dxc, gc, *_) = r["eager"], r["compiled"]
    assert _close(yc, ye) and _close(dxc, dxe), where
    for p in ge:
        assert _close(gc[p], ge[p]), (where, p)


@pytest.mark.parametrize("name", RUNS)
def test_compiled_block_has_no_graph_break_and_equals_eager(name):
    for rank, r in enumerate(_results()):
        _check_eager_equals_compiled(r[name], rank)


@pytest.mark.parametrize("name", RUNS)
def test_compiled_block_sends_the_eager_bytes(name):
    """The compiled forward communicates once, and its backward (checkpointed with the policy or
    not) sends what the un-checkpointed eager backward sends: nothing recomputes the attention."""
    for rank, r in enumerate(_results()):
        r = r[name]
        sent = r["compiled"][3:]
        assert sent == r["eager"][3:] == r["plain_bytes"], (rank, sent, r["plain_bytes"])
        assert min(r["plain_bytes"]) > 0, rank


@pytest.mark.parametrize("name", RUNS)
def test_compiled_block_equals_float64_single_device(name):
    x, w = field(N)
    ref = make_cross_block(False, _source()) if name.startswith("cross") else make_block(False)
    y_ref, dx_ref, g_ref, *_ = _fwd_bwd(ref, dict(ref.named_parameters()), x, _loss_weights(name, w))
    results = _results()
    y = torch.cat([r[name]["compiled"][0] for r in results], 1)
    dx = torch.cat([r[name]["compiled"][1] for r in results], 1)
    assert _close(y, y_ref) and _close(dx, dx_ref)
    for p, g in g_ref.items():
        assert _close(sum(r[name]["compiled"][2][p] for r in results), g, 1e-11), p


@pytest.mark.parametrize("name", FUNCTIONAL)
def test_functional_key_bias_and_explicit_groups_compile_without_a_break(name):
    """fullgraph=True, no graph break, and compiled out, dq, dk, dv and the key bias's gradient
    equal to eager in float64."""
    for rank, r in enumerate(_results()):
        r = r["functional"][name]
        assert r["breaks"] == 0, (rank, r["breaks"])
        for i, (c, e) in enumerate(zip(r["compiled"], r["eager"])):
            if "frozen" in name and i == 4:  # the bias's gradient
                assert c is None and e is None, rank
                continue
            assert e is not None and _close(c, e), (rank, i)


@pytest.mark.parametrize("strategy", ["ring", "ulysses"])
def test_inductor_with_an_empty_shard_equals_float64_single_device(strategy):
    x, w = field(1)
    ref = make_block(False)
    y_ref, dx_ref, g_ref, *_ = _fwd_bwd(ref, dict(ref.named_parameters()), x, w)
    results = [r["empty shard"][strategy] for r in _results()]
    assert results[1][0].shape[1] == 0  # rank 1 holds no pixel
    assert _close(torch.cat([r[0] for r in results], 1), y_ref)
    assert _close(torch.cat([r[1] for r in results], 1), dx_ref)
    for p, g in g_ref.items():
        assert _close(sum(r[2][p] for r in results), g, 1e-11), p


def test_fake_without_symbolic_shapes():
    """``attention_fwd``'s fake: the ring's shapes are static, so any fake mode gives them; a
    Ulysses layout's length M is set by the peers, so it needs a shape environment (an unbacked
    size, whatever ``allow_dynamic_output_shape_ops`` says) and a plain ``FakeTensorMode`` gets
    torch's ``DynamicOutputShapeException``. For U > 1 the op is the door and the head exchange
    (Note [ulysses op memory]): q, k, v in head layout (a cross call, keys of their own length,
    has a second unbacked size for k, v). The plan: 7 values, the query and key Ulysses sizes (U
    each), R kv sizes."""
    for rank, r in enumerate(_results()):
        n = 5 + rank
        for cross in (False, True):
            ring = [f"(2, 4, {n}, 8)", f"({7 + 2 * 1 + WORLD},)", f"(2, 4, {n})"] + ["(0,)"] * 4
            assert r["fake"]["ring", "none", cross] == r["fake"]["ring", "shape_env", cross] == ring, rank
            assert r["fake"]["ulysses", "none", cross] == "DynamicOutputShapeException", rank
            outs = r["fake"]["ulysses", "shape_env", cross]
            assert outs[1:3] == [f"({7 + 2 * WORLD + 1},)", "(0,)"] and outs[5] == "(0,)", (rank, outs)
            m = outs[0].removeprefix("(2, 2, ").removesuffix(", 8)")
            assert m.startswith("u"), (rank, outs)  # an unbacked size
            mk = outs[3].removeprefix("(2, 2, ").removesuffix(", 8)")
            assert mk.startswith("u") and (mk != m) == cross, (rank, outs)
            assert outs[4] == outs[3], (rank, outs)
