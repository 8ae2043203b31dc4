"""Which wait an exchange uses, per backend and tensor device (Note [exchange timeout]), and
what the ring hands gloo (Note [gloo with device tensors]).

gloo (a host wait) keeps the exchange timeout: ``Work.wait(timeout)``, answered at once when a
peer's connection breaks (the fast, named failure of ``tests/distributed/test_reliability.py``).
On NCCL the same call is a CPU busy-poll that stalls the host and aborts the communicator on
expiry, so there every wait is the plain ``Work.wait()`` and the process group's timeout and
watchdog bound it. Tested without a GPU: the group is a stand-in whose backend text is what
``dist.get_backend`` reports for NCCL groups, the work handles record how they were waited on,
and the ring's tensors are fake CUDA tensors.
"""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

from hpattn_dist.comm.groups import GroupInfo, parse_backend_config
from hpattn_dist.comm.ring import RingExchanger
from hpattn_dist.comm.waits import exchange_timeout_for, run_collective, set_exchange_timeout


class _Group(GroupInfo):
    """A two-rank group whose backend config is ``text`` (no process group behind it)."""

    text = "nccl"

    @property
    def backends(self) -> dict[str, str]:
        return parse_backend_config(self.text)

    def global_rank(self, group_rank: int) -> int:
        return group_rank


def _group(text: str) -> GroupInfo:
    info = _Group(None, 0, 2)
    object.__setattr__(info, "text", text)
    return info


class _Work:
    """A work handle that records the keyword arguments of each ``wait``."""

    def __init__(self) -> None:
        self.waits: list[dict] = []

    def wait(self, **kwargs) -> bool:
        self.waits.append(kwargs)
        return True


@pytest.fixture
def exchange_timeout():
    previous = set_exchange_timeout(5.0)
    yield 5.0
    set_exchange_timeout(previous)


@pytest.mark.parametrize("text, device, host", [
    ("gloo", "cpu", True), ("nccl", "cuda", False), ("cpu:gloo,cuda:nccl", "cuda", False),
    ("cpu:gloo,cuda:nccl", "cpu", True),
])
def test_collective_waits_on_the_host_only_on_gloo(exchange_timeout, text, device, host):
    """run_collective: gloo waits with the exchange timeout, NCCL with the plain wait."""
    info = _group(text)
    assert exchange_timeout_for(info, torch.device(device)) == (exchange_timeout if host else None)
    work = _Work()
    run_collective(info, "all_to_all", "an all_to_all", lambda: work, torch.device(device))
    expected = {"timeout": datetime.timedelta(seconds=exchange_timeout)} if host else {}
    assert work.waits == [expected]


@pytest.mark.parametrize("text, host", [("nccl", False), ("cpu:gloo,cuda:nccl", False)])
def test_ring_exchange_of_cuda_tensors_waits_on_the_device_on_nccl(exchange_timeout, monkeypatch, text, host):
    """A ring step on (fake) CUDA tensors: one grouped post, and a plain wait on NCCL."""
    work = _Work()
    posted = []
    monkeypatch.setattr(dist, "P2POp", lambda *a, **k: a)  # the real one wants a process group
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: text)
    monkeypatch.setattr(dist, "batch_isend_irecv", lambda ops: posted.append(ops) or [work])
    monkeypatch.setattr(dist, "isend", lambda *a, **k: posted.append(a) or work)
    monkeypatch.setattr(dist, "irecv", lambda *a, **k: posted.append(a) or work)
    with FakeTensorMode(allow_non_fake_inputs=True):
        send, recv = torch.empty(8, device="cuda"), torch.empty(8, device="cuda")
        exchanger = RingExchanger(_group(text))
        exchanger.post([send], [recv], "ring.forward").wait()
    assert posted and work.waits, (posted, work.waits)
    for w in work.waits:  # gloo: the time left of the exchange timeout
        assert (0 < w["timeout"].total_seconds() <= exchange_timeout) if host else w == {}, work.waits


@pytest.mark.parametrize("text, staged", [("gloo", True), ("cpu:gloo,cuda:gloo", True), ("cpu:gloo,cuda:nccl", False)])
def test_ring_stages_cuda_tensors_through_the_host_on_gloo(monkeypatch, text, staged):
    """gloo's send / recv read a CUDA tensor's device address as host memory: the ring posts host
    copies there (and copies received data back at the wait); NCCL gets the device tensors."""
    work = _Work()
    posted: list = []
    monkeypatch.setattr(dist, "P2POp", lambda op, t, *a, **k: (op, t))
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: text)
    monkeypatch.setattr(dist, "batch_isend_irecv", lambda ops: posted.extend(t for _, t in ops) or [work])
    monkeypatch.setattr(dist, "isend", lambda t, *a, **k: posted.append(t) or work)
    monkeypatch.setattr(dist, "irecv", lambda t, *a, **k: posted.append(t) or work)
    with FakeTensorMode(allow_non_fake_inputs=True):
        send, recv = torch.empty(8, device="cuda"), torch.empty(8, device="cuda")
        pending = RingExchanger(_group(text)).post([send], [recv], "ring.forward")
    assert len(posted) == 2 and {t.device.type for t in posted} == ({"cpu"} if staged else {"cuda"}), posted
    # What the wait copies back (a host-to-CUDA copy needs a CUDA build, so it is not run here).
    assert [(host.device.type, dst is recv) for host, dst in pending._unstage] == ([("cpu", True)] if staged else [])
    assert not staged or posted[1] is pending._unstage[0][0]


def test_ring_refuses_cuda_tensors_on_gloo_without_a_host_backend(monkeypatch):
    """"cuda:gloo" serves CUDA tensors with gloo and registers nothing for the CPU: the ring can
    neither hand gloo the device tensors nor stage them through the host, so it says so."""
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "cuda:gloo")
    with FakeTensorMode(allow_non_fake_inputs=True):
        send, recv = torch.empty(8, device="cuda"), torch.empty(8, device="cuda")
        with pytest.raises(ValueError, match="no CPU backend to stage them through"):
            RingExchanger(_group("cuda:gloo")).post([send], [recv], "ring.forward")
