"""Every global and cross-grid call through the registered ops, exact against float64 (issue 28).

One spawned group per world size (1..4) runs every case: strategy (ring, Ulysses, hybrid by
degree, hybrid over explicit groups, auto) x key bias (``[B, N_r]`` or ``[B, H, N_r]``, requiring
grad) x key mask x dropout x cross-grid, on uneven shards; forward, dq, dk, dv and the key bias's
gradient against the float64 single-device reference (:func:`tests.reference.reference_attention`).
Also: the bias's gradient needed on one rank only, a layer's :class:`LayerFacts`, and that the
autograd route is gone (no ``hpattn::`` op missing from a call's graph: the call's output is the
output of an op, Note [attention as one op]). Arguments the op cannot take are refused on every
rank (Note [what the attention op cannot take]).

Legend: B batch, H heads, D head dim, N global pixels (NK the key grid's for cross calls).
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

from hpattn_dist.kernels import DropoutSpec
from tests.harness import RankFailure, run_ranks
from tests.reference import reference_attention

B, H, D = 2, 12, 4
Q_SIZES = (3, 5, 0, 6)  # pixels per rank (rank 2's shard is empty)
K_SIZES = (4, 2, 5, 3)  # the key grid's, for cross calls
P_DROP, SEED = 0.3, 1234


def _sizes(world: int, cross: bool, keys: bool) -> list[int]:
    return list((K_SIZES if keys and cross else Q_SIZES)[:world]) if world > 1 else [5 if not keys or not cross else 7]


def _full(world: int, cross: bool, bias_dim: int) -> dict:
    """The global inputs (float64), from one seed: q, k, v, dout, the bias and the mask."""
    g = torch.Generator().manual_seed(11 + bias_dim + 2 * cross + 5 * world)
    n, nk = sum(_sizes(world, cross, False)), sum(_sizes(world, cross, True))
    t = {name: torch.randn(B, H, m, D, generator=g, dtype=torch.float64)
         for name, m in (("q", n), ("k", nk), ("v", nk), ("dout", n))}
    t["bias"] = torch.randn((B, nk) if bias_dim == 2 else (B, H, nk), generator=g, dtype=torch.float64)
    mask = torch.rand(B, nk, generator=g) > 0.3
    mask[:, 0] = True  # every query row keeps a key
    mask[:, 1] = False  # a key masked everywhere (compacted by the ring)
    t["mask"] = mask
    return t


def _strategies(world: int) -> list[tuple[str, dict]]:
    out = [("ring", {}), ("ulysses", {}), ("auto", {})]
    u = 2 if world % 2 == 0 else world
    out.append(("hybrid", {"ulysses_degree": u}))
    out.append(("hybrid groups", {"ulysses_degree": u}))
    return out


def _cases(world: int) -> list[dict]:
    cases = []
    for (strategy, kw), bias_dim, masked, drop, cross in itertools.product(
            _strategies(world), (2, 3), (False, True), (False, True), (False, True)):
        cases.append({"strategy": strategy, "kw": kw, "bias_dim": bias_dim, "mask": masked, "drop": drop,
                      "cross": cross, "bias_grad": "all"})
    for strategy, kw in _strategies(world):  # the bias's gradient wanted on rank 0 only
        cases.append({"strategy": strategy, "kw": kw, "bias_dim": 2, "mask": False, "drop": False, "cross": False,
                      "bias_grad": "rank0"})
    return cases


def _shard(t: torch.Tensor, sizes: list[int], rank: int, dim: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return t.narrow(dim, start, sizes[rank]).clone()


def _one_door_job(rank: int, world: int) -> list[dict]:
    from hpattn_dist import build_hybrid_groups, hybrid_attention
    from hpattn_dist.replicas import facts_of
    from hpattn_dist.strategies import sharded_attention

    explicit = {}
    results = []
    for case in _cases(world):
        full = _full(world, case["cross"], case["bias_dim"])
        qs, ks = _sizes(world, case["cross"], False), _sizes(world, case["cross"], True)
        q = _shard(full["q"], qs, rank, 2).requires_grad_()
        k, v = (_shard(full[n], ks, rank, 2).requires_grad_() for n in ("k", "v"))
        bias = _shard(full["bias"], ks, rank, full["bias"].dim() - 1)
        bias.requires_grad_(case["bias_grad"] == "all" or rank == 0)
        mask = _shard(full["mask"], ks, rank, 1) if case["mask"] else None
        opts = {"key_bias": bias, "key_mask": mask, "backend": "manual",
                **({"dropout_p": P_DROP, "dropout_seed": SEED} if case["drop"] else {})}
        if case["strategy"] == "hybrid groups":
            if case["cross"]:
                results.append(None)  # hybrid_attention has no cross form
                continue
            u = case["kw"]["ulysses_degree"]
            if u not in explicit:
                explicit[u] = build_hybrid_groups(None, u)
            out = hybrid_attention(q, k, v, ulysses_group=explicit[u].ulysses_group,
                                   ring_group=explicit[u].ring_group, **opts)
        else:
            out = sharded_attention(case["strategy"], q, k, v, cross=case["cross"], **case["kw"], **opts)
        dout = _shard(full["dout"], qs, rank, 2)
        out.backward(dout)
        results.append({"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad, "dbias": bias.grad,
                        "grad_fn": out.grad_fn.name()})
    # A layer's facts (LayerFacts) through the op: exact, and ranks with different weights refused.
    full = _full(world, False, 2)
    qs = _sizes(world, False, False)
    q, k, v = (_shard(full[n], qs, rank, 2).requires_grad_() for n in ("q", "k", "v"))
    facts = facts_of("probe layer", [torch.ones(3, dtype=torch.float64)], healpix_field=False)
    out = sharded_attention("ulysses", q, k, v, layer=facts, backend="manual")
    out.backward(_shard(full["dout"], qs, rank, 2))
    results.append({"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad})
    return results


@functools.lru_cache(maxsize=None)
def _results(world: int) -> list[list[dict]]:
    return run_ranks(_one_door_job, world, timeout=300)


def _reference(world: int, case: dict) -> dict:
    full = _full(world, case["cross"], case["bias_dim"])
    q, k, v, bias = (full[n].clone().requires_grad_() for n in ("q", "k", "v", "bias"))
    folded = bias if bias.dim() == 3 else bias[:, None]
    if case["mask"]:
        folded = folded.masked_fill(~full["mask"][:, None], float("-inf"))
    spec = DropoutSpec(P_DROP, SEED) if case["drop"] else None
    out = reference_attention(q, k, v, key_bias=folded, dropout=spec)
    out.backward(full["dout"])
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad, "dbias": bias.grad}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_strategy_with_a_key_bias_is_exact(world):
    """float64 against the single-device reference, the key bias's gradient included, in every
    case; a bias wanted on rank 0 only gets its gradient there and None elsewhere."""
    per_rank = _results(world)
    for i, case in enumerate(_cases(world)):
        ref = _reference(world, case)
        qs, ks = _sizes(world, case["cross"], False), _sizes(world, case["cross"], True)
        for rank in range(world):
            got = per_rank[rank][i]
            if got is None:
                continue
            where = (case, rank)
            assert got["grad_fn"].startswith("GeneratedBackwardFor_hpattn"), (where, got["grad_fn"])
            for name, sizes, dim in (("out", qs, 2), ("dq", qs, 2), ("dk", ks, 2), ("dv", ks, 2),
                                     ("dbias", ks, case["bias_dim"] - 1)):
                if name == "dbias" and case["bias_grad"] == "rank0" and rank > 0:
                    assert got[name] is None, where
                    continue
                torch.testing.assert_close(got[name], _shard(ref[name], sizes, rank, dim), rtol=1e-10,
                                           atol=1e-12, msg=lambda m: f"{name} {where}: {m}")


@pytest.mark.parametrize("world", [2, 3])
def test_layer_facts_run_through_the_op(world):
    full = _full(world, False, 2)
    q, k, v = (full[n].clone().requires_grad_() for n in ("q", "k", "v"))
    out = reference_attention(q, k, v)
    out.backward(full["dout"])
    qs = _sizes(world, False, False)
    for rank, res in enumerate(_results(world)):
        got = res[-1]
        for name, want in (("out", out.detach()), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
            torch.testing.assert_close(got[name], _shard(want, qs, rank, 2), rtol=1e-10, atol=1e-12)


def _graph_ops(fn) -> set[str]:
    """The dispatcher ops one call of ``fn`` runs at the top level (what compile would see)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: set[str] = set()

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Ops():
        fn()
    return seen


