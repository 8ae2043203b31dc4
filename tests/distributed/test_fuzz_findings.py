"""Minimal reproducers of what the differential fuzzer found beyond issue 23's list.

- B = 0 through windowed attention (local, and cross-grid with ``window_nside``) on more than one
  rank: the halo exchange's byte rows are empty and could not be reinterpreted as floats
  (``RuntimeError: self.stride(0) must be divisible by 4 ...``), and the key bias gradient's
  ``view(n, b, -1, L)`` was ambiguous for B = 0 -- fixed; the empty result and its gradients
  match the float64 reference.
- ``fuzz-1`` (fixed): global attention where one rank's forward records no gradient
  (``torch.no_grad()``, or no input requiring grad) while its peers need gradients: the peers'
  backward waited for that rank until the exchange timeout. Every attention agreement now
  carries whether the call records gradients (Note [gradients on every rank or none] in
  ``hpattn_dist/comm/agreement.py``), and ranks that differ raise on every rank, naming both
  sides; the windowed paths, which refused with a table of every shared value, say the same.
- ``fuzz-2`` (fixed by issue 23's item 6 on branch trust, 3556cd2): ``strategy="auto"`` on ranks
  whose H differs (H = 2 and 3 on two ranks: Ulysses on one, ring on the other) raised "called
  with different signatures (...): rank 0: 11 shared values; ..." on every rank, naming neither H
  nor the strategy each rank chose; the message now names each rank's call and strategy.
- ``fuzz-3`` (fixed): Ulysses and hybrid through the autograd path (a ``key_bias`` given) with
  ranks that differ in which of q, k, v and the key bias require grad: each backward all-to-all
  ran only on the ranks whose inputs required grad, so a peer waited for the exchange timeout, or
  paired it with a collective of another size and gloo aborted the process (SIGABRT). Note
  [backward exchanges on every rank] in ``hpattn_dist/comm/head_exchange.py``.
- ``fuzz-4`` (fixed): the registered op's Ulysses / hybrid backward with a key mask and B = 0 took
  the empty ``[0, M]`` mask for no mask (``mask_h.numel()``): a shape error on one rank, a hang
  on its peers.
- ``fuzz-5`` (fixed; after issue 23's item 5): non-finite scores did not always give what Note
  [non-finite inputs] defined: a row whose scores are all NaN (a NaN key it alone attends to)
  got zeros from the CPU flash kernel (``auto``/``sdpa``), a row whose only score is -inf zeros
  from the manual kernel (the formula: 0/0, NaN), in float32 as in a window in float64. On
  infinite scores the formula depends on its evaluation, so the Note now makes every row that
  reads a NaN or an infinity NaN, and every kernel and oracle follows it from the inputs alone.
  One process suffices.
- ``fuzz-6`` (fixed): the replicated-parameter fingerprint cache (keyed by address and version)
  gave a new parameter at a freed parameter's address the freed one's sums.
- ``fuzz-7`` (fixed): hybrid through the autograd path (explicit groups, or a key bias) with k and
  v frozen on every rank raised in the ring's backward on every rank: their heads, exchanged with
  a q that requires grad, required grad although the plan said no rank needs dK/dV.

Legend: B batch, H heads, N pixels, D head dim, P ranks (2; 4 for a hybrid grid of U = R = 2).
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from tests.harness import RankFailure, run_ranks
from tests.local_reference import healpy_cross_window_mask, healpy_window_mask, reference_local_attention


def _empty_batch(rank: int, world: int) -> dict:
    from hpattn_dist import healpix_local_attention, ring_cross_attention

    out = {}
    g = torch.Generator().manual_seed(0)
    n, nk = 48, 12  # nside 2 queries; nside 1 keys for the cross call
    for name in ("local", "cross"):
        q = torch.randn(0, 2, n // world, 3, generator=g, dtype=torch.float64).requires_grad_()
        m = n // world if name == "local" else nk // world
        k, v = (torch.randn(0, 2, m, 3, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
        bias = torch.randn(0, 2, m, generator=g, dtype=torch.float64).requires_grad_()  # its gradient too
        if name == "local":
            o = healpix_local_attention(q, k, v, window_nside=1, mode="neighbourhood", key_bias=bias)
        else:
            o = ring_cross_attention(q, k, v, window_nside=1, mode="cell", key_bias=bias)
        o.sum().backward()
        out[name] = [t.detach() for t in (o, q.grad, k.grad, v.grad, bias.grad)]
    return out


def test_windowed_attention_takes_an_empty_batch_on_several_ranks():
    results = run_ranks(_empty_batch, 2, timeout=120)
    for name, allowed in (("local", healpy_window_mask(2, 1, "neighbourhood")),
                          ("cross", healpy_cross_window_mask(2, 1, 1, "cell"))):
        q = torch.zeros(0, 2, allowed.shape[0], 3, dtype=torch.float64, requires_grad=True)
        k, v = (torch.zeros(0, 2, allowed.shape[1], 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
        bias = torch.zeros(0, 2, allowed.shape[1], dtype=torch.float64, requires_grad=True)
        ref = reference_local_attention(q, k, v, allowed, key_bias=bias)
        ref.sum().backward()
        for i, want in enumerate((ref, q.grad, k.grad, v.grad, bias.grad)):
            got = torch.cat([r[name][i] for r in results], dim=-1 if i == 4 else 2)
            assert got.shape == want.shape, (name, i, got.shape, want.shape)


_WITHOUT_GRAD = {  # name: (entry point, how rank 1 records no gradient)
    "ring (op)": ("ring", "no_grad"),
    "ulysses (op)": ("ulysses", "frozen"),
    "hybrid U = 2 (op)": ("hybrid", "no_grad"),
    "auto (op)": ("auto", "frozen"),
    "cross ring (op)": ("cross", "no_grad"),
    "ring with a key bias (autograd)": ("ring bias", "frozen"),
    "ulysses with a key bias (autograd)": ("ulysses bias", "no_grad"),
    "hybrid over explicit groups (autograd)": ("hybrid groups", "frozen"),
    "windowed": ("local", "no_grad"),
    "windowed cross": ("cross window", "frozen"),
}


def _call_without_grad(entry: str, q, k, v, bias):
    from hpattn_dist import build_hybrid_groups, healpix_local_attention, hybrid_attention
    from hpattn_dist.strategies import sharded_attention

    if entry == "hybrid groups":
        made = build_hybrid_groups(None, 2)
        return hybrid_attention(q, k, v, ulysses_group=made.ulysses_group, ring_group=made.ring_group)
    if entry == "local":
        return healpix_local_attention(q, k, v, window_nside=1, mode="cell")
    if entry == "cross window":
        return sharded_attention("ring", q, k, v, cross=True, window_nside=1, mode="cell")
    strategy = entry.split()[0]
    return sharded_attention("ring" if strategy == "cross" else strategy, q, k, v, cross=strategy == "cross",
                             key_bias=bias if entry.endswith("bias") else None,
                             ulysses_degree=2 if strategy == "hybrid" else None)


def _rank_without_grad(rank: int, world: int, outdir: str) -> None:
    """Rank 1's forward records no gradient (``torch.no_grad()``, or no input requiring grad); rank
    0 needs gradients. Both must raise at the forward (the call cannot be exact: rank 1 will run
    no backward). Each rank writes what it saw to a file, since before the fix the group was
    unusable after the first case (the harness's final barrier failed)."""
    from hpattn_dist.comm import set_exchange_timeout

    set_exchange_timeout(2.0)
    seen = {}
    for name, (entry, how) in _WITHOUT_GRAD.items():
        g = torch.Generator().manual_seed(rank)
        q, k, v = (torch.randn(1, 2, 24, 4, generator=g, dtype=torch.float64) for _ in range(3))
        bias = torch.zeros(1, 24, dtype=torch.float64)
        if rank == 0 or how == "no_grad":
            for t in (q, k, v, bias):
                t.requires_grad_()
        try:
            if rank == 1 and how == "no_grad":
                with torch.no_grad():
                    _call_without_grad(entry, q, k, v, bias)
            else:
                out = _call_without_grad(entry, q, k, v, bias)
                if out.requires_grad:
                    out.sum().backward()
            seen[name] = "returned"
        except Exception as err:  # noqa: BLE001 - the test asserts which
            seen[name] = f"{type(err).__name__}: {err}"
        with open(os.path.join(outdir, f"rank{rank}"), "w") as f:
            f.write(repr(seen))


def test_a_rank_without_gradients_is_refused_on_every_rank(tmp_path):
    """Global attention (ring, Ulysses, hybrid, auto, cross; the registered op and the autograd
    path) and windowed attention, 2 ranks (hybrid: U = 2, R = 1). Before the fix the global paths
    let rank 1 return while rank 0's backward waited for it until the exchange timeout; the
    windowed paths refused with a table of every shared value."""
    try:
        run_ranks(_rank_without_grad, 2, str(tmp_path), timeout=120)
    except RankFailure:
        pass  # judged from what each rank saw
    seen = [eval((tmp_path / f"rank{r}").read_text()) if (tmp_path / f"rank{r}").exists() else {}
            for r in range(2)]
    for name in _WITHOUT_GRAD:
        for rank in range(2):
            text = seen[rank].get(name, "no report")
            assert re.match(r"ValueError: .*rank 0 records gradients for this call and rank 1 does not", text), \
                (name, rank, text)


def _auto_with_other_heads(rank: int, world: int) -> str:
    from hpattn_dist.strategies import auto_attention

    q = torch.randn(1, 2 + rank, 6, 4, dtype=torch.float64)
    try:
        auto_attention(q, q, q)
    except ValueError as err:
        return str(err)
    return "returned"


def test_auto_with_different_heads_names_the_strategies_chosen():
    for message in run_ranks(_auto_with_other_heads, 2, timeout=60):
        assert re.search(r"rank 0: auto_attention \(ulysses\).*rank 1: auto_attention \(ring\)", message), message


# --------------------------------------------------------------------------------------------
# fuzz-3: head-parallel backward exchanges that depend on each rank's requires_grad (fixed)

_MIXED = {  # name: (strategy, cross, per-rank tensors that require grad; "b" is the key bias)
    "ulysses, key bias learned on rank 0 only": ("ulysses", False, ("qkvb", "qkv")),
    "ulysses cross, v on rank 0, q on rank 1": ("ulysses", True, ("vb", "qb")),
    "hybrid (U = 2), key bias learned on rank 1 only": ("hybrid", False, ("qkv", "qkvb")),
}


def _mixed_data(cross: bool) -> dict:
    g = torch.Generator().manual_seed(3)
    n, nk = 5, (7 if cross else 5)
    q = torch.randn(1, 4, n, 2, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 4, nk, 2, generator=g, dtype=torch.float64) for _ in range(2))
    return {"q": q, "k": k, "v": v, "b": torch.randn(1, 4, nk, generator=g, dtype=torch.float64),
            "w": torch.randn(1, 4, n, 2, generator=g, dtype=torch.float64)}


