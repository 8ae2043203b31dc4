"""``ulysses_attention`` on real gloo ranks against the float64 reference on the gathered tensors.

One ``run_ranks`` job per world size P in {1, 2, 4} runs every case (start-up costs seconds, a
case milliseconds); each rank returns its output and gradient shards and its communication
counters; the parent assembles the full tensors and compares them, forward and backward, with
:func:`tests.reference.reference_attention` (float64, explicit softmax) on the same inputs.
The helpers at the top are shared with ``test_hybrid.py``.

Legend: B batch, H heads, N global pixels, N_r pixels of group rank r, D head dim, P group size.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist

from hpattn_dist import count_communication, ring_attention, ulysses_attention
from hpattn_dist.comm.all_to_all import all_to_all
from hpattn_dist.kernels import DropoutSpec, draw_seed
from hpattn_dist.strategies.auto import communication_volume
from tests.harness import attempt, run_ranks
from tests.reference import reference_with_grads

TORCH_SEED = 4321  # torch.manual_seed on every rank before a dropout call
GRADS = ("dq", "dk", "dv")


# --------------------------------------------------------------------------------------------
# Shared helpers (also used by test_hybrid.py)


def case(name: str, **kw: Any) -> dict:
    c = dict(name=name, n=13, b=2, h=4, d=8, dtype=torch.float64, backend="manual", mask=False,
             bias=None, dropout_p=0.0, sizes=None, seed=0)
    c.update(kw)
    return c


def even_sizes(n: int, p: int) -> list[int]:
    return [n // p + (1 if r < n % p else 0) for r in range(p)]


def make_data(c: dict) -> dict:
    """Full float64 tensors of a case (values exactly representable in the case dtype)."""
    g = torch.Generator().manual_seed(1000 + c["seed"])
    b, h, n, d = c["b"], c["h"], c["n"], c["d"]
    data = {x: torch.randn(b, h, n, d, generator=g, dtype=torch.float64).to(c["dtype"]).double()
            for x in ("q", "k", "v", "dout")}
    data["mask"] = data["bias"] = None
    if c["mask"]:  # batch 0: ~30% masked and the first 3 keys; batch 1: nothing masked
        mask = torch.rand(b, n, generator=g) > 0.3
        mask[0, :3] = False
        mask[1:] = True
        data["mask"] = mask
    if c["bias"] is not None:
        shape = (b, n) if c["bias"] == "bn" else (b, h, n)
        data["bias"] = torch.randn(*shape, generator=g, dtype=torch.float64)
    return data


def run_case(fn: Callable, c: dict, position: int, group_size: int, **kwargs: Any) -> dict:
    """Run ``fn(q, k, v, **kwargs)`` on this position's shard, forward and backward, counted."""
    data = make_data(c)
    sizes = c["sizes"] or even_sizes(c["n"], group_size)
    start = sum(sizes[:position])
    local = slice(start, start + sizes[position])
    q, k, v = (data[x][:, :, local].to(c["dtype"]).requires_grad_() for x in ("q", "k", "v"))
    key_mask = None if data["mask"] is None else data["mask"][:, local].clone()
    key_bias = None if data["bias"] is None else data["bias"][..., local].clone().requires_grad_()
    if c["dropout_p"] > 0:
        torch.manual_seed(TORCH_SEED)
    with count_communication() as fwd:
        out = fn(q, k, v, backend=c["backend"], dropout_p=c["dropout_p"], key_mask=key_mask,
                 key_bias=key_bias, **kwargs)
    with count_communication() as bwd:
        out.backward(data["dout"][:, :, local].to(c["dtype"]))
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad,
            "dbias": None if key_bias is None else key_bias.grad,
            "fwd": fwd.as_dict(), "bwd": bwd.as_dict(), "position": position, "sizes": sizes}


def assemble(shards: list[dict]) -> dict:
    """Concatenate per-position shards (any order) along the pixel dim."""
    shards = sorted(shards, key=lambda s: s["position"])
    full = {t: torch.cat([s[t] for s in shards], dim=2) for t in ("out", *GRADS)}
    full["dbias"] = None if shards[0]["dbias"] is None else torch.cat([s["dbias"] for s in shards], -1)
    return full


