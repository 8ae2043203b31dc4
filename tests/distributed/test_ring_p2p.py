"""The ring's point-to-point grouping (Note [p2p grouping] in ``hpattn_dist/comm/ring.py``).

NCCL needs an exchange's sends and receives in ONE ``batch_isend_irecv`` group; gloo takes them
separately. Neither NCCL nor a GPU is available here, so:

- the choice is a function of the backend name, tested directly, and :class:`RingExchanger` is
  driven with ``torch.distributed``'s backend query and ``batch_isend_irecv`` replaced by
  recorders (the ops it builds: directions, GLOBAL peers, tags, order; one handle for the group as
  NCCL returns it, and the error naming both peers when that handle fails);
- on real gloo ranks the grouped path is FORCED (``batch_isend_irecv`` works on gloo) and
  ``ring_attention`` forward and backward must equal the ungrouped path bitwise, match the
  float64 reference, and count the same bytes, with masks, bias, dropout (three buffers per
  exchange), empty shards and subgroups whose ranks differ from the global ones. The harness
  ends every rank with a barrier (gloo may abort at exit without one, grouped or not).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

import hpattn_dist.comm.ring as comm_ring
from hpattn_dist import count_communication, ring_attention
from hpattn_dist.comm import ExchangeError
from hpattn_dist.comm.groups import GroupInfo
from hpattn_dist.comm.ring import RingExchanger, grouped_p2p
from hpattn_dist.kernels import DropoutSpec
from tests.harness import run_ranks
from tests.reference import reference_attention

B, H, D = 2, 2, 4
SEED = 4242


# --------------------------------------------------------------------------------------------
# The choice and the ops, without NCCL


@pytest.mark.parametrize("backend, device, grouped", [
    ("nccl", "cuda", True),
    ("NCCL", "cuda", True),
    ("gloo", "cpu", False),
    ("cpu:gloo,cuda:nccl", "cuda", True),
    ("cpu:gloo,cuda:nccl", "cpu", False),
    ("ucc", "cuda", True),  # a backend we do not know gets the documented, grouped form
])
def test_grouped_p2p_is_a_function_of_the_backend(backend, device, grouped):
    assert grouped_p2p(backend, device) is grouped


class _Work:
    def __init__(self, fail: bool = False) -> None:
        self.fail, self.waited = fail, 0

    def wait(self, timeout=None):
        self.waited += 1
        if self.fail:
            raise RuntimeError("NCCL error: remote process exited or there was a network error")
        return True


class _Op:
    """Stands for ``dist.P2POp``: records what the exchanger asked for."""

    def __init__(self, op, tensor, peer, group=None, tag=0) -> None:
        self.op, self.tensor, self.peer, self.group, self.tag = op, tensor, peer, group, tag


class _FakeGroup:
    pass


def _fake_dist(monkeypatch, backend: str, works_per_group: str, fail: bool = False) -> dict:
    """Replace the pieces of ``torch.distributed`` the exchanger uses; return the call log."""
    log = {"groups": [], "single": []}
    group = _FakeGroup()

    def batch(ops):
        log["groups"].append(ops)
        if works_per_group == "one":  # NCCL: one coalesced handle for the whole group
            return [_Work(fail)]
        return [_Work(fail) for _ in ops]

    def single(kind):
        def post(tensor, peer, group=None, tag=0):
            log["single"].append((kind, tensor, peer, tag))
            return _Work(fail)
        return post

    monkeypatch.setattr(dist, "get_backend", lambda g=None: backend)
    monkeypatch.setattr(dist, "get_backend_config", lambda g=None: backend)  # what the ring reads
    monkeypatch.setattr(dist, "get_global_rank", lambda g, r: {0: 4, 1: 6, 2: 5}[r])
    monkeypatch.setattr(dist, "P2POp", _Op)
    monkeypatch.setattr(dist, "batch_isend_irecv", batch)
    monkeypatch.setattr(dist, "isend", single("isend"))
    monkeypatch.setattr(dist, "irecv", single("irecv"))
    log["info"] = GroupInfo(group, 1, 3)  # group rank 1 of 3; global ranks 4, 6, 5
    return log


def _buffers():
    send = [torch.ones(2, 3), None, torch.arange(3)]
    recv = [torch.empty(2, 3), None, torch.empty(3, dtype=torch.int64)]
    return send, recv


def test_nccl_backend_posts_one_group_with_global_peers(monkeypatch):
    log = _fake_dist(monkeypatch, "nccl", "one")
    ex = RingExchanger(log["info"], timeout_s=5.0)
    send, recv = _buffers()
    with count_communication() as stats:
        pending = ex.post(send, recv, "ring.forward")
    pending.wait()
    assert log["single"] == [] and len(log["groups"]) == 1
    ops = log["groups"][0]
    # order: per position, send then receive; None entries skipped; tags = positions
    assert [(o.op, o.peer, o.tag) for o in ops] == [
        (dist.isend, 5, 0), (dist.irecv, 4, 0), (dist.isend, 5, 2), (dist.irecv, 4, 2)]
    assert [o.tensor for o in ops][0] is send[0] and ops[3].tensor is recv[2]
    assert all(o.group is log["info"].group for o in ops)
    assert stats.as_dict()["bytes_sent"]["ring.forward"] == 6 * 4 + 3 * 8
    assert stats.as_dict()["calls"]["ring.forward"] == 1


def test_gloo_backend_posts_single_messages(monkeypatch):
    log = _fake_dist(monkeypatch, "gloo", "one")
    ex = RingExchanger(log["info"], timeout_s=5.0)
    send, recv = _buffers()
    with count_communication() as stats:
        ex.post(send, recv, "ring.forward").wait()
    assert log["groups"] == []
    assert [(kind, peer, tag) for kind, _, peer, tag in log["single"]] == [
        ("isend", 5, 0), ("irecv", 4, 0), ("isend", 5, 2), ("irecv", 4, 2)]
    assert stats.as_dict()["bytes_sent"]["ring.forward"] == 6 * 4 + 3 * 8


def test_nothing_to_exchange_posts_nothing(monkeypatch):
    log = _fake_dist(monkeypatch, "nccl", "one")
    RingExchanger(log["info"]).post([torch.empty(0)], [torch.empty(0)], "ring.forward").wait()
    assert log["groups"] == [] and log["single"] == []


def test_failed_group_handle_names_both_peers(monkeypatch):
    """NCCL's single handle for the group fails: the error names the send and the receive peer
    (global ranks differ from group ranks here) and carries the source as its peer."""
    log = _fake_dist(monkeypatch, "nccl", "one", fail=True)
    pending = RingExchanger(log["info"], timeout_s=5.0).post(*_buffers(), "ring.backward.dkv", step=2)
    with pytest.raises(ExchangeError) as caught:
        pending.wait()
    err = caught.value
    text = str(err)
    assert text.startswith("ring.backward.dkv step 2 on group rank 1 (global rank 6): send to group "
                           "rank 2 (global rank 5) / receive from group rank 0 (global rank 4) failed"), text
    assert "remote process exited" in text and "unusable" in text
    assert (err.peer_group_rank, err.peer_global_rank, err.timed_out) == (0, 4, False)


def test_failed_message_of_a_per_message_group_names_its_peer(monkeypatch):
    log = _fake_dist(monkeypatch, "nccl", "each", fail=True)
    pending = RingExchanger(log["info"], timeout_s=5.0).post(*_buffers(), "ring.forward")
    with pytest.raises(ExchangeError, match=r"ring.forward step 0 .*: send to group rank 2 \(global rank 5\) failed"):
        pending.wait()


def test_posting_failure_is_an_exchange_error(monkeypatch):
    log = _fake_dist(monkeypatch, "nccl", "one")

    def broken(ops):
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(dist, "batch_isend_irecv", broken)
    with pytest.raises(ExchangeError, match="send to group rank 2 .* / receive from group rank 0"):
        RingExchanger(log["info"]).post(*_buffers(), "ring.forward")


# --------------------------------------------------------------------------------------------
# The grouped path on real gloo ranks


def _full(seed: int, n: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    data = {name: torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for name in ("q", "k", "v", "dout")}
    mask = torch.rand(B, n, generator=g) > 0.3
    mask[:, 0] = True
    mask[1, : n // 2] = False  # some keys masked in every batch element (compacted away)
    mask[0, : n // 2] = False
    data["mask"] = mask
    data["bias"] = torch.randn(B, n, generator=g, dtype=torch.float64)
    return data


CASES = {  # name: (data seed, sizes per group rank at P = 3, masked + biased + dropout)
    "plain-uneven": (11, [5, 0, 4], False),
    "mask-bias-dropout": (12, [4, 3, 2], True),
}


def _sizes(name: str, p: int) -> list[int]:
    sizes = CASES[name][1]
    return sizes if p == 3 else [sum(sizes[:2]), sizes[2]] if p == 2 else [sum(sizes)]


def _run(data: dict, sizes: list[int], grank: int, group, full: bool) -> dict:
    start = sum(sizes[:grank])
    rows = slice(start, start + sizes[grank])
    q, k, v = (data[x][:, :, rows].clone().requires_grad_() for x in ("q", "k", "v"))
    kw = {}
    if full:
        kw = dict(key_mask=data["mask"][:, rows].clone(), dropout_p=0.25, dropout_seed=SEED,
                  key_bias=data["bias"][:, rows].clone().requires_grad_())
    with count_communication() as stats:
        out = ring_attention(q, k, v, group, backend="manual", **kw)
        out.backward(data["dout"][:, :, rows])
    res = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad, "stats": stats.as_dict()}
    if full:
        res["dbias"] = kw["key_bias"].grad
    return res


def _job(rank: int, world: int) -> dict:
    groups = {"world": (None, list(range(world)))}
    if world == 4:  # group ranks differ from global ranks: [1, 3] holds global 1 as group rank 0
        groups = {}
        for members in ([0, 2], [1, 3]):
            g = dist.new_group(members)
            if rank in members:
                groups["sub"] = (g, members)
    calls = {"batch": 0}
    original_batch = dist.batch_isend_irecv

    def counting_batch(ops):
        calls["batch"] += 1
        return original_batch(ops)

    dist.batch_isend_irecv = counting_batch
    out = {}
    try:
        for layout, (group, members) in groups.items():
            grank, p = members.index(rank), len(members)
            for name, (seed, _, full) in CASES.items():
                sizes = _sizes(name, p)
                data = _full(seed + 7 * members[0], sum(sizes))
                for grouped in (False, True):
                    before = calls["batch"]
                    comm_ring.grouped_p2p = lambda backend, device, g=grouped: g
                    res = _run(data, sizes, grank, group, full)
                    res["batches"] = calls["batch"] - before
                    out[(layout, name, grouped)] = res
                out[(layout, name, "sizes")] = sizes
    finally:
        comm_ring.grouped_p2p = grouped_p2p
        dist.batch_isend_irecv = original_batch
    return out


@functools.lru_cache(maxsize=None)
def _results(world: int) -> list[dict]:
    return run_ranks(_job, world, timeout=120.0)


def _reference(name: str, seed: int, sizes: list[int]) -> dict:
    full = CASES[name][2]
    data = _full(seed, sum(sizes))
    q, k, v = (data[x].clone().requires_grad_() for x in ("q", "k", "v"))
    bias = dropout = None
    leaf = None
    if full:
        leaf = data["bias"].clone().requires_grad_()
        bias = leaf.masked_fill(~data["mask"], float("-inf"))
        dropout = DropoutSpec(0.25, SEED)
    out = reference_attention(q, k, v, key_bias=bias, dropout=dropout)
    out.backward(data["dout"])
    ref = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    if full:
        ref["dbias"] = leaf.grad
    return ref


@pytest.mark.parametrize("world, layout", [(2, "world"), (3, "world"), (4, "sub")])
@pytest.mark.parametrize("name", sorted(CASES))
def test_forced_grouped_path_on_gloo_equals_ungrouped_and_reference(world, layout, name):
    results = _results(world)
    members_of = {r: ([0, 2] if r % 2 == 0 else [1, 3]) if layout == "sub" else list(range(world))
                  for r in range(world)}
    p = len(members_of[0])
    for rank, res in enumerate(results):
        grouped, plain = res[(layout, name, True)], res[(layout, name, False)]
        # the grouped path really ran: one batch per exchange (forward P-1, backward 2P-1)
        assert plain["batches"] == 0
        exchanges = sum(n for label, n in grouped["stats"]["calls"].items() if label.startswith("ring."))
        assert grouped["batches"] == exchanges > 0, grouped["stats"]["calls"]
        for t in plain:
            if t in ("stats", "batches"):
                continue
            assert torch.equal(grouped[t], plain[t]), (rank, t)
        assert grouped["stats"] == plain["stats"], rank
        assert grouped["stats"]["calls"]["ring.forward"] == p - 1
    if name == "plain-uneven" and world == 3:
        assert 0 in results[0][(layout, name, "sizes")]  # an empty shard sends and receives nothing
    # against the float64 reference, assembled over each group
    for members in {tuple(m) for m in members_of.values()}:
        sizes = results[members[0]][(layout, name, "sizes")]
        ref = _reference(name, CASES[name][0] + 7 * members[0], sizes)
        for t in ref:
            dim = -1 if t == "dbias" else 2
            got = torch.cat([results[r][(layout, name, True)][t] for r in members], dim=dim)
            err = ((got - ref[t]).abs().max() / ref[t].abs().max()).item()
            assert err <= 1e-12, (members, t, err)