def _bounds(n: int, rank: int) -> slice:
    return slice(0, 3) if rank == 0 else slice(3, n)  # uneven: 3 and n - 3


def _mixed_grads(rank: int, world: int) -> dict:
    from hpattn_dist.comm import set_exchange_timeout
    from hpattn_dist.strategies import sharded_attention

    set_exchange_timeout(5.0)
    out = {}
    for name, (strategy, cross, grads) in _MIXED.items():
        data = _mixed_data(cross)
        qs, ks = _bounds(data["q"].shape[2], rank), _bounds(data["k"].shape[2], rank)
        t = {r: data[r][..., ks] if r == "b" else data[r][:, :, qs if r == "q" else ks] for r in "qkvb"}
        t = {r: x.clone().requires_grad_(r in grads[rank]) for r, x in t.items()}
        o = sharded_attention(strategy, t["q"], t["k"], t["v"], key_bias=t["b"], cross=cross, backend="manual",
                              ulysses_degree=2 if strategy == "hybrid" else None)
        (o * data["w"][:, :, qs]).sum().backward()
        out[name] = {r: x.grad for r, x in t.items()}
    return out


def test_head_parallel_backward_with_requires_grad_differing_between_ranks():
    """Each rank's gradients equal the float64 reference's, for the tensors it asked them for
    (before the fix: a peer waited for the exchange timeout, or gloo aborted the process)."""
    from tests.reference import reference_attention

    results = run_ranks(_mixed_grads, 2, timeout=120)
    for name, (_, cross, grads) in _MIXED.items():
        data = _mixed_data(cross)
        t = {r: data[r].clone().requires_grad_() for r in "qkvb"}
        (reference_attention(t["q"], t["k"], t["v"], key_bias=t["b"]) * data["w"]).sum().backward()
        for rank, res in enumerate(results):
            qs, ks = _bounds(data["q"].shape[2], rank), _bounds(data["k"].shape[2], rank)
            for r in "qkvb":
                want = t[r].grad[..., ks] if r == "b" else t[r].grad[:, :, qs if r == "q" else ks]
                got = res[name][r]
                assert (got is None) == (r not in grads[rank]), (name, rank, r)
                if got is not None:
                    assert torch.allclose(got, want, rtol=0, atol=1e-12), (name, rank, r)


