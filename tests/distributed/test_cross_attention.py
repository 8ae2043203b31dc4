"""Cross-grid attention on real gloo ranks against a dense float64 reference on the gathered tensors.

Queries (``Nq`` pixels) and keys (``Nk`` pixels) are split over the ranks independently and
unevenly (zero-pixel shards included). One ``run_ranks`` job per world size P in {1, ..., 5} runs
every case of that size; each rank returns its output shard, its gradient shards and its
communication counters, and the parent assembles the full tensors and compares them with
:func:`tests.reference.reference_attention` (float64, explicit softmax, its own dropout mask) on
the same inputs, forward and backward. The layer cases compare
:class:`~hpattn_dist.DistributedSpatialCrossAttention` with the same dense reference behind
projections written out as matmuls (not ``nn.Linear``, not the oracle).

Legend: B batch, H heads, D head dim, Nq / Nk query / key pixels, P group size.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import pytest
import torch

from hpattn_dist import DistributedSpatialCrossAttention, count_communication, ring_attention, ring_cross_attention
from hpattn_dist.kernels import DropoutSpec, draw_seed
from hpattn_dist.strategies import sharded_attention
from tests.distributed.test_ring import mixed_key_mask
from tests.harness import attempt, run_ranks
from tests.reference import reference_attention, reference_with_grads

WORLD_SIZES = (1, 2, 3, 4, 5)
TORCH_SEED = 4321  # torch.manual_seed on every rank right before a dropout call
GRADS = ("dq", "dk", "dv")
TOL = 1e-10


# --------------------------------------------------------------------------------------------
# Cases and data (pure functions of the case and P: ranks and parent build identical tensors)


def _case(name: str, **kw: Any) -> dict:
    case = dict(name=name, nq=29, nk=13, b=2, h=3, d=8, backend="manual", strategy="ring", mask=None,
                bias=None, dropout_p=0.0, seed=0, ulysses_degree=None)
    case.update(kw)
    return case


def _cases(world: int) -> list[dict]:
    cases = [
        _case("ring-manual", seed=1),                                       # Nq > Nk
        _case("ring-sdpa-more-keys", nq=11, nk=37, backend="sdpa", seed=2),  # Nq < Nk
        _case("ring-mask-bias", nq=17, nk=23, mask="mixed", bias="bhn", seed=3),
        _case("ring-dropout", nq=19, nk=14, mask="mixed", bias="bn", dropout_p=0.3, seed=4),
        _case("ring-tiny-keys", nq=9, nk=2, seed=5),                          # most ranks: no key
        _case("ulysses-mask-bias", strategy="ulysses", h=world, nq=21, nk=8, mask="mixed", bias="bhn",
              seed=6),
        _case("ulysses-plain", strategy="ulysses", h=2 * world, nq=10, nk=26, backend="sdpa", seed=7),
        # H = 60 at every P (divisible by 1..5): the same data at P = 1, 3, 5
        _case("ulysses-dropout", strategy="ulysses", h=60, d=4, nq=15, nk=22, bias="bn", dropout_p=0.3, seed=8),
        _case("auto", strategy="auto", h=4, nq=18, nk=31, mask="mixed", seed=9),
    ]
    if world == 4:
        cases += [
            _case("hybrid-mask-dropout", strategy="hybrid", ulysses_degree=2, h=2, nq=23, nk=11,
                  mask="mixed", dropout_p=0.3, seed=10),
            _case("hybrid-bias", strategy="hybrid", ulysses_degree=2, h=4, nq=9, nk=30, bias="bhn", seed=11),
        ]
    return cases


def split(n: int, p: int, salt: int) -> list[int]:
    """An uneven contiguous split of ``n`` pixels over ``p`` ranks; for P >= 3 rank ``salt % p`` gets none."""
    g = torch.Generator().manual_seed(97 * n + 13 * p + salt)
    cuts = sorted(torch.randint(0, n + 1, (p - 1,), generator=g).tolist())
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, n])]
    if p >= 3:
        empty = salt % p
        sizes[(empty + 1) % p] += sizes[empty]
        sizes[empty] = 0
    return sizes


def _make_data(case: dict) -> dict:
    g = torch.Generator().manual_seed(1000 + case["seed"])
    b, h, d, nq, nk = case["b"], case["h"], case["d"], case["nq"], case["nk"]
    data = {name: torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
            for name, n in (("q", nq), ("k", nk), ("v", nk), ("dout", nq))}
    data["mask"] = data["bias"] = None
    if case["mask"] == "mixed":
        data["mask"] = mixed_key_mask(b, nk, g)
    if case["bias"] is not None:
        data["bias"] = torch.randn(*((b, nk) if case["bias"] == "bn" else (b, h, nk)), generator=g,
                                   dtype=torch.float64)
    return data


def _dropout_seed() -> int:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TORCH_SEED)
        return draw_seed()


# --------------------------------------------------------------------------------------------
# Rank side


def _cross_job(rank: int, world_size: int, cases: list[dict]) -> dict:
    results: dict[str, Any] = {name: _run_case(rank, world_size, case)
                               for name, case in ((c["name"], c) for c in cases)}
    results["layer"] = _run_layer_cases(rank, world_size)
    if world_size == 3:
        results["errors"] = _fail_together(rank)
    return results


def _run_case(rank: int, p: int, case: dict) -> dict:
    data = _make_data(case)
    q_sizes, k_sizes = split(case["nq"], p, case["seed"]), split(case["nk"], p, case["seed"] + 1)
    qs = slice(sum(q_sizes[:rank]), sum(q_sizes[:rank + 1]))
    ks = slice(sum(k_sizes[:rank]), sum(k_sizes[:rank + 1]))
    q = data["q"][:, :, qs].clone().requires_grad_()
    k, v = (data[x][:, :, ks].clone().requires_grad_() for x in ("k", "v"))
    key_mask = None if data["mask"] is None else data["mask"][:, ks].clone()
    key_bias = None if data["bias"] is None else data["bias"][..., ks].clone().requires_grad_()
    if case["dropout_p"] > 0:
        torch.manual_seed(TORCH_SEED)
    kwargs = dict(backend=case["backend"], dropout_p=case["dropout_p"], key_mask=key_mask, key_bias=key_bias)
    with count_communication() as fwd:
        if case["strategy"] == "ring":
            out = ring_cross_attention(q, k, v, **kwargs)
        else:
            out = sharded_attention(case["strategy"], q, k, v, ulysses_degree=case["ulysses_degree"],
                                    cross=True, **kwargs)
    with count_communication() as bwd:
        out.backward(data["dout"][:, :, qs])
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad,
            "dbias": None if key_bias is None else key_bias.grad,
            "q_sizes": q_sizes, "k_sizes": k_sizes, "fwd": fwd.as_dict(), "bwd": bwd.as_dict()}


LAYER_CASES = {
    # name: (E, H, kv_dim, Nq, Nk, strategy, mask, bias, dropout); Nq, Nk HEALPix sizes
    "encoder-ring": (8, 2, 5, 12, 48, "ring", False, False, 0.0),       # nside 2 -> 1
    "decoder-auto-mask-bias": (8, 2, None, 48, 12, "auto", True, True, 0.0),  # nside 1 -> 2
    "encoder-dropout": (8, 2, 3, 12, 48, "ring", True, False, 0.3),
}


def _layer_data(name: str) -> dict:
    e, h, kv_dim, nq, nk, _, mask, bias, _ = LAYER_CASES[name]
    g = torch.Generator().manual_seed(500 + list(LAYER_CASES).index(name))
    kv_dim = e if kv_dim is None else kv_dim
    data = {"x_q": torch.randn(2, nq, e, generator=g, dtype=torch.float64),
            "x_kv": torch.randn(2, nk, kv_dim, generator=g, dtype=torch.float64),
            "dout": torch.randn(2, nq, e, generator=g, dtype=torch.float64), "mask": None, "bias": None}
    if mask:
        data["mask"] = torch.rand(2, nk, generator=g) > 0.4
        data["mask"][1, :] = False  # batch 1: every key masked (zero attention output)
    if bias:
        data["bias"] = torch.randn(2, nk, generator=g, dtype=torch.float64)
    return data


def _layer_params(name: str) -> dict:
    e, h, kv_dim, *_ = LAYER_CASES[name]
    torch.manual_seed(7)
    layer = DistributedSpatialCrossAttention(e, h, kv_dim, attn_backend="manual").double()
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def _run_layer_cases(rank: int, p: int) -> dict:
    results = {}
    for i, (name, (e, h, kv_dim, nq, nk, strategy, _, _, dropout)) in enumerate(LAYER_CASES.items()):
        data = _layer_data(name)
        torch.manual_seed(7)
        layer = DistributedSpatialCrossAttention(e, h, kv_dim, dropout=dropout, attn_backend="manual",
                                                 strategy=strategy).double()
        layer.train(dropout > 0)
        q_sizes, k_sizes = split(nq, p, 50 + i), split(nk, p, 60 + i)
        qs = slice(sum(q_sizes[:rank]), sum(q_sizes[:rank + 1]))
        ks = slice(sum(k_sizes[:rank]), sum(k_sizes[:rank + 1]))
        x_q = data["x_q"][:, qs].clone().requires_grad_()
        x_kv = data["x_kv"][:, ks].clone().requires_grad_()
        mask = None if data["mask"] is None else data["mask"][:, ks]
        bias = None if data["bias"] is None else data["bias"][:, ks].clone().requires_grad_()
        torch.manual_seed(TORCH_SEED)
        out = layer(x_q, x_kv, mask, bias)
        out.backward(data["dout"][:, qs])
        results[name] = {
            "out": out.detach(), "dx_q": x_q.grad, "dx_kv": x_kv.grad,
            "dbias": None if bias is None else bias.grad,
            "params": {n: prm.grad for n, prm in layer.named_parameters()},
        }
    return results


def _fail_together(rank: int) -> dict:
    """Only rank 1 is wrong; EVERY rank must raise, and the group stays usable."""
    q, k = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 3, 8)
    odd = rank == 1
    attempts = {
        "head_dim": lambda: ring_cross_attention(q[..., :4] if odd else q, k, k),
        "kv_lengths": lambda: ring_cross_attention(q, k, k[:, :, :2] if odd else k),
        "mask_length": lambda: ring_cross_attention(q, k, k, key_mask=torch.ones(2, 5 if odd else 3, dtype=torch.bool)),
        "self_vs_cross": lambda: (ring_attention(q, q, q) if odd else ring_cross_attention(q, k, k)),
    }
    torch.manual_seed(3)
    layer = DistributedSpatialCrossAttention(8, 2, kv_dim=3, strategy="ring")
    x_q = torch.randn(1, 4, 8)  # 3 x 4 = 12 target pixels: nside 1
    attempts["layer_kv_dim"] = lambda: layer(x_q, torch.randn(1, 16, 4 if odd else 3))
    attempts["layer_source_not_healpix"] = lambda: layer(x_q, torch.randn(1, 17 if odd else 16, 3))
    found = {name: attempt(fn) for name, fn in attempts.items()}
    found["after"] = tuple(ring_cross_attention(q, k, k).shape)
    found["layer_after"] = tuple(layer(x_q, torch.randn(1, 16, 3)).shape)  # 48 source pixels: nside 2
    return found


# --------------------------------------------------------------------------------------------
# Parent side


@functools.lru_cache(maxsize=None)
def _job(world: int) -> tuple[dict, list[dict]]:
    cases = _cases(world)
    return {c["name"]: c for c in cases}, run_ranks(_cross_job, world, cases, timeout=180.0)


def _assembled(world: int, name: str) -> dict:
    _, results = _job(world)
    shards = [r[name] for r in results]
    full = {"out": torch.cat([s["out"] for s in shards], 2), "dq": torch.cat([s["dq"] for s in shards], 2),
            "dk": torch.cat([s["dk"] for s in shards], 2), "dv": torch.cat([s["dv"] for s in shards], 2)}
    full["dbias"] = None if shards[0]["dbias"] is None else torch.cat([s["dbias"] for s in shards], -1)
    full["shards"] = shards
    return full


def _reference(case: dict) -> dict:
    return reference_with_grads(_make_data(case), DropoutSpec(case["dropout_p"], _dropout_seed())
                                if case["dropout_p"] > 0 else None)


def _rel_errors(got: dict, ref: dict) -> dict[str, float]:
    errs = {}
    for t, r in ref.items():
        if r is None:
            continue
        assert got[t].shape == r.shape, t
        assert torch.isfinite(got[t]).all(), t
        scale = r.abs().max().item()
        errs[t] = (got[t] - r).abs().max().item() / (scale if scale > 0 else 1.0)
    return errs


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_fp64_output_and_gradients_match_dense_reference(world):
    cases, _ = _job(world)
    for name, case in cases.items():
        errs = _rel_errors(_assembled(world, name), _reference(case))
        assert max(errs.values()) <= TOL, (name, errs)


@pytest.mark.parametrize("world", [2, 3, 4, 5])
def test_shards_are_uneven_and_independent(world):
    cases, _ = _job(world)
    for name in cases:
        shard = _assembled(world, name)["shards"][0]
        assert shard["q_sizes"] != shard["k_sizes"]
        if world >= 3:
            assert 0 in shard["q_sizes"] and 0 in shard["k_sizes"], name
    assert sum(_assembled(world, "ring-tiny-keys")["shards"][0]["k_sizes"]) == 2


@pytest.mark.parametrize("name", ["ring-dropout", "ulysses-dropout"])
def test_dropout_is_p_invariant(name):
    one = _assembled(1, name)
    for world in (3, 5):
        other = _assembled(world, name)
        for t in ("out", *GRADS, "dbias"):
            if one[t] is not None:
                assert (one[t] - other[t]).abs().max().item() <= 1e-13, (world, t)
    plain = _reference({**_job(1)[0][name], "dropout_p": 0.0})
    assert (plain["out"] - one["out"]).abs().max().item() > 1e-2  # dropout did drop something


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_exchanged_bytes_equal_closed_form(world):
    cases, results = _job(world)
    p, s, acc = world, 8, 8  # float64 data and accumulators
    for name, case in cases.items():
        if case["mask"] is not None or case["bias"] is not None or case["strategy"] not in ("ring", "ulysses"):
            continue
        b, h, d = case["b"], case["h"], case["d"]
        for r, res in enumerate(results):
            fwd, bwd = res[name]["fwd"]["bytes_sent"], res[name]["bwd"]["bytes_sent"]
            q_sizes, k_sizes = res[name]["q_sizes"], res[name]["k_sizes"]
            assert res[name]["fwd"]["calls"].get("all_gather.meta", 0) == (1 if p > 1 else 0), name
            assert "all_gather.meta" not in res[name]["bwd"]["calls"], name
            if case["strategy"] == "ring":
                sent = sum(k_sizes[(r - step) % p] for step in range(p - 1))
                assert fwd.get("ring.forward", 0) == 2 * b * h * d * s * sent, name
                assert bwd.get("ring.backward.kv", 0) == 2 * b * h * d * s * sent, name
                assert bwd.get("ring.backward.dkv", 0) == (2 * b * h * d * acc * case["nk"] if p > 1 else 0)
            else:
                hh = h // p
                nq_r, nk_r = q_sizes[r], k_sizes[r]
                assert fwd.get("ulysses.q", 0) == s * b * d * (h - hh) * nq_r, name
                assert fwd.get("ulysses.kv", 0) == 2 * s * b * d * (h - hh) * nk_r, name
                assert fwd.get("ulysses.out", 0) == s * b * d * hh * (case["nq"] - nq_r), name
                assert bwd.get("ulysses.out.grad", 0) == s * b * d * (h - hh) * nq_r, name
                assert bwd.get("ulysses.q.grad", 0) == s * b * d * hh * (case["nq"] - nq_r), name
                assert bwd.get("ulysses.kv.grad", 0) == 2 * s * b * d * hh * (case["nk"] - nk_r), name


def _layer_reference(name: str, params: dict, dropout_seed: Optional[int]) -> dict:
    """The layer written out: matmul projections around the dense reference attention."""
    e, h, kv_dim, nq, nk, _, _, _, dropout = LAYER_CASES[name]
    data = _layer_data(name)
    w = {n: t.clone().requires_grad_() for n, t in params.items()}
    x_q, x_kv = data["x_q"].clone().requires_grad_(), data["x_kv"].clone().requires_grad_()
    bias_leaf = None if data["bias"] is None else data["bias"].clone().requires_grad_()
    d = e // h
    q = (x_q @ w["q_proj.weight"].T + w["q_proj.bias"]).view(2, nq, h, d).permute(0, 2, 1, 3)
    kv = (x_kv @ w["kv_proj.weight"].T + w["kv_proj.bias"]).view(2, nk, 2, h, d).permute(2, 0, 3, 1, 4)
    bias = bias_leaf
    if data["mask"] is not None:
        bias = torch.zeros(2, nk, dtype=torch.float64) if bias is None else bias
        bias = bias.masked_fill(~data["mask"], float("-inf"))
    spec = DropoutSpec(dropout, dropout_seed) if dropout > 0 else None
    att = reference_attention(q, kv[0], kv[1], key_bias=bias, dropout=spec)  # [B, H, Nq, D]
    out = att.permute(0, 2, 1, 3).reshape(2, nq, e) @ w["out_proj.weight"].T + w["out_proj.bias"]
    out.backward(data["dout"])
    ref = {"out": out.detach(), "dx_q": x_q.grad, "dx_kv": x_kv.grad,
           "dbias": None if bias_leaf is None else bias_leaf.grad}
    ref.update({f"param:{n}": t.grad for n, t in w.items()})
    return ref


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_layer_matches_dense_reference(world, name):
    _, results = _job(world)
    shards = [r["layer"][name] for r in results]
    got = {"out": torch.cat([s["out"] for s in shards], 1), "dx_q": torch.cat([s["dx_q"] for s in shards], 1),
           "dx_kv": torch.cat([s["dx_kv"] for s in shards], 1),
           "dbias": None if shards[0]["dbias"] is None else torch.cat([s["dbias"] for s in shards], 1)}
    # replicated parameters: the full gradient is the sum of the ranks' local gradients
    got.update({f"param:{n}": sum(s["params"][n] for s in shards) for n in shards[0]["params"]})
    dropout = LAYER_CASES[name][-1]
    ref = _layer_reference(name, _layer_params(name), _dropout_seed() if dropout > 0 else None)
    errs = _rel_errors(got, ref)
    assert max(errs.values()) <= TOL, errs


def test_fail_together():
    _, results = _job(3)
    for rank, res in enumerate(results):
        errs = res["errors"]
        assert errs["after"] == (2, 2, 5, 8)
        assert errs["layer_after"] == (1, 4, 8)
        for name in ("head_dim", "kv_lengths", "mask_length", "self_vs_cross", "layer_kv_dim",
                     "layer_source_not_healpix"):
            msg = errs[name]
            assert msg is not None and msg.startswith("ValueError"), (rank, name, msg)
        assert "rank 1" in errs["head_dim"] and "D" in errs["head_dim"], errs["head_dim"]
        assert "Nk_local" in errs["kv_lengths"], errs["kv_lengths"]
        # The entry point is part of the signature (Note [fail together]): each rank's call is named.
        assert "different signatures" in errs["self_vs_cross"] and "rank 1: ring_attention" in \
            errs["self_vs_cross"] and "ring_cross_attention" in errs["self_vs_cross"], errs["self_vs_cross"]
        assert "x_kv_local must have shape [B, Nk_r, kv_dim=3]" in errs["layer_kv_dim"], errs["layer_kv_dim"]
        assert "(keys and values)" in errs["layer_source_not_healpix"] and "N = 49" in errs[
            "layer_source_not_healpix"], errs["layer_source_not_healpix"]