def dropout_seed() -> int:
    """The seed every rank draws after ``torch.manual_seed(TORCH_SEED)``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TORCH_SEED)
        return draw_seed()


def reference(c: dict) -> dict:
    """Float64 forward and gradients of the whole attention (mask folded into the key bias)."""
    return reference_with_grads(make_data(c), DropoutSpec(c["dropout_p"], dropout_seed()) if c["dropout_p"] > 0
                                else None)


def max_rel_error(got: dict, ref: dict) -> dict[str, float]:
    """Per tensor: max-abs error / max-abs reference (shapes and finiteness checked)."""
    errs = {}
    for t in ("out", *GRADS, "dbias"):
        if ref[t] is None:
            continue
        assert got[t] is not None and got[t].shape == ref[t].shape, t
        assert torch.isfinite(got[t]).all(), t
        errs[t] = (got[t].double() - ref[t]).abs().max().item() / ref[t].abs().max().item()
    return errs


def payload(stats: dict) -> int:
    """Bytes sent, without the shape handshakes (``*.meta``)."""
    return sum(n for label, n in stats["bytes_sent"].items() if not label.endswith(".meta"))


# --------------------------------------------------------------------------------------------
# Cases


def _cases(world: int) -> list[dict]:
    cases = [
        case("fp64-manual", seed=1),
        case("fp64-sdpa", backend="sdpa", seed=2),
        case("fp32-sdpa", dtype=torch.float32, backend="sdpa", seed=3),
        case("bf16-sdpa", dtype=torch.bfloat16, backend="sdpa", seed=10),
        case("mask", mask=True, seed=4),
        case("bias-bn-mask", mask=True, bias="bn", seed=5),
        case("bias-bhn", bias="bhn", seed=6),
        case("dropout", dropout_p=0.3, seed=7),
        case("dropout-mask-bias", mask=True, bias="bhn", dropout_p=0.3, seed=8),
    ]
    zero = {2: [0, 13], 4: [0, 0, 13, 0]}
    if world in zero:
        cases.append(case("zero-rank", sizes=zero[world], mask=True, seed=9))
    return cases


SUBGROUPS = [[0, 2], [1, 3]]  # world 4: Ulysses over interleaved pairs


# --------------------------------------------------------------------------------------------
# Rank side


def _ulysses_job(rank: int, world: int, cases: list[dict]) -> dict:
    results: dict[str, Any] = {}
    for c in cases:
        results[c["name"]] = run_case(ulysses_attention, c, rank, world)
        if c["dropout_p"] > 0:  # the ring on the same data and seed: the same mask
            results[c["name"] + "/ring"] = run_case(ring_attention, c, rank, world)
    if world > 1:
        x = torch.randn(1, 3, 2, 4)  # H = 3 is not divisible by P = 2 or 4
        results["indivisible"] = attempt(lambda: ulysses_attention(x, x, x))
    results["a2a"] = _a2a_case(rank, world)
    if world == 4:
        groups = [dist.new_group(members) for members in SUBGROUPS]
        index = next(i for i, m in enumerate(SUBGROUPS) if rank in m)
        c = case("subgroup", n=11, seed=20 + index)
        res = run_case(ulysses_attention, c, SUBGROUPS[index].index(rank), 2, group=groups[index])
        res["group_index"] = index
        results["subgroup"] = res
    return results


def a2a_sizes(world: int) -> tuple[list[int], list[int]]:
    """Uneven scatter sizes (zeros included) and gather sizes for the raw all-to-all case."""
    return [(2 * j + 1) % 4 for j in range(world)], [(j + 2) % 3 for j in range(world)]


def _a2a_case(rank: int, world: int) -> dict:
    """``all_to_all`` of ``x [S, 2, G_r]`` (scatter dim 0, gather dim 2), forward and backward."""
    scatter, gather = a2a_sizes(world)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(sum(scatter), 2, gather[rank], generator=g, dtype=torch.float64,
                    requires_grad=True)
    with count_communication() as stats:
        y = all_to_all(x, scatter_dim=0, gather_dim=2, scatter_sizes=scatter)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(dy)
    bad = {
        "same_dims": attempt(lambda: all_to_all(x, scatter_dim=1, gather_dim=1)),
        "sizes_sum": attempt(lambda: all_to_all(x, scatter_dim=0, gather_dim=2,
                                                scatter_sizes=[1] * world, gather_sizes=gather)),
    }
    return {"x": x.detach(), "y": y.detach(), "dy": dy, "dx": x.grad, "bad": bad,
            "bytes": stats.bytes_sent.get("all_to_all", 0)}


@functools.lru_cache(maxsize=None)
def _job(world: int) -> tuple[dict, list[dict]]:
    cases = _cases(world)
    return {c["name"]: c for c in cases}, run_ranks(_ulysses_job, world, cases, timeout=120.0)


def _result(world: int, name: str) -> dict:
    return assemble([r[name] for r in _job(world)[1]])


# --------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("world", [1, 2, 4])
def test_forward_and_backward_match_float64_reference(world):
    cases, _ = _job(world)
    for name, c in cases.items():
        if c["dtype"] == torch.bfloat16:
            continue  # test_bf16_within_tolerance
        errs = max_rel_error(_result(world, name), reference(c))
        limit = 1e-12 if c["dtype"] == torch.float64 else 1e-5
        assert max(errs.values()) <= limit, (name, errs)
        if c["bias"] is not None:
            assert "dbias" in errs


@pytest.mark.parametrize("world", [1, 2, 4])
def test_bf16_within_tolerance(world):
    """bf16 in and out, lse in fp32: |x - ref| <= 2.5e-2 + 2.5e-2 |ref| against float64."""
    got, ref = _result(world, "bf16-sdpa"), reference(_job(world)[0]["bf16-sdpa"])
    for t in ("out", *GRADS):
        assert got[t].dtype == torch.bfloat16, t
        assert torch.allclose(got[t].double(), ref[t], atol=2.5e-2, rtol=2.5e-2), t


def test_fp32_error_does_not_grow_with_p():
    """Same data at P = 1 and P = 4: max-abs error at P = 4 at most 1.5x that at P = 1."""
    ref = reference(_job(1)[0]["fp32-sdpa"])
    one, four = _result(1, "fp32-sdpa"), _result(4, "fp32-sdpa")
    for t in ("out", *GRADS):
        err_one = (one[t].double() - ref[t]).abs().max().item()
        err_four = (four[t].double() - ref[t]).abs().max().item()
        assert err_four <= 1.5 * err_one, (t, err_one, err_four)


@pytest.mark.parametrize("world", [2, 4])
def test_uneven_and_empty_shards(world):
    shards = _job(world)[1]
    assert shards[0]["fp64-manual"]["sizes"] == even_sizes(13, world)  # 13 % P != 0
    assert 0 in shards[0]["zero-rank"]["sizes"]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_dropout_mask_equals_the_ring(world):
    for name in ("dropout", "dropout-mask-bias"):
        uly, ring = _result(world, name), _result(world, name + "/ring")
        for t in ("out", *GRADS, "dbias"):
            if ring[t] is not None:
                assert (uly[t] - ring[t]).abs().max().item() <= 1e-13, (name, t)
    c = _job(world)[0]["dropout"]
    no_dropout = reference({**c, "dropout_p": 0.0})
    assert (no_dropout["out"] - _result(world, "dropout")["out"]).abs().max() > 1e-2


@pytest.mark.parametrize("world", [1, 2, 4])
def test_exchange_volume_matches_documented_formula(world):
    cases, results = _job(world)
    c = cases["fp64-manual"]
    for rank, res in enumerate(results):
        model = communication_volume("ulysses", batch=c["b"], heads=c["h"], head_dim=c["d"],
                                     sizes=res["fp64-manual"]["sizes"], rank=rank, itemsize=8)
        fwd, bwd = res["fp64-manual"]["fwd"], res["fp64-manual"]["bwd"]
        assert (payload(fwd), payload(bwd)) == (model.forward, model.backward), (rank, fwd, bwd)
        expected_calls = {"ulysses.qkv": 1, "ulysses.out": 1} if world > 1 else {}
        assert {k: v for k, v in fwd["calls"].items() if not k.endswith(".meta")} == expected_calls
        assert set(bwd["calls"]) == ({"ulysses.out.grad", "ulysses.qkv.grad"} if world > 1 else set())
    if world == 4:  # the closed form at equal shards: 4 (P-1)/P * B*H*N_r*D*s each way
        x = 4 * 8 * c["h"] * c["b"] * c["d"]  # N_r = 4 on rank 0 (N = 13)
        model = communication_volume("ulysses", batch=c["b"], heads=c["h"], head_dim=c["d"],
                                     sizes=[4] * 4, rank=0, itemsize=8)
        assert model.forward == model.backward == 4 * 3 * x // 4


@pytest.mark.parametrize("world", [1, 2, 4])
def test_all_to_all_uneven_and_its_adjoint(world):
    """y_r = cat_i(x_i[S-block r], dim 2); dx_i[S-block r] = dy_r[G-block i] (the swapped
    all-to-all); bytes = everything but the piece a rank keeps."""
    res = [r["a2a"] for r in _job(world)[1]]
    scatter, gather = a2a_sizes(world)
    s_start = [sum(scatter[:j]) for j in range(world)]
    g_start = [sum(gather[:j]) for j in range(world)]
    for r in range(world):
        rows = slice(s_start[r], s_start[r] + scatter[r])
        expected_y = torch.cat([res[i]["x"][rows] for i in range(world)], dim=2)
        assert torch.equal(res[r]["y"], expected_y)
        expected_dx = torch.cat([res[j]["dy"][:, :, g_start[r]:g_start[r] + gather[r]]
                                 for j in range(world)], dim=0)
        assert torch.equal(res[r]["dx"], expected_dx)
        own = scatter[r] * 2 * gather[r]
        assert res[r]["bytes"] == (0 if world == 1 else (res[r]["x"].numel() - own) * 8)
        if world > 1:
            assert res[r]["bad"]["sizes_sum"].startswith("ValueError"), res[r]["bad"]
        assert res[r]["bad"]["same_dims"].startswith("ValueError"), res[r]["bad"]


@pytest.mark.parametrize("world", [2, 4])
def test_heads_not_divisible_raise_on_every_rank(world):
    for res in _job(world)[1]:
        msg = res["indivisible"]
        assert msg is not None and msg.startswith("ValueError"), msg
        assert "H=3" in msg and f"P={world}" in msg


def test_subgroup():
    results = _job(4)[1]
    for index, members in enumerate(SUBGROUPS):
        shards = [r["subgroup"] for r in results if r["subgroup"]["group_index"] == index]
        assert len(shards) == len(members)
        c = case("subgroup", n=11, seed=20 + index)
        errs = max_rel_error(assemble(shards), reference(c))
        assert max(errs.values()) <= 1e-12, errs