# --------------------------------------------------------------------------------------------
# fuzz-4: the registered op's head-parallel backward with a key mask and B = 0 (fixed)


def _empty_batch_masked(rank: int, world: int) -> tuple:
    from hpattn_dist.comm import set_exchange_timeout
    from hpattn_dist.strategies import sharded_attention

    set_exchange_timeout(5.0)
    n = 1 if rank == 0 else 0  # shards 1, 0, 0, 0: Ulysses groups of M = 1 and M = 0 pixels
    q = torch.randn(0, 2, n, 3, dtype=torch.float64, requires_grad=True)
    o = sharded_attention("hybrid", q, q, q, key_mask=torch.ones(0, n, dtype=torch.bool), ulysses_degree=2)
    o.sum().backward()
    return tuple(o.shape), tuple(q.grad.shape)


def test_head_parallel_backward_with_a_key_mask_and_an_empty_batch():
    """Hybrid (U = 2, R = 2). Before the fix the op's backward took the empty [0, M] mask for no
    mask: dq came back with M = 0 pixels on rank 1 (a shape error there; its peers waited)."""
    for rank, res in enumerate(run_ranks(_empty_batch_masked, 4, timeout=120)):
        n = 1 if rank == 0 else 0
        assert res == ((0, 2, n, 3), (0, 2, n, 3)), (rank, res)


