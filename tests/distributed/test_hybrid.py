"""``hybrid_attention`` (Ulysses x ring), its group builder and ``strategy="auto"`` on 4 gloo ranks.

One ``run_ranks`` job at world 4 runs every case: the layouts U x R = 2 x 2, 1 x 4 and 4 x 1
(U the Ulysses degree, R the ring degree; Note [hybrid layout]), a ``DeviceMesh``, subgroup
parents, the automatic choice and the error paths. The parent assembles the shards and compares
them, forward and backward, with the float64 reference (helpers shared with ``test_ulysses.py``).
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from hpattn_dist import build_hybrid_groups, hybrid_attention, ring_attention
from hpattn_dist.comm import set_exchange_timeout
from hpattn_dist.strategies import sharded_attention
from hpattn_dist.strategies.auto import communication_volume
from tests.distributed.test_ulysses import (
    GRADS,
    assemble,
    case,
    max_rel_error,
    payload,
    reference,
    run_case,
)
from tests.harness import attempt, run_ranks

WORLD = 4
DEGREES = (2, 1, 4)  # U; R = 4 / U
SUBGROUPS = [[0, 2], [1, 3]]


def _cases() -> list[dict]:
    return [
        case("fp64-manual", seed=31),
        case("fp32-sdpa", dtype=torch.float32, backend="sdpa", seed=32),
        case("mask", mask=True, seed=33),
        case("bias-bn-mask", mask=True, bias="bn", seed=34),
        case("bias-bhn", bias="bhn", seed=35),
        case("dropout", dropout_p=0.3, mask=True, seed=36),
        case("zero-rank", sizes=[0, 5, 0, 8], seed=37),
    ]


AUTO_HEADS = {4: "ulysses", 2: "hybrid", 3: "ring"}  # expected choice at P = 4


# --------------------------------------------------------------------------------------------
# Rank side


def _hybrid_job(rank: int, world: int, cases: list[dict]) -> dict:
    out: dict[str, Any] = {}
    for degree in DEGREES:
        groups = build_hybrid_groups(world, degree)
        fn = functools.partial(hybrid_attention, ulysses_group=groups.ulysses_group,
                               ring_group=groups.ring_group)
        for c in cases:
            out[f"u{degree}/{c['name']}"] = run_case(fn, c, rank, world)
        if degree == 2:
            x = torch.randn(1, 3, 2, 4)  # H = 3, U = 2
            out["indivisible"] = attempt(lambda: fn(x, x, x))
    for c in cases:
        if c["dropout_p"] > 0:
            out[f"ring/{c['name']}"] = run_case(ring_attention, c, rank, world)

    # A DeviceMesh (Ulysses innermost: the layout of build_hybrid_groups(4, 2)).
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ring", "ulysses"))
    groups = build_hybrid_groups(mesh)
    out["mesh"] = run_case(functools.partial(hybrid_attention, ulysses_group=groups.ulysses_group,
                                             ring_group=groups.ring_group),
                           case("mesh", seed=40), rank, world)
    out["mesh_missing_dim"] = attempt(lambda: build_hybrid_groups(mesh, ulysses_dim="sp"))
    out["mesh_ranks"] = (dist.get_process_group_ranks(groups.ulysses_group),
                         dist.get_process_group_ranks(groups.ring_group))

    # Subgroup parents: each pair runs hybrid over itself, built on the fly (collective, cached).
    parents = [dist.new_group(m) for m in SUBGROUPS]
    index = next(i for i, m in enumerate(SUBGROUPS) if rank in m)
    for degree in (2, 1):
        c = case(f"sub-u{degree}", n=11, seed=50 + index)
        res = run_case(functools.partial(sharded_attention, "hybrid"), c,
                       SUBGROUPS[index].index(rank), 2, group=parents[index], ulysses_degree=degree)
        res["group_index"] = index
        out[c["name"]] = res

    # strategy="auto" over WORLD for several head counts.
    for heads in AUTO_HEADS:
        out[f"auto-h{heads}"] = run_case(functools.partial(sharded_attention, "auto"),
                                         case(f"auto-h{heads}", h=heads, seed=60 + heads), rank, world)

    # Errors, on every rank.
    x = torch.randn(1, 4, 2, 4)
    # auto: rank 1's head count makes it choose another strategy than its peers (Note [auto
    # agreement]), or rank 2's input is malformed; every rank raises, none hangs.
    set_exchange_timeout(20.0)
    for others, name in ((3, "ring"), (2, "hybrid")):
        heads = 4 if rank == 1 else others  # 4 -> ulysses
        xh = torch.randn(1, heads, 2, 4)
        out[f"auto_disagree_{name}"] = attempt(lambda: sharded_attention("auto", xh, xh, xh))
    bad = x[0] if rank == 2 else x
    out["auto_bad_input"] = attempt(lambda: sharded_attention("auto", bad, bad, bad))
    set_exchange_timeout(None)
    pairs = build_hybrid_groups(world, 2)
    out["not_a_grid"] = attempt(lambda: hybrid_attention(
        x, x, x, ulysses_group=pairs.ulysses_group, ring_group=pairs.ulysses_group))
    out["no_degree"] = attempt(lambda: sharded_attention("hybrid", x, x, x))
    out["bad_degree"] = attempt(lambda: build_hybrid_groups(world, 3))
    out["after"] = hybrid_attention(x, x, x, ulysses_group=pairs.ulysses_group,
                                    ring_group=pairs.ring_group).shape  # groups still usable
    return out


@functools.lru_cache(maxsize=None)
def _job() -> tuple[dict, list[dict]]:
    cases = _cases()
    return {c["name"]: c for c in cases}, run_ranks(_hybrid_job, WORLD, cases, timeout=150.0)


def _full(key: str) -> dict:
    return assemble([r[key] for r in _job()[1]])


# --------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("degree", DEGREES)
def test_forward_and_backward_match_float64_reference(degree):
    cases, _ = _job()
    for name, c in cases.items():
        errs = max_rel_error(_full(f"u{degree}/{name}"), reference(c))
        limit = 1e-12 if c["dtype"] == torch.float64 else 1e-5
        assert max(errs.values()) <= limit, (degree, name, errs)


@pytest.mark.parametrize("degree", DEGREES)
def test_dropout_equals_the_ring_over_the_whole_group(degree):
    hyb, ring = _full(f"u{degree}/dropout"), _full("ring/dropout")
    for t in ("out", *GRADS):
        assert (hyb[t] - ring[t]).abs().max().item() <= 1e-13, t


@pytest.mark.parametrize("degree", DEGREES)
def test_exchange_volume_matches_documented_formula(degree):
    cases, results = _job()
    c = cases["fp64-manual"]
    for rank, res in enumerate(results):
        r = res[f"u{degree}/fp64-manual"]
        model = communication_volume("hybrid", batch=c["b"], heads=c["h"], head_dim=c["d"],
                                     sizes=r["sizes"], rank=rank, itemsize=8, ulysses_degree=degree)
        assert (payload(r["fwd"]), payload(r["bwd"])) == (model.forward, model.backward), \
            (degree, rank, r["fwd"], r["bwd"])
        labels = {k for k in r["fwd"]["calls"] if not k.endswith(".meta")}
        expected = ({"hybrid.qkv", "hybrid.out"} if degree > 1 else set()) | \
            ({"ring.forward"} if degree < WORLD else set())
        assert labels == expected, (degree, labels)


def test_device_mesh_layout_and_result():
    results = _job()[1]
    for rank, r in enumerate(results):
        ulysses, ring = r["mesh_ranks"]
        assert ulysses == [2 * (rank // 2), 2 * (rank // 2) + 1] and ring == [rank % 2, rank % 2 + 2]
        msg = r["mesh_missing_dim"]
        assert msg.startswith("ValueError") and "'sp'" in msg, msg
    errs = max_rel_error(_full("mesh"), reference(case("mesh", seed=40)))
    assert max(errs.values()) <= 1e-12, errs


@pytest.mark.parametrize("degree", [2, 1])
def test_subgroup_parents(degree):
    results = _job()[1]
    for index, members in enumerate(SUBGROUPS):
        shards = [r[f"sub-u{degree}"] for r in results if r[f"sub-u{degree}"]["group_index"] == index]
        assert len(shards) == len(members)
        errs = max_rel_error(assemble(shards), reference(case(f"sub-u{degree}", n=11, seed=50 + index)))
        assert max(errs.values()) <= 1e-12, errs


@pytest.mark.parametrize("heads", sorted(AUTO_HEADS))
def test_auto_strategy_picks_by_heads_and_is_exact(heads):
    errs = max_rel_error(_full(f"auto-h{heads}"), reference(case(f"auto-h{heads}", h=heads, seed=60 + heads)))
    assert max(errs.values()) <= 1e-12, errs
    expected = {"ulysses": {"ulysses.qkv", "ulysses.out"}, "ring": {"ring.forward"},
                "hybrid": {"hybrid.qkv", "hybrid.out", "ring.forward"}}[AUTO_HEADS[heads]]
    for r in _job()[1]:
        calls = r[f"auto-h{heads}"]["fwd"]["calls"]
        labels = {k for k in calls if not k.endswith(".meta")}
        assert labels == expected, (heads, labels)
        # One agreement per call, whatever auto chose (Note [one agreement per call]).
        handshakes = sum(n for k, n in calls.items() if k.endswith(".meta"))
        assert handshakes == 1, (heads, calls)


def test_auto_ranks_choosing_differently_raise_on_every_rank():
    for rank, r in enumerate(_job()[1]):
        for name in ("ring", "hybrid"):
            msg = r[f"auto_disagree_{name}"]
            assert msg is not None and msg.startswith("ValueError") and "different signatures" in msg, \
                (rank, name, msg)
        msg = r["auto_bad_input"]
        assert msg is not None and msg.startswith("ValueError") and "auto_attention" in msg \
            and "1 of 4 ranks" in msg, (rank, msg)


def test_errors_raise_on_every_rank():
    for r in _job()[1]:
        assert r["indivisible"].startswith("ValueError") and "H=3" in r["indivisible"] \
            and "P=2" in r["indivisible"], r["indivisible"]
        assert r["not_a_grid"].startswith("ValueError") and "grid" in r["not_a_grid"]
        assert r["no_degree"].startswith("ValueError") and "ulysses_degree" in r["no_degree"]
        assert r["bad_degree"].startswith("ValueError") and "ulysses_degree=3" in r["bad_degree"]
        assert r["after"] == (1, 4, 2, 4)
