"""Double backward (``create_graph=True``): exact second derivatives or a clear error, never silence.

Note [double backward] in :mod:`hpattn_dist.double_backward`. The attention Functions (ring,
Ulysses' local attention, so hybrid and auto too) must RAISE an error naming the entry point when a
gradient of a gradient reaches them; before the fix they returned wrong numbers (ring) or None
(Ulysses, whose head exchange backward was not recorded). The pure communication Functions
(all-to-all, head exchange, gather / reduce-scatter / scatter) must give EXACT second derivatives:
checked against float64 autograd on the full tensors, where each of them is a re-partition (or a
sum) of plain tensors.

Second-order quantity throughout: ``L = sum(w * y**3)`` of the output ``y`` (so the incoming
gradient depends on the input), ``g = dL/dx`` with ``create_graph=True``, ``S = sum(u * g**2)``,
and ``dS/dx`` (with ``allow_unused=True``, so that an unrecorded backward shows up as None instead
of an autograd error).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import pytest
import torch

from hpattn_dist import DistributedSpatialSelfAttention, SpatialSelfAttention, ring_attention
from hpattn_dist.comm.all_to_all import all_to_all
from hpattn_dist.comm.collectives import gather_along_dim, reduce_scatter_along_dim, scatter_along_dim
from hpattn_dist.comm.groups import resolve_group
from hpattn_dist.comm.head_exchange import heads_to_pixels, pixels_to_heads
from hpattn_dist.strategies import sharded_attention
from hpattn_dist.strategies import ulysses_attention
from tests.harness import run_ranks
from tests.reference import reference_attention

REFUSED = "does not support double backward"
B, H, D, E = 2, 4, 4, 16
SIZES = [3, 2]  # pixels per rank at world 2 (uneven on purpose)
STRATEGIES = ("ring", "ulysses", "hybrid", "auto")


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _second_order(fn: Callable, xs: list[torch.Tensor], w, u, wrt: int = 0) -> dict:
    """``dS/dxs[wrt]`` (see module doc) through ``fn``, or the error it raised.

    ``w``, ``u``: weights shaped like ``fn``'s output and like ``xs[0]``. Returns
    ``{"error": str}`` or ``{"grad": Tensor | None}``.
    """
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    try:
        y = fn(*leaves)
        g = torch.autograd.grad((w * y**3).sum(), leaves[0], create_graph=True)[0]
        h = torch.autograd.grad((u * g**2).sum(), leaves[wrt], allow_unused=True)[0]
    except RuntimeError as err:
        return {"error": str(err)}
    return {"grad": None if h is None else h.detach()}


def _verdict(res: dict, ref: Optional[torch.Tensor], name: str) -> str:
    """What happened, in words, for assertion messages."""
    if "error" in res:
        return f"raised: {res['error'][:200]}"
    if res["grad"] is None:
        return "returned None (second-order gradient silently missing)"
    err = (res["grad"] - ref).abs().max() / ref.abs().max()
    return f"returned a second derivative off by {100 * err.item():.1f} % (max-abs relative)"


def _assert_refused(res: dict, ref: Optional[torch.Tensor], name: str) -> None:
    assert "error" in res, f"{name}: {_verdict(res, ref, name)}"
    assert name in res["error"] and REFUSED in res["error"], res["error"]


def _assert_exact(res: dict, ref: torch.Tensor, what: str) -> None:
    assert "grad" in res and res["grad"] is not None, f"{what}: {_verdict(res, ref, what)}"
    err = ((res["grad"] - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-12, f"{what}: {_verdict(res, ref, what)}"


# --------------------------------------------------------------------------------------------
# World 1, in process


@pytest.mark.parametrize("backend", ["manual", "sdpa"])
@pytest.mark.parametrize("entry", ["ring_attention", "ulysses_attention"])
def test_attention_refuses_double_backward_at_world_1(entry, backend):
    """d/dk (and d/dq) of |dL/dq|^2: was 46-190 % off (ring) with no error; now raises."""
    fn = {"ring_attention": ring_attention, "ulysses_attention": ulysses_attention}[entry]
    q, k, v = (_randn(s, B, H, 6, D) for s in (1, 2, 3))
    w, u = _randn(4, B, H, 6, D), _randn(5, B, H, 6, D)
    for wrt in (0, 1):
        ref = _second_order(reference_attention, [q, k, v], w, u, wrt)["grad"]
        res = _second_order(lambda *a: fn(*a, backend=backend), [q, k, v], w, u, wrt)
        _assert_refused(res, ref, entry)


def test_first_order_with_create_graph_still_works():
    """create_graph=True alone (a first-order step recorded for later use) is not refused, and
    the first-order gradient it gives is exact."""
    q, k, v = (_randn(s, B, H, 6, D).requires_grad_() for s in (1, 2, 3))
    w = _randn(4, B, H, 6, D)
    got = torch.autograd.grad((w * ring_attention(q, k, v, backend="manual") ** 3).sum(), (q, k, v),
                              create_graph=True)
    ref = torch.autograd.grad((w * reference_attention(q, k, v) ** 3).sum(), (q, k, v))
    for a, b in zip(got, ref):
        assert (a.detach() - b).abs().max() <= 1e-12 * b.abs().max()
        assert a.requires_grad  # attached to the refusing node, not a silent constant


def test_linear_loss_is_refused_not_treated_as_constant():
    """A loss linear in the output (constant incoming gradient): dL/dq still depends on k
    through the saved inputs, so differentiating it again must raise, not return zero / None."""
    q, k, v = (_randn(s, B, H, 6, D).requires_grad_() for s in (1, 2, 3))
    c = _randn(4, B, H, 6, D)
    g = torch.autograd.grad((c * ring_attention(q, k, v, backend="manual")).sum(), q, create_graph=True)[0]
    with pytest.raises(RuntimeError, match=f"ring_attention {REFUSED}"):
        torch.autograd.grad((g**2).sum() + k.sum(), k)


# --------------------------------------------------------------------------------------------
# World 2 (and the same code at world 1 through the layer), real gloo ranks


def _layer(strategy: str) -> DistributedSpatialSelfAttention:
    torch.manual_seed(0)
    kw = {"ulysses_degree": 2} if strategy == "hybrid" else {}
    layer = DistributedSpatialSelfAttention(E, H, attn_backend="manual", strategy=strategy, healpix_field=False, **kw)
    return layer.double()


def _rows(rank: int, world: int) -> slice:
    sizes = SIZES if world == 2 else [sum(SIZES)]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _layer_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = sum(SIZES)
    return _randn(10, B, n, E), _randn(11, B, n, E), _randn(12, B, n, E)


def _comm_cases(rank: int, world: int) -> dict[str, dict]:
    """Second derivatives through every communication Function, on this rank's shard."""
    info = resolve_group(None)
    sizes = SIZES
    rows = _rows(rank, world)
    x = _randn(20, B, H, sum(sizes), D)  # the full tensor; rank r holds pixels `rows`
    h = H // world
    heads = slice(rank * h, (rank + 1) * h)
    out = {}
    # pixels -> heads (one tensor) and heads -> pixels
    out["pixels_to_heads"] = _second_order(
        lambda a: pixels_to_heads((a,), info, sizes, "t")[0], [x[:, :, rows]],
        _randn(21, B, H, sum(sizes), D)[:, heads], _randn(22, B, H, sum(sizes), D)[:, :, rows])
    out["heads_to_pixels"] = _second_order(
        lambda a: heads_to_pixels((a,), info, sizes, "t")[0], [x[:, heads]],
        _randn(23, B, H, sum(sizes), D)[:, :, rows], _randn(24, B, H, sum(sizes), D)[:, heads])
    # the generic all-to-all, heads -> pixels over dims 1 and 2
    out["all_to_all"] = _second_order(
        lambda a: all_to_all(a, info, scatter_dim=1, gather_dim=2, gather_sizes=sizes),
        [x[:, :, rows]], _randn(25, B, H, sum(sizes), D)[:, heads],
        _randn(26, B, H, sum(sizes), D)[:, :, rows])
    # all-gather along the pixel dim; its adjoint reduce-scatter; and scatter (a slice)
    out["gather_along_dim"] = _second_order(
        lambda a: gather_along_dim(a, None, dim=2, sizes=sizes), [x[:, :, rows]],
        _randn(27 + rank, B, H, sum(sizes), D), _randn(29, B, H, sum(sizes), D)[:, :, rows])
    out["reduce_scatter_along_dim"] = _second_order(
        lambda a: reduce_scatter_along_dim(a, None, dim=2, sizes=sizes), [_randn(30 + rank, B, H, sum(sizes), D)],
        _randn(32, B, H, sum(sizes), D)[:, :, rows], _randn(33 + rank, B, H, sum(sizes), D))
    out["scatter_along_dim"] = _second_order(
        lambda a: scatter_along_dim(a, None, dim=2, sizes=sizes), [x],
        _randn(35, B, H, sum(sizes), D)[:, :, rows], _randn(36 + rank, B, H, sum(sizes), D))
    return out