# --------------------------------------------------------------------------------------------
# fuzz-5: rows of non-finite scores (fixed: Note [non-finite inputs] in hpattn_dist/masks.py)


def test_a_minus_infinite_score_gives_nan():
    """Was: zeros from the manual kernel in float32 (its row's only score is -inf)."""
    from hpattn_dist import ring_attention
    from tests.reference import reference_attention

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, 1, 3, generator=g, dtype=torch.float64) for _ in range(3))
    q[0, 0, 0, 1] = float("-inf")  # q.k = -inf: k[1] > 0 for this seed
    q, k, v = q.float(), k.float(), v.float()
    got, want = ring_attention(q, k, v, backend="manual"), reference_attention(q, k, v)
    assert bool(want.isnan().all())
    assert torch.equal(got.isnan(), want.isnan()), (got, want)


def test_a_nan_score_row_gives_nan():
    """Was: zeros from the CPU flash kernel (every score of the row is NaN)."""
    from hpattn_dist import ring_cross_attention
    from tests.reference import reference_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 3, 2, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 1, 1, 2, generator=g, dtype=torch.float64) for _ in range(2))
    k[0, 0, 0, 1] = float("nan")  # the one key: every query's only score is NaN
    got, want = ring_cross_attention(q, k, v, backend="auto"), reference_attention(q, k, v)
    assert bool(want.isnan().all())
    assert torch.equal(got.isnan(), want.isnan()), (got, want)


def test_a_plus_infinite_key_in_a_window_gives_nan():
    """Was: zeros from the manual kernel in float64 for the row whose window is that key alone
    (``window_nside = nside``, cell mode: its only score is -inf)."""
    from hpattn_dist import healpix_local_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 48, 4, generator=g, dtype=torch.float64) for _ in range(3))
    k[0, 1, 26, 1] = float("inf")
    got = healpix_local_attention(q, k, v, window_nside=2, mode="cell", backend="manual")
    want = reference_local_attention(q, k, v, healpy_window_mask(2, 2, "cell"))
    assert bool(want.isnan().any())
    assert torch.equal(got.isnan(), want.isnan()), (int(got.isnan().sum()), int(want.isnan().sum()))