def test_key_bias_and_explicit_groups_are_ops_only():
    """One process: a call with a differentiable key bias (both shapes) and a hybrid over explicit
    groups are a registered op's output, and forward + backward run ``hpattn::`` ops and no
    attention arithmetic beside them (the autograd route ran the kernels' aten ops at the top
    level, where compile traced them)."""
    from hpattn_dist import hybrid_attention, ring_attention, ulysses_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 6, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    allowed = {"hpattn.attention_fwd", "hpattn.attention_bwd", "aten.detach", "aten.expand", "aten.ones_like", "aten.add_",
               "aten.sum"}
    for bias in (torch.randn(1, 6, dtype=torch.float64, requires_grad=True),
                 torch.randn(1, 4, 6, dtype=torch.float64, requires_grad=True)):
        for fn in (ring_attention, ulysses_attention):
            out = fn(q, k, v, key_bias=bias)
            assert out.grad_fn.name().startswith("GeneratedBackwardFor_hpattn"), (fn.__name__, out.grad_fn.name())
            ops = _graph_ops(lambda: fn(q, k, v, key_bias=bias).sum().backward())
            assert {"hpattn.attention_fwd", "hpattn.attention_bwd"} <= ops <= allowed, (fn.__name__, ops)
    out = hybrid_attention(q, k, v, ulysses_group=None, ring_group=None)
    assert out.grad_fn.name().startswith("GeneratedBackwardFor_hpattn"), out.grad_fn.name()


def _refusal_job(rank: int, world: int, what: str) -> str:
    from hpattn_dist import ring_attention, ulysses_attention

    q, k, v = (torch.randn(1, 2, 4, 4) for _ in range(3))
    kw = {}
    if what == "meta on rank 1" and rank == 1:
        q, k, v = (torch.empty(1, 2, 4, 4, device="meta") for _ in range(3))
    if what == "seed out of range on rank 0" and rank == 0:
        kw = {"dropout_p": 0.1, "dropout_seed": 2**40}
    if what == "bias on meta on rank 1":
        bias = torch.randn(1, 4, requires_grad=True)
        kw = {"key_bias": torch.empty(1, 4, device="meta") if rank == 1 else bias}
    try:
        (ulysses_attention if what.startswith("bias") else ring_attention)(q, k, v, **kw)
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("what,needle", [("meta on rank 1", "meta"),
                                          ("seed out of range on rank 0", "dropout_seed"),
                                          ("bias on meta on rank 1", "meta")])
def test_what_the_op_cannot_take_is_refused_on_every_rank(what, needle):
    messages = run_ranks(_refusal_job, 2, what, timeout=120)
    assert all(m != "no error" for m in messages), messages
    assert any(needle in m for m in messages), messages