def _job(rank: int, world: int) -> dict:
    x, w, u = _layer_inputs()
    rows = _rows(rank, world)
    res = {}
    for strategy in STRATEGIES:
        layer = _layer(strategy)
        res[("layer", strategy)] = _second_order(layer, [x[:, rows]], w[:, rows], u[:, rows])
    if world == 2:
        res.update({("comm", name): r for name, r in _comm_cases(rank, world).items()})
    return res


@functools.lru_cache(maxsize=None)
def _results(world: int) -> list[dict]:
    return run_ranks(_job, world, timeout=120.0)


def _layer_reference() -> torch.Tensor:
    """dS/dx of the float64 single-device oracle with the same parameters, full field."""
    layer = _layer("ring")
    oracle = SpatialSelfAttention(E, H, attn_backend="manual").double()
    oracle.load_state_dict(layer.state_dict())
    x, w, u = _layer_inputs()
    return _second_order(oracle, [x], w, u)["grad"]


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_layer_second_order_input_gradient_is_refused(world, strategy):
    """Was: ring off by 100 % at world 2, Ulysses None. Now every rank raises, naming the
    strategy function the layer called."""
    ref = _layer_reference()
    name = {"ring": "ring_attention", "ulysses": "ulysses_attention", "hybrid": "",
            "auto": ""}[strategy]
    for rank, res in enumerate(_results(world)):
        r = res[("layer", strategy)]
        full_ref = ref[:, _rows(rank, world)]
        assert "error" in r, f"rank {rank}: {_verdict(r, full_ref, strategy)}"
        assert REFUSED in r["error"] and name in r["error"], r["error"]