# --------------------------------------------------------------------------------------------
# fuzz-6: a parameter fingerprint cached for a freed parameter (fixed)


def test_a_parameter_at_a_freed_parameters_address_is_fingerprinted_anew():
    """Found as a spurious 'hold different parameters' on one rank of a 3200-case run: the cache
    keyed by (address, version) returned the sums of a freed parameter to the new parameter the
    allocator put at its address with the same version count (a rank whose weights differ could
    as well have passed the check on stale sums)."""
    import gc

    import torch.nn as nn

    from hpattn_dist.replicas import ParameterFingerprint, facts_of

    for trial in range(50):
        old = nn.Parameter(torch.empty(64, 64, dtype=torch.float64))
        with torch.no_grad():
            old.copy_(torch.full((64, 64), 1.0 + trial, dtype=torch.float64))
        facts_of("layer", (old,), False)
        address, version = old.data_ptr(), old._version
        del old
        gc.collect()
        new = nn.Parameter(torch.empty(64, 64, dtype=torch.float64))
        with torch.no_grad():
            new.copy_(torch.full((64, 64), -5.0, dtype=torch.float64))
        if (new.data_ptr(), new._version) == (address, version):
            own = ParameterFingerprint()([("0", new)])
            assert facts_of("layer", (new,), False).sums == own[1]
            return
    pytest.skip("the allocator never put a new parameter at a freed one's address")


# --------------------------------------------------------------------------------------------
# fuzz-7: hybrid through the autograd path with frozen keys and values (fixed)


def _frozen_kv(rank: int, world: int, groups: bool) -> dict:
    from hpattn_dist import build_hybrid_groups, hybrid_attention
    from hpattn_dist.strategies import sharded_attention

    g = torch.Generator().manual_seed(5)
    q, k, v, w = (torch.randn(1, 2, 8, 3, generator=g, dtype=torch.float64) for _ in range(4))
    rows = slice(2 * rank, 2 * rank + 2)
    q_r = q[:, :, rows].clone().requires_grad_()  # k and v frozen on every rank
    if groups:
        made = build_hybrid_groups(None, 2)
        o = hybrid_attention(q_r, k[:, :, rows], v[:, :, rows], ulysses_group=made.ulysses_group,
                             ring_group=made.ring_group, backend="manual")
    else:  # a key bias takes the autograd path too
        o = sharded_attention("hybrid", q_r, k[:, :, rows], v[:, :, rows], ulysses_degree=2, backend="manual",
                              key_bias=torch.zeros(1, 2, 2, dtype=torch.float64))
    (o * w[:, :, rows]).sum().backward()
    return {"out": o.detach(), "dq": q_r.grad}


def _frozen_kv_job(rank: int, world: int) -> list:
    return [_frozen_kv(rank, world, groups) for groups in (True, False)]


def test_hybrid_with_frozen_keys_and_values_through_the_autograd_path():
    """Before the fix every rank raised in the ring's backward ('the plan said no rank needs the
    K/V/bias gradient, but this rank's inputs require it'): the heads of k and v, exchanged
    together with a q that requires grad, required grad themselves."""
    from tests.reference import reference_attention

    g = torch.Generator().manual_seed(5)
    q, k, v, w = (torch.randn(1, 2, 8, 3, generator=g, dtype=torch.float64) for _ in range(4))
    q.requires_grad_()
    out = reference_attention(q, k, v)
    (out * w).sum().backward()
    for rank, per_call in enumerate(run_ranks(_frozen_kv_job, 4, timeout=120)):
        rows = slice(2 * rank, 2 * rank + 2)
        for res in per_call:
            assert torch.allclose(res["out"], out[:, :, rows].detach(), rtol=0, atol=1e-12), rank
            assert torch.allclose(res["dq"], q.grad[:, :, rows], rtol=0, atol=1e-12), rank
