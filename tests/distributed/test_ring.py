"""``ring_attention`` on real gloo ranks against the float64 reference on the gathered tensors.

One ``run_ranks`` job per world size P in {1, 2, 3, 4, 5} runs every case of that size (start-up
costs seconds, a case milliseconds); each rank returns its output shard, its gradient shards and
its communication counters, and the parent assembles the full tensors and compares them with
:func:`tests.reference.reference_attention` (float64, explicit softmax) on the SAME inputs,
forward and backward. The jobs are cached per module, so each test below only reads results.

Legend: B batch, H heads, N global pixels, N_r pixels of group rank r, D head dim, P group size.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist

from hpattn_dist import count_communication, ring_attention
from hpattn_dist.kernels import DropoutSpec, draw_seed
from tests.harness import attempt, run_ranks
from tests.reference import reference_attention

WORLD_SIZES = (1, 2, 3, 4, 5)
BACKENDS = ("manual", "sdpa")
GRADS = ("dq", "dk", "dv")
TORCH_SEED = 1234  # torch.manual_seed on every rank before a dropout call
# Subgroup layouts of a world of 4; every rank creates every group, in this order.
LAYOUTS = {"pairs": [[0, 1], [2, 3]], "interleaved": [[0, 2], [1, 3]]}


# --------------------------------------------------------------------------------------------
# Cases and data (pure functions of the case: ranks and parent build identical tensors)


def _case(name: str, **kw: Any) -> dict:
    case = dict(name=name, n=29, b=2, h=3, d=8, dtype=torch.float64, backend="manual",
                logit_scale=1.0, mask=None, bias=None, dropout_p=0.0, layout="world",
                sizes=None, repeat=False, seed=0, explicit_world=False, packed=False, scale=None)
    case.update(kw)
    return case


def _cases(world: int) -> list[dict]:
    cases = []
    for i, backend in enumerate(BACKENDS):
        cases += [
            _case(f"fp64-{backend}", backend=backend, seed=10 + i, explicit_world=i == 1),
            # N = 60 at every P: the same data at P = 1 and P = 4 (error growth with P)
            _case(f"fp32-{backend}", n=60, h=4, dtype=torch.float32, backend=backend, seed=20 + i,
                  repeat=True),
            _case(f"bf16-{backend}", n=60, h=2, dtype=torch.bfloat16, backend=backend, seed=30 + i),
            # scores reach ~1e4: q, k ~ 45 * N(0, 1), D = 8
            _case(f"large64-{backend}", backend=backend, logit_scale=45.0, seed=40 + i),
            _case(f"large32-{backend}", dtype=torch.float32, backend=backend, logit_scale=45.0,
                  seed=50 + i),
            _case(f"mask-{backend}", backend=backend, mask="mixed", seed=60 + i),
            _case(f"shared-mask-{backend}", backend=backend, mask="shared", seed=70 + i),
            _case(f"dropout-{backend}", backend=backend, dropout_p=0.3, seed=80 + i, repeat=True),
            # N = 3: at P = 4 and 5 some ranks hold no pixel
            _case(f"tiny-{backend}", n=3, backend=backend, seed=90 + i),
            # q, k, v as strided views of one packed [B, N_r, 3, H, D] projection (as the layer
            # produces them), with a non-default scale
            _case(f"packed-{backend}", backend=backend, packed=True, scale=0.21, seed=95 + i),
        ]
    cases += [
        _case("bias-bn-mask", mask="mixed", bias="bn", seed=100),
        _case("bias-bhn", backend="sdpa", bias="bhn", seed=101),
        _case("dropout-mask-bias", mask="mixed", bias="bn", dropout_p=0.3, seed=102),
        _case("bf16-mask-bias-dropout", n=60, h=2, dtype=torch.bfloat16, mask="mixed", bias="bn",
              dropout_p=0.3, seed=103),
    ]
    zero_sizes = {2: [0, 29], 3: [10, 0, 19], 4: [0, 0, 29, 0], 5: [0, 12, 0, 17, 0]}
    if world in zero_sizes:
        cases += [
            _case("zero-rank-fp64", sizes=zero_sizes[world], seed=110),
            _case("zero-rank-mask-dropout", sizes=zero_sizes[world], mask="mixed", dropout_p=0.3,
                  seed=111),
            _case("zero-rank-sdpa-fp32", sizes=zero_sizes[world], dtype=torch.float32,
                  backend="sdpa", seed=112),
        ]
    if world == 4:
        for layout in LAYOUTS:
            cases += [
                _case(f"{layout}-fp64", layout=layout, seed=120),
                _case(f"{layout}-fp32-sdpa", n=31, dtype=torch.float32, backend="sdpa",
                      layout=layout, seed=121),
                _case(f"{layout}-mask-dropout", layout=layout, mask="mixed", dropout_p=0.3,
                      seed=122),
            ]
    return cases


def _even_sizes(n: int, p: int) -> list[int]:
    return [n // p + (1 if r < n % p else 0) for r in range(p)]


def _bias_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def mixed_key_mask(b: int, n: int, g: torch.Generator) -> torch.Tensor:
    """Bool ``[B, N]`` (True = attend, B >= 2): batch 0 has the first third of its keys and ~30% of
    the rest masked, every other batch element all its keys."""
    mask = torch.rand(b, n, generator=g) > 0.3
    mask[0, : n // 3] = False
    mask[1:] = False
    return mask


def _make_data(case: dict, group_index: int) -> dict:
    """Full float64 tensors of one case; every group of a layout gets its own data."""
    g = torch.Generator().manual_seed(1000 * case["seed"] + group_index)
    b, h, n, d = case["b"], case["h"], case["n"], case["d"]
    data = {}
    for name in ("q", "k", "v", "dout"):
        x = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
        if name in ("q", "k"):
            x = x * case["logit_scale"]
        data[name] = x.to(case["dtype"]).double()  # exactly representable in the case dtype
    data["mask"] = data["bias"] = None
    if case["mask"] == "mixed":
        data["mask"] = mixed_key_mask(b, n, g)
    elif case["mask"] == "shared":  # the same mask in every batch element (a land mask)
        keep = torch.rand(n, generator=g) > 0.4
        keep[0] = True
        data["mask"] = keep.expand(b, n).clone()
    if case["bias"] is not None:
        shape = (b, n) if case["bias"] == "bn" else (b, h, n)
        bias = torch.randn(*shape, generator=g, dtype=torch.float64)
        data["bias"] = bias.to(_bias_dtype(case["dtype"])).double()
    return data


# --------------------------------------------------------------------------------------------
# Rank side


def _ring_job(rank: int, world_size: int, cases: list[dict], with_errors: bool) -> dict:
    layouts = {"world": [(None, list(range(world_size)))]}
    if world_size == 4:
        for name, parts in LAYOUTS.items():
            layouts[name] = [(dist.new_group(members), members) for members in parts]
    results: dict[str, Any] = {}
    for case in cases:
        for group_index, (group, members) in enumerate(layouts[case["layout"]]):
            if rank in members:
                if group is None and case["explicit_world"]:
                    group = dist.group.WORLD
                results[case["name"]] = _run_case(rank, case, group, members, group_index)
    if with_errors:
        results["errors"] = _validation_errors(rank, world_size)
    return results


def _run_case(rank: int, case: dict, group, members: list[int], group_index: int) -> dict:
    data = _make_data(case, group_index)
    p, grank = len(members), members.index(rank)
    sizes = case["sizes"] or _even_sizes(case["n"], p)
    start = sum(sizes[:grank])
    local = slice(start, start + sizes[grank])
    runs = []
    for _ in range(2 if case["repeat"] else 1):
        if case["packed"]:
            packed = torch.stack([data[x][:, :, local] for x in ("q", "k", "v")]).permute(1, 3, 0, 2, 4)
            packed = packed.contiguous().to(case["dtype"]).requires_grad_()  # [B, N_r, 3, H, D]
            q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (data[x][:, :, local].to(case["dtype"]).requires_grad_() for x in ("q", "k", "v"))
        dout = data["dout"][:, :, local].to(case["dtype"])
        key_mask = None if data["mask"] is None else data["mask"][:, local].clone()
        key_bias = None
        if data["bias"] is not None:
            key_bias = data["bias"][..., local].to(_bias_dtype(case["dtype"])).requires_grad_()
        if case["dropout_p"] > 0:
            torch.manual_seed(TORCH_SEED)
        with count_communication() as fwd:
            out = ring_attention(q, k, v, group, backend=case["backend"], dropout_p=case["dropout_p"],
                                 scale=case["scale"], key_mask=key_mask, key_bias=key_bias)
        with count_communication() as bwd:
            out.backward(dout)
        if case["packed"]:
            q, k, v = (SimpleNamespace(grad=g) for g in packed.grad.permute(2, 0, 3, 1, 4).unbind(0))
        runs.append({
            "out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad,
            "dbias": None if key_bias is None else key_bias.grad,
            "fwd": fwd.as_dict(), "bwd": bwd.as_dict(),
        })
    res = runs[0]
    if case["repeat"]:
        res["bitwise"] = all(torch.equal(runs[0][t], runs[1][t]) for t in ("out", *GRADS))
    res.update(sizes=sizes, group_rank=grank, group_index=group_index)
    return res


def _validation_errors(rank: int, world_size: int) -> dict:
    """Bad input on every rank, and ranks that disagree (only rank 1 differs)."""
    g = torch.Generator().manual_seed(7 + rank)
    x = torch.randn(2, 2, 5, 8, generator=g)
    odd = rank == 1
    attempts = {
        "q_3d": lambda: ring_attention(x[0], x[0], x[0]),
        "qkv_shapes": lambda: ring_attention(x, x[:, :1], x),
        "int_dtype": lambda: ring_attention(x.long(), x.long(), x.long()),
        "mixed_dtypes": lambda: ring_attention(x, x.double(), x),
        # a float8 format: refused inside the agreement (before, a kernel raised on some ranks, a hang)
        "float8_dtype": lambda: ring_attention(*(3 * [x.to(torch.float8_e4m3fn)])),
        "dropout_p_1": lambda: ring_attention(x, x, x, dropout_p=1.0),
        "dropout_p_neg": lambda: ring_attention(x, x, x, dropout_p=-0.1),
        "backend": lambda: ring_attention(x, x, x, backend="bogus"),
        "scale": lambda: ring_attention(x, x, x, scale=-1.0),
        "key_mask_dtype": lambda: ring_attention(x, x, x, key_mask=torch.ones(2, 5)),
        "key_mask_shape": lambda: ring_attention(x, x, x, key_mask=torch.ones(2, 4, dtype=torch.bool)),
        "key_bias_shape": lambda: ring_attention(x, x, x, key_bias=torch.zeros(2, 3, 5)),
        # cross-rank disagreement: rank 1 passes something else; EVERY rank must raise
        "disagree_heads": lambda: ring_attention(*(3 * [x[:, :1] if odd else x])),
        "disagree_head_dim": lambda: ring_attention(*(3 * [x[..., :4] if odd else x])),
        "disagree_dtype": lambda: ring_attention(*(3 * [x.double() if odd else x])),
        "disagree_dropout": lambda: ring_attention(x, x, x, dropout_p=0.2 if odd else 0.1),
        # below a part per million: each rank would drop with its own p (no one model's result)
        "disagree_dropout_slightly": lambda: ring_attention(x, x, x, dropout_p=0.1 + 2e-7 if odd else 0.1),
        "dropout_minus_zero": lambda: ring_attention(x, x, x, dropout_p=-0.0 if odd else 0.0),  # no disagreement
        "disagree_mask": lambda: ring_attention(
            x, x, x, key_mask=torch.ones(2, 5, dtype=torch.bool) if odd else None),
    }
    found = {name: attempt(fn) for name, fn in attempts.items()}
    # the group is still usable (no rank is left inside a collective)
    ok = ring_attention(x, x, x)
    found["after"] = ok.shape
    return found


# --------------------------------------------------------------------------------------------
# Parent side


@functools.lru_cache(maxsize=None)
def _job(world: int) -> tuple[dict[str, dict], list[dict]]:
    """Results of every case at world size ``world``: ``({case name: case}, per-rank results)``."""
    cases = _cases(world)
    results = run_ranks(_ring_job, world, cases, world == 3, timeout=180.0)
    return {c["name"]: c for c in cases}, results


def _assembled(world: int, name: str, group_index: int = 0) -> tuple[dict, dict]:
    """The case and its gathered full tensors (group ``group_index`` of its layout)."""
    cases, results = _job(world)
    case = cases[name]
    shards = sorted((r[name] for r in results if name in r and r[name]["group_index"] == group_index),
                    key=lambda s: s["group_rank"])
    full = {t: torch.cat([s[t] for s in shards], dim=2) for t in ("out", *GRADS)}
    full["dbias"] = None if shards[0]["dbias"] is None else torch.cat([s["dbias"] for s in shards], dim=-1)
    full["shards"] = shards
    return case, full


def _dropout_seed() -> int:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TORCH_SEED)
        return draw_seed()


def _reference(case: dict, group_index: int = 0) -> dict:
    """Float64 forward and gradients of the whole attention, mask folded into the key bias."""
    data = _make_data(case, group_index)
    q, k, v = (data[x].clone().requires_grad_() for x in ("q", "k", "v"))
    bias_leaf = None if data["bias"] is None else data["bias"].clone().requires_grad_()
    bias = bias_leaf
    if data["mask"] is not None:
        mask = data["mask"]
        if bias is None:
            bias = torch.zeros(mask.shape, dtype=torch.float64)
        bias = bias.masked_fill(~(mask if bias.dim() == 2 else mask[:, None, :]), float("-inf"))
    dropout = DropoutSpec(case["dropout_p"], _dropout_seed()) if case["dropout_p"] > 0 else None
    out = reference_attention(q, k, v, scale=case["scale"], key_bias=bias, dropout=dropout)
    out.backward(data["dout"])
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad,
            "dbias": None if bias_leaf is None else bias_leaf.grad, "mask": data["mask"]}


def _errors(world: int, name: str, group_index: int = 0) -> dict[str, tuple[float, float, float]]:
    """Per tensor: (max-abs error, max-abs error / max-abs reference, RMS error)."""
    case, got = _assembled(world, name, group_index)
    ref = _reference(case, group_index)
    errs = {}
    for t in ("out", *GRADS, "dbias"):
        if ref[t] is None:
            continue
        assert got[t].shape == ref[t].shape, (name, t)
        assert torch.isfinite(got[t]).all(), (name, t)
        err = (got[t].double() - ref[t]).abs().max().item()
        scale = ref[t].abs().max().item()
        rms = (got[t].double() - ref[t]).pow(2).mean().sqrt().item()
        errs[t] = (err, err / scale if scale > 0 else err, rms)
    return errs


def _max_rel(errs: dict) -> float:
    return max(e[1] for e in errs.values())


# --------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64_forward_and_backward_match_reference(world, backend):
    for name in (f"fp64-{backend}", f"tiny-{backend}", f"packed-{backend}"):
        errs = _errors(world, name)
        assert _max_rel(errs) <= 1e-12, (name, errs)
        case, got = _assembled(world, name)
        assert got["out"].dtype == torch.float64


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_uneven_and_empty_shards(world):
    sizes = [s["sizes"] for s in _assembled(world, "tiny-manual")[1]["shards"]]
    assert sizes[0] == _even_sizes(3, world)
    if world == 1:
        return  # P = 1 holds everything; zero-pixel shards need P >= 2
    for name in ("zero-rank-fp64", "zero-rank-mask-dropout", "zero-rank-sdpa-fp32"):
        case, got = _assembled(world, name)
        assert 0 in got["shards"][0]["sizes"]
        errs = _errors(world, name)
        assert _max_rel(errs) <= (1e-12 if case["dtype"] == torch.float64 else 1e-6), (name, errs)


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_unit_scale_max_abs(world, backend):
    errs = _errors(world, f"fp32-{backend}")
    assert max(e[0] for e in errs.values()) <= 1e-5, errs
    assert _assembled(world, f"fp32-{backend}")[1]["out"].dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_error_does_not_grow_with_p(backend):
    """Same data (N = 60) at P = 1 and P = 4, both against the float64 reference: each tensor's
    RMS error at P = 4 is at most 1.5x its error at P = 1.

    RMS rather than max-abs: the max-abs of one sample is an extreme-value statistic; with a
    merge that adds no error at all its P=4 / P=1 ratio still exceeds 1.5 for 10-20% of seeds
    (measured over 30 seeds), so asserting it would test the seed, not the ring. The max-abs
    bound itself (<= 1e-5) is asserted in test_fp32_unit_scale_max_abs.
    """
    one, four = _errors(1, f"fp32-{backend}"), _errors(4, f"fp32-{backend}")
    for t in ("out", *GRADS):
        assert four[t][2] <= 1.5 * one[t][2], (t, one[t][2], four[t][2])


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_within_tolerance(world, backend):
    """bf16 inputs against the float64 reference on the same (bf16-valued) inputs:
    |x - ref| <= 2.5e-2 + 2.5e-2 |ref| elementwise, forward and gradients, in bf16."""
    names = [f"bf16-{backend}"] + (["bf16-mask-bias-dropout"] if backend == "manual" else [])
    for name in names:
        case, got = _assembled(world, name)
        ref = _reference(case)
        for t in ("out", *GRADS, "dbias"):
            if ref[t] is None:
                continue
            assert got[t].dtype == (torch.bfloat16 if t != "dbias" else torch.float32), (name, t)
            assert torch.allclose(got[t].double(), ref[t], atol=2.5e-2, rtol=2.5e-2), (name, t)


def _rounding_bounds(case: dict) -> dict[str, torch.Tensor]:
    """First-order bounds on how far ``out, dq, dk, dv`` may move when every score is rounded in
    the case's dtype (``|ds_ij| <= D eps sum_d |q_id k_jd| scale``) and ``dO . V`` is too.

    At scores ~1e4 these dominate: an fp32 score carries ~1e-3 absolute error, which a row with a
    close runner-up turns into a weight error, and the gradients of near one-hot rows are
    differences ``dO . v_j - dO . out`` of nearly equal numbers. Elementwise, float64.
    """
    data = _make_data(case, 0)
    q, k, v, dout = data["q"], data["k"], data["v"], data["dout"]
    eps, d = torch.finfo(case["dtype"]).eps, case["d"]
    sc = d**-0.5
    p = torch.softmax(q @ k.transpose(-2, -1) * sc, dim=-1)  # [B, H, N, N]
    out = p @ v
    ds = d * eps * (q.abs() @ k.abs().transpose(-2, -1)) * sc  # score rounding
    dp = p * (ds + (p * ds).sum(-1, keepdim=True))  # |delta p_ij|
    g = dout @ v.transpose(-2, -1) - (dout * out).sum(-1, keepdim=True)  # ds_ij = p_ij g_ij
    g_round = 2 * d * eps * (dout.abs() @ v.abs().transpose(-2, -1)
                             + (dout.abs() * out.abs()).sum(-1, keepdim=True))
    dds = dp * g.abs() + p * g_round
    return {
        "out": torch.einsum("bhij,bhijd->bhid", dp, (v[:, :, None] - out[:, :, :, None]).abs()),
        "dq": dds @ k.abs() * sc,
        "dk": dds.transpose(-2, -1) @ q.abs() * sc,
        "dv": dp.transpose(-2, -1) @ dout.abs(),
    }


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_finite_and_match(world, backend):
    """Scores reach ~1e4 (q, k ~ 45 N(0, 1)): everything finite, and every element within 4x the
    rounding bound of its dtype (plus 16 eps of the tensor's scale) of the float64 reference."""
    for name in (f"large64-{backend}", f"large32-{backend}"):
        case, got = _assembled(world, name)
        data = _make_data(case, 0)
        scores = data["q"] @ data["k"].transpose(-2, -1) * case["d"] ** -0.5
        assert scores.abs().max().item() > 5e3  # the case really reaches ~1e4
        ref, bounds = _reference(case), _rounding_bounds(case)
        eps = torch.finfo(case["dtype"]).eps
        for t in ("out", *GRADS):
            assert torch.isfinite(got[t]).all(), (name, t)
            err = (got[t].double() - ref[t]).abs()
            tol = 4 * bounds[t] + 16 * eps * ref[t].abs().max()
            assert torch.all(err <= tol), (name, t, err.max().item(), (err / tol).max().item())


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("name", ["mask-manual", "mask-sdpa", "shared-mask-manual", "shared-mask-sdpa",
                                  "bias-bn-mask", "bias-bhn"])
def test_key_mask_and_key_bias(world, name):
    errs = _errors(world, name)
    assert _max_rel(errs) <= 1e-12, errs
    case, got = _assembled(world, name)
    if case["bias"] is not None:
        assert "dbias" in errs
    if case["mask"] == "mixed":  # batch element 1 has every key masked
        assert torch.all(got["out"][1] == 0)
        for t in (*GRADS, "dbias"):
            if got[t] is not None:
                assert torch.all(got[t][1] == 0), t
        # keys masked everywhere get exactly zero dk / dv
        masked = ~_make_data(case, 0)["mask"].any(0)
        assert torch.all(got["dk"][:, :, masked] == 0) and torch.all(got["dv"][:, :, masked] == 0)


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("name", ["dropout-manual", "dropout-sdpa", "dropout-mask-bias"])
def test_dropout_matches_keep_mask_reference(world, name):
    assert _max_rel(_errors(world, name)) <= 1e-12


@pytest.mark.parametrize("name", ["dropout-manual", "dropout-mask-bias"])
def test_dropout_is_p_invariant(name):
    one, three = _assembled(1, name)[1], _assembled(3, name)[1]
    for t in ("out", *GRADS):
        assert (one[t] - three[t]).abs().max().item() <= 1e-13, t
    plain = _reference({**_job(1)[0][name], "dropout_p": 0.0})
    assert (plain["out"] - one["out"]).abs().max().item() > 1e-2  # dropout did drop something


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_bitwise_deterministic_at_fixed_p(world):
    cases, results = _job(world)
    repeated = [name for name, c in cases.items() if c["repeat"]]
    assert repeated
    for r in results:
        for name in repeated:
            assert r[name]["bitwise"], name


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_exchange_counts_and_bytes(world):
    cases, results = _job(world)
    for name, case in cases.items():
        if case["layout"] != "world":
            continue
        for res in (r[name] for r in results):
            p = world
            fwd, bwd = res["fwd"], res["bwd"]
            assert fwd["calls"].get("ring.forward", 0) == p - 1, (name, fwd)
            assert bwd["calls"].get("ring.backward.kv", 0) == p - 1, (name, bwd)
            assert bwd["calls"].get("ring.backward.dkv", 0) == (p if p > 1 else 0), (name, bwd)
            plain = case["mask"] is None and case["bias"] is None and case["dropout_p"] == 0
            if not plain:
                continue
            sizes, r = res["sizes"], res["group_rank"]
            itemsize = torch.empty(0, dtype=case["dtype"]).element_size()
            acc_itemsize = 8 if case["dtype"] == torch.float64 else 4
            per_key = 2 * case["b"] * case["h"] * case["d"]
            sent_blocks = [sizes[(r - s) % p] for s in range(p - 1)]
            assert fwd["bytes_sent"].get("ring.forward", 0) == per_key * itemsize * sum(sent_blocks), name
            assert bwd["bytes_sent"].get("ring.backward.kv", 0) == per_key * itemsize * sum(sent_blocks)
            expect_dkv = per_key * acc_itemsize * sum(sizes) if p > 1 else 0
            assert bwd["bytes_sent"].get("ring.backward.dkv", 0) == expect_dkv, name


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_subgroups_of_world_4(layout):
    """Two groups of 2 run concurrently on different data; each matches its own reference."""
    outs = []
    for group_index in (0, 1):
        for suffix, tol in (("fp64", 1e-12), ("mask-dropout", 1e-12)):
            errs = _errors(4, f"{layout}-{suffix}", group_index)
            assert _max_rel(errs) <= tol, (suffix, group_index, errs)
        errs = _errors(4, f"{layout}-fp32-sdpa", group_index)
        assert max(e[0] for e in errs.values()) <= 1e-5, errs
        case, got = _assembled(4, f"{layout}-fp64", group_index)
        assert [s["sizes"] for s in got["shards"]] == [[15, 14]] * 2
        assert got["shards"][0]["fwd"]["calls"]["ring.forward"] == 1
        outs.append(got["out"])
    assert not torch.allclose(outs[0], outs[1])  # the groups really had different data


ERROR_EXPECT = {
    "q_3d": "q must have shape",
    "qkv_shapes": "same shape",
    "int_dtype": "floating",
    "mixed_dtypes": "share a dtype",
    "float8_dtype": "float64, float32, float16 or bfloat16, got torch.float8_e4m3fn",
    "dropout_p_1": "dropout_p",
    "dropout_p_neg": "dropout_p",
    "backend": "backend",
    "scale": "scale",
    "key_mask_dtype": "key_mask",
    "key_mask_shape": "key_mask",
    "key_bias_shape": "key_bias",
    # the message names the field that differs, and shows rank 1's odd value
    "disagree_heads": ("disagree on H", "H=1"),
    "disagree_head_dim": ("disagree on D", "D=4"),
    "disagree_dtype": ("disagree on dtype", "float64"),
    "disagree_dropout": ("disagree on dropout_p (", "dropout_p=0.2"),
    "disagree_dropout_slightly": ("disagree on dropout_p (", "dropout_p=0.1000002"),
    "disagree_mask": ("disagree on key_mask", "key_mask=1"),
}


def test_validation_errors_on_every_rank():
    _, results = _job(3)
    for rank, res in enumerate(results):
        found = res["errors"]
        for name, expect in ERROR_EXPECT.items():
            msg = found[name]
            assert msg is not None, f"rank {rank}: {name} raised nothing"
            assert msg.startswith("ValueError: "), f"rank {rank}: {name}: {msg}"
            for part in (expect,) if isinstance(expect, str) else expect:
                assert part in msg, f"rank {rank}: {name}: {msg}"
        assert found["dropout_minus_zero"] is None, found["dropout_minus_zero"]
        assert found["after"] == torch.Size([2, 2, 5, 8])