def _comm_reference(name: str) -> list[torch.Tensor]:
    """Per rank, dS/d(shard) of the same quantity on full tensors in one process."""
    sizes, world, n = SIZES, 2, sum(SIZES)
    h = H // world
    rows = [_rows(r, world) for r in range(world)]
    heads = [slice(r * h, (r + 1) * h) for r in range(world)]
    x = _randn(20, B, H, n, D).requires_grad_()
    if name in ("pixels_to_heads", "all_to_all"):
        # y_r = x[:, heads r] (all pixels); L = sum_r w_r y_r^3; S = sum_r u_r g[:, :, rows r]^2
        w = _randn(21 if name == "pixels_to_heads" else 25, B, H, n, D)
        u = _randn(22 if name == "pixels_to_heads" else 26, B, H, n, D)
        g = torch.autograd.grad((w * x**3).sum(), x, create_graph=True)[0]
        hx = torch.autograd.grad((u * g**2).sum(), x)[0]
        return [hx[:, :, r] for r in rows]
    if name == "heads_to_pixels":
        w, u = _randn(23, B, H, n, D), _randn(24, B, H, n, D)
        g = torch.autograd.grad((w * x**3).sum(), x, create_graph=True)[0]
        hx = torch.autograd.grad((u * g**2).sum(), x)[0]
        return [hx[:, hd] for hd in heads]
    if name == "gather_along_dim":
        # every rank gets the whole x; L = sum_r w_r x^3
        w = _randn(27, B, H, n, D) + _randn(28, B, H, n, D)
        u = _randn(29, B, H, n, D)
        g = torch.autograd.grad((w * x**3).sum(), x, create_graph=True)[0]
        hx = torch.autograd.grad((u * g**2).sum(), x)[0]
        return [hx[:, :, r] for r in rows]
    if name == "reduce_scatter_along_dim":
        # inputs a_0, a_1; y = a_0 + a_1 (rank r keeps rows r); each rank's gradient is the
        # all-gathered dL/dy
        a = [_randn(30 + r, B, H, n, D).requires_grad_() for r in range(world)]
        w = _randn(32, B, H, n, D)
        g = torch.autograd.grad((w * (a[0] + a[1]) ** 3).sum(), a, create_graph=True)
        s = sum((_randn(33 + r, B, H, n, D) * g[r] ** 2).sum() for r in range(world))
        return [t for t in torch.autograd.grad(s, a)]
    if name == "scatter_along_dim":
        # replicated x, rank r keeps rows r; each rank's gradient is the all-gathered dL/dy
        # (Note in scatter_along_dim: equal gradients on every rank, not summed)
        xs = [_randn(20, B, H, n, D).requires_grad_() for _ in range(world)]
        w = _randn(35, B, H, n, D)
        y = torch.cat([xs[r][:, :, rows[r]] for r in range(world)], dim=2)
        loss = (w * y**3).sum()
        g = torch.autograd.grad(loss, xs, create_graph=True)
        g = [g[0] + g[1]] * world  # the all-gather: each rank sees the whole gradient
        s = sum((_randn(36 + r, B, H, n, D) * g[r] ** 2).sum() for r in range(world))
        hx = torch.autograd.grad(s, xs)
        return [hx[0] + hx[1]] * world
    raise KeyError(name)


@pytest.mark.parametrize("name", ["pixels_to_heads", "heads_to_pixels", "all_to_all",
                                  "gather_along_dim", "reduce_scatter_along_dim", "scatter_along_dim"])
def test_communication_second_derivatives_are_exact_at_world_2(name):
    refs = _comm_reference(name)
    for rank, res in enumerate(_results(2)):
        _assert_exact(res[("comm", name)], refs[rank], f"{name} rank {rank}")
