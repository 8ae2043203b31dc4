"""No device-to-host read on a steady-state call (issue 24 item 3; Note [agreement off the device]
in ``hpattn_dist/comm/agreement.py``).

Without a GPU, a device tensor is stood for by a tensor whose data cannot be read: a fake CUDA
tensor (``FakeTensorMode``), or a ``meta`` tensor, on which ``.item()``, ``int()``, ``bool()``,
``.tolist()`` and ``nonzero`` raise. :class:`DeviceReads` also records the data-dependent ops and
the host-to-device copies that reach the dispatcher. Checked:

* the dropout hash on fake CUDA copies no scalar to the device (it mixed the seed as a CUDA tensor
  on every block of every step);
* the ring's and the windows' executors, forward and backward with dropout, run on meta tensors
  (the windows read each unit's cell with ``int()`` on the device; the cell-block executor routes
  its edge cells by positions planned on the host);
* the door (``plan_attention``) with a key mask reads the mask on the first call only: the mask's
  layout is cached by tensor and version (it read it on every call), and read again after an
  in-place change (a device mask: a CPU mask is read on every call);
* the door of a layer's call on fake CUDA parameters gathered anew every call (FSDP2, ZeRO-3) reads
  no device data after the first call: the parameter fingerprint travels to the host with a
  non-blocking copy and is read at the next call (Note [fingerprint one call late] in
  ``replicas.py``; it read the sums with ``.tolist()`` on every call); the same parameters again
  are not summed again, also through the ``detach()`` of the registered ops' callers.

Legend: B batch, H heads, N pixels, D head dim.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from hpattn_dist import masks, replicas
from hpattn_dist.attention_spec import AttentionSpec
from hpattn_dist.comm.groups import GroupInfo
from hpattn_dist.kernels import DropoutSpec, capability, keep_mask, select_kernel
from hpattn_dist.local import execute
from hpattn_dist.local.plan import plan_local_attention
from hpattn_dist.replicas import LayerRef
from hpattn_dist.strategies.plan import plan_attention
from hpattn_dist.strategies.ring import ring_backward, ring_forward

aten = torch.ops.aten
B, H, N, D = 2, 2, 48, 4


class DeviceReads(TorchDispatchMode):
    """Records data-dependent ops (on any device, or only off the CPU) and host-to-device copies."""

    READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default,
             aten.equal.default, aten.item.default}

    def __init__(self, cpu_too: bool = False) -> None:
        super().__init__()
        self.cpu_too, self.reads, self.copies = cpu_too, [], []
        self.to_host: list[tuple[int, bool]] = []  # device-to-host copies: (id of the host tensor, non_blocking)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func in self.READS and any(self.cpu_too or t.device.type != "cpu" for t in tensors):
            self.reads.append(func)
        if func is aten.copy_.default and args[0].device.type == "cpu" and args[1].device.type != "cpu":
            self.to_host.append((id(args[0]), bool(args[2] if len(args) > 2 else kwargs.get("non_blocking"))))
        out = func(*args, **kwargs)
        if func is aten._to_copy.default and args[0].device.type == "cpu" and out.device.type != "cpu":
            self.copies.append(func)
        if func is aten._to_copy.default and args[0].device.type != "cpu" and out.device.type == "cpu":
            self.to_host.append((id(out), False))
        return out


def test_dropout_hash_copies_nothing_to_the_device():
    with FakeTensorMode():
        with DeviceReads() as rec:
            spec = DropoutSpec(0.3, 12345, q_offset=7, k_offset=3, h_offset=1)
            mask = keep_mask(spec, B, H, 16, 32, torch.device("cuda"))
    assert mask.device.type == "cuda" and mask.shape == (B, H, 16, 32)
    assert rec.reads == [] and rec.copies == [], (rec.reads, rec.copies)


def _ring_plan(q: torch.Tensor, dropout_p: float):
    from hpattn_dist.strategies.plan import AttentionPlan

    single = GroupInfo(None, 0, 1)
    return AttentionPlan(
        strategy="ring", ulysses_group=None, ring_group=single, ulysses_sizes=(q.shape[2],),
        key_ulysses_sizes=(q.shape[2],), kv_sizes=(q.shape[2],), q_offset=0, k_offset=0, head_offset=0,
        mask_travels=False, use_bias=False, kernel=select_kernel("manual", q), scale=0.5,
        dropout_p=dropout_p, seed=99)


def _meta_qkv():
    return [torch.empty(B, H, N, D, device="meta", dtype=torch.float32, requires_grad=True) for _ in range(3)]


def test_ring_executor_reads_no_device_data():
    q, k, v = _meta_qkv()
    with DeviceReads() as rec:
        plan = _ring_plan(q, 0.2)
        out, lse = ring_forward(plan, q, k, v, None, None)
        dq = ring_backward(plan, torch.empty_like(out), q, k, v, None, None, out, lse)[0]
    assert out.shape == q.shape and dq.shape == q.shape
    assert rec.reads == [] and rec.copies == [], (rec.reads, rec.copies)


@pytest.mark.parametrize("n,window_nside,split", [(N, 1, (N,)), (768, 4, (300, 468))])
def test_window_executor_reads_no_device_data(n, window_nside, split):
    """Windows as lists (nside 2, window 1) and as padded faces with their column fixes (nside 8,
    window 4), forward and backward with dropout; the second rank of a 2-way split reads cells in
    place, gathers edge cells and would exchange a halo (not run here: the group is one process)."""
    q, k, v = (torch.empty(B, H, split[-1], D, device="meta", dtype=torch.float32) for _ in range(3))
    rank = len(split) - 1
    plan = plan_local_attention(split, window_nside, "neighbourhood", rank).to(torch.device("meta"))
    plan = dataclasses.replace(plan, halo=dataclasses.replace(plan.halo, total_rows=0))
    kernel = select_kernel("manual", q, dropout=True)
    info = GroupInfo(None, 0, 1)
    with DeviceReads() as rec:
        out, lse, edge_kv, edge_bias = execute.forward(plan, q, k, v, None, info, kernel, 0.5, 0.2, 7)
        grads = execute.backward(plan, torch.empty_like(out), q, k, v, None, out, lse, edge_kv, edge_bias, info,
                                 kernel, 0.5, 0.2, 7, False)
    assert out.shape == q.shape and grads[1].shape == k.shape
    assert rec.reads == [] and rec.copies == [], (rec.reads, rec.copies)


def test_the_door_reads_a_repeated_mask_once(monkeypatch):
    # The CPU mask stands in for a device mask, the one kind cached (a CPU mask is read every call:
    # tests/distributed/test_mask_unseen_writes.py).
    monkeypatch.setattr(masks, "_cached_by_version", lambda key_mask: True)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[:, :5] = False  # keys masked everywhere: compacted
    mask[0, 9] = False  # a key masked in one batch element: a bias is left

    def door() -> tuple:
        with DeviceReads(cpu_too=True) as rec:
            plan, _ = plan_attention(AttentionSpec("ring"), q, k, v, key_mask=mask, what="test")
        return plan.kv_sizes, plan.use_bias, len(rec.reads)

    first, again = door(), door()
    assert first[:2] == again[:2] == ((N - 5,), True)
    assert first[2] > 0 and again[2] == 0, (first, again)  # read, then cached
    mask[0, 9] = True  # an in-place change is seen
    changed = door()
    assert changed[:2] == ((N - 5,), False) and changed[2] > 0, changed


def _landings(monkeypatch) -> list:
    """Stand in for host memory: a fake tensor has no data, so :func:`replicas._landed` (which reads
    a host buffer whose copy completed) records the buffer it is given and returns made-up sums."""
    landed: list = []

    def read(host: torch.Tensor) -> list:
        assert host.device.type == "cpu"
        landed.append(id(host))
        return [1.0, 2.0, 3.0, 4.0]

    monkeypatch.setattr(replicas, "_landed", read, raising=False)  # raising=False: absent before the fix
    return landed


@pytest.mark.parametrize("regathered", [True, False])
def test_a_layers_door_reads_no_device_data_when_its_parameters_move(monkeypatch, regathered):
    """Four calls of a layer's door (``plan_attention`` with a :class:`LayerRef`) on fake CUDA:
    ``regathered``: new parameter tensors every call (FSDP2 / ZeRO-3 gather them anew); else the
    same parameters, passed through ``detach()`` as the registered ops' callers do."""
    monkeypatch.setattr(capability, "cuda_capability", lambda device: (9, 0))
    landed = _landings(monkeypatch)
    calls = []
    with FakeTensorMode():
        q, k, v = (torch.empty(B, H, N, D, device="cuda") for _ in range(3))
        weights = (torch.empty(3 * H * D, H * D, device="cuda"), torch.empty(3 * H * D, device="cuda"))
        for _ in range(4):
            params = tuple(torch.empty_like(w) for w in weights) if regathered else weights
            layer = LayerRef(f"layer {regathered}", tuple(p.detach() for p in params), False)
            with DeviceReads() as rec:
                plan, _ = plan_attention(AttentionSpec("ring", "manual"), q, k, v, what="test", layer=layer)
            calls.append((rec.reads, rec.copies, rec.to_host, list(landed)))
            landed.clear()
    assert plan.kv_sizes == (N,)
    first_copies = calls[0][2]
    assert len(first_copies) == 1 and calls[0][3] == [first_copies[0][0]]  # the first call reads at once
    for i, (reads, copies, to_host, read_now) in enumerate(calls[1:], start=1):
        assert reads == [] and copies == [], (reads, copies)
        if regathered:  # each call sends its sums on their way and reads the previous call's
            assert len(to_host) == 1 and to_host[0][1], to_host  # non_blocking
            assert read_now == ([] if i == 1 else [calls[i - 1][2][0][0]]), (i, read_now, calls[i - 1][2])
        else:  # nothing new to sum, nothing to read
            assert to_host == [] and read_now == [], (to_host, read_now)


@pytest.mark.parametrize("strategy", ["ring", "ulysses"])
def test_a_new_mask_passed_as_a_key_bias_is_not_read(monkeypatch, strategy):
    """The no-read path for a mask that changes every call (Note [agreement off the device]): as a
    ``-inf`` key bias nothing decides shapes, so the door reads nothing ([B, H, N]: a fake CUDA
    tensor cannot be indexed with None)."""
    monkeypatch.setattr(capability, "cuda_capability", lambda device: (9, 0))
    with FakeTensorMode():
        q, k, v = (torch.empty(B, H, N, D, device="cuda") for _ in range(3))
        for _ in range(2):
            mask = torch.empty(B, N, device="cuda", dtype=torch.bool)
            bias = torch.zeros(B, H, N, device="cuda").masked_fill(mask.unsqueeze(1).logical_not(), float("-inf"))
            with DeviceReads() as rec:
                plan, _ = plan_attention(AttentionSpec(strategy, "manual"), q, k, v, what="test", key_bias=bias)
            assert plan.use_bias and rec.reads == [] and rec.copies == [], (rec.reads, rec.copies)
