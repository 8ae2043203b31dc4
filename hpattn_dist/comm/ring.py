"""The ring exchanger: send to the next rank, receive from the previous one, asynchronously.

Note [double buffering]
    A strategy posts the transfer of the block it will need next (:meth:`RingExchanger.post`)
    BEFORE computing on the block it holds, and waits only after that compute. Transfer time thus
    hides behind compute whenever compute is the longer of the two. Peers are translated to
    GLOBAL ranks, as ``torch.distributed`` requires of ``isend`` / ``irecv`` / ``P2POp``.

Note [p2p grouping]
    One exchange is a set of sends to the next rank and receives from the previous one that must
    progress together: under NCCL a send may block until its matching receive is posted, at P = 2
    both directions share one stream, and at P >= 3 each rank's first send to a new peer creates
    a communicator lazily, so ungrouped "send then receive" on every rank can wait in a cycle
    (a hang once blocks outgrow NCCL's buffers). NCCL's rule is to put such operations in one
    group: :func:`grouped_p2p` says whether a backend gets them as ONE
    ``dist.batch_isend_irecv`` (``ncclGroupStart/End``, one work handle for the whole exchange),
    or as separate ``isend`` / ``irecv`` calls. Gloo takes the separate calls: its sends never
    wait for the receiver, and its ``batch_isend_irecv`` is nothing but the same calls in a loop
    (gloo does not coalesce). Every other backend (NCCL, and any backend we do not know) is
    grouped, the form every backend documents. The messages, their order and the bytes are the
    same either way; only the number of work handles differs.

    End a script with :func:`hpattn_dist.shutdown.shutdown_process_group` (a barrier, then every
    group destroyed and its threads joined): a gloo group whose worker threads are still alive
    when the interpreter finalizes can abort the rank at exit ("terminate called without an
    active exception"; Note [clean exit] in ``hpattn_dist/shutdown.py``).

Buffers with zero elements are neither sent nor received: both ends know every rank's shard
length, so they skip the same messages.

Failures: :meth:`PendingExchange.wait` is bounded by the exchange timeout (Note [exchange timeout]
in ``comm/waits.py``, :func:`set_exchange_timeout`) and turns a backend error or a timeout into
an :class:`ExchangeError` naming the label, the step, the direction and the peer (group rank and
global rank), e.g. ``ring.forward step 1: receive from rank 1 failed after 0.02 s: ...``. A
grouped exchange whose backend returns one handle for all its messages (NCCL) names both peers
(``send to rank 2 / receive from rank 0 ...``); its ``peer_*`` attributes are the source's.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from hpattn_dist.comm.counters import record
from hpattn_dist.comm.groups import GroupInfo, nbytes, parse_backend_config
from hpattn_dist.comm.waits import (ExchangeError, cause_text, exchange_timeout_for, set_exchange_timeout,
                                   wait_work)

__all__ = ["ExchangeError", "PendingExchange", "RingExchanger", "grouped_p2p", "set_exchange_timeout"]


def grouped_p2p(backend: str, device_type: str) -> bool:
    """Whether an exchange on ``backend`` posts its sends and receives as one group.

    Args:
        backend: the group's backend config (``dist.get_backend_config(group)``): ``"gloo"``,
            ``"nccl"``, or a per-device list such as ``"cpu:gloo,cuda:nccl"`` (a bare
            ``init_process_group()`` on a CPU build: ``"cpu:gloo"``, where ``dist.get_backend``
            says "undefined"; Note [init styles] in ``groups.py``).
        device_type: the device type of the tensors exchanged (``"cpu"``, ``"cuda"``).

    Returns:
        False for gloo, True for every other backend (Note [p2p grouping]).
    """
    backends = parse_backend_config(backend)
    return backends.get(device_type, backends.get("*")) != "gloo"


class PendingExchange:
    """Handles of one posted exchange; :meth:`wait` blocks until all of them completed.

    Args:
        works: ``(work, direction, peer_group_rank, peer_global_rank)`` per posted message,
            direction ``"send to"`` or ``"receive from"``.
        label, step: what the exchange is, for error messages.
        info: the group (to name this rank in messages).
        timeout_s: bound on :meth:`wait` (None: the process group's own timeout; always None on
            a backend that waits on the device, Note [exchange timeout]).
    """

    def __init__(self, works: list, label: str = "exchange", step: Optional[int] = None,
                 info: Optional[GroupInfo] = None, timeout_s: Optional[float] = None) -> None:
        self._works = works
        self.label, self.step, self.info, self.timeout_s = label, step, info, timeout_s
        self._unstage: list[tuple[Tensor, Tensor]] = []

    def stage_on_host(self, messages: list) -> list:
        """``messages`` (``(op, tensor, ...)``) with host copies of their device tensors: sends
        copied now, receives copied back by :meth:`wait`.

        Note [gloo with device tensors]
            gloo's point-to-point ``send`` / ``recv`` hand the tensor's data pointer to its TCP
            transport as host memory, whatever the device (its collectives stage CUDA tensors
            themselves; its P2P does not), so a CUDA tensor in a gloo ring would be read and
            written at a device address by the CPU. Where the group's communication device for
            the tensors is the host (``comm_device_for``, Note [init styles] in ``groups.py``: a
            group that serves CUDA tensors with gloo, ``"gloo"`` or ``"cuda:gloo"``) the ring
            therefore exchanges host copies: one device-to-host copy per message sent, one
            host-to-device copy per message received.
        """
        staged = []
        for op, tensor, *rest in messages:
            host = tensor.to("cpu") if op is dist.isend else torch.empty_like(tensor, device="cpu")
            if op is not dist.isend:
                self._unstage.append((host, tensor))
            staged.append((op, host, *rest))
        return staged

    def start(self, op: Any, tensor: Tensor, tag: int, direction: str, peer_group: int,
              peer_global: int) -> None:
        """Post one message (``op`` is ``dist.isend`` or ``dist.irecv``) as part of this exchange.

        Raises:
            ExchangeError: posting failed, e.g. gloo found the peer's connection already closed.
        """
        try:
            work = op(tensor, peer_global, group=None if self.info is None else self.info.group, tag=tag)
        except RuntimeError as err:
            raise self._error(err, direction, peer_group, peer_global, 0.0) from err
        self._works.append((work, direction, peer_group, peer_global))

    def start_group(self, ops: list, meta: list[tuple[str, int, int]]) -> None:
        """Post ``ops`` (``dist.P2POp``, peers global) as ONE ``batch_isend_irecv`` group.

        ``meta[i]`` is ``(direction, peer_group, peer_global)`` of ``ops[i]``. A backend that
        returns one handle per message keeps per-message errors; one that returns a single handle
        for the group (NCCL) gets an entry naming every peer of the group.

        Raises:
            ExchangeError: posting failed.
        """
        try:
            works = dist.batch_isend_irecv(ops)
        except RuntimeError as err:
            raise self._error(err, *_group_meta(meta), 0.0) from err
        if len(works) == len(meta):
            self._works.extend((work, *m) for work, m in zip(works, meta))
        else:
            self._works.extend((work, *_group_meta(meta)) for work in works)

    def wait(self) -> None:
        """Block until every message of the exchange completed.

        Raises:
            ExchangeError: a message failed (the peer died: connection reset) or did not complete
                within ``timeout_s``; names the peer, the label and the step.
        """
        start = time.monotonic()
        for work, direction, peer_group, peer_global in self._works:
            remaining = None
            if self.timeout_s is not None:
                remaining = max(self.timeout_s - (time.monotonic() - start), 1e-3)
            try:
                wait_work(work, remaining)
            except (RuntimeError, TimeoutError) as err:
                self._works = []
                raise self._error(err, direction, peer_group, peer_global,
                                  time.monotonic() - start) from err
        self._works = []
        for host, tensor in self._unstage:
            tensor.copy_(host)
        self._unstage = []

    def _error(self, err: BaseException, direction: str, peer_group: int, peer_global: int,
               elapsed: float) -> ExchangeError:
        timed_out = isinstance(err, TimeoutError)
        where = self.label if self.step is None else f"{self.label} step {self.step}"
        peer = _peer_text(peer_group, peer_global)
        me = "" if self.info is None else f" on {self.info.describe_rank(self.info.rank)}"
        how = (f"did not complete within the exchange timeout of {self.timeout_s:g} s "
               "(hpattn_dist.comm.set_exchange_timeout)" if timed_out
               else f"failed after {elapsed:.2f} s")
        return ExchangeError(
            f"{where}{me}: {direction} {peer} {how}: that rank died, raised or is stuck "
            f"(cause: {cause_text(err)}). The process group is unusable now.",
            label=self.label, step=self.step, peer_group_rank=peer_group,
            peer_global_rank=peer_global, timed_out=timed_out, elapsed_s=elapsed,
        )


class RingExchanger:
    """Ring neighbours of this rank in a process group.

    Args:
        info: the resolved group (see :func:`hpattn_dist.comm.groups.resolve_group`).
        timeout_s: bound on each :meth:`PendingExchange.wait`; None reads the module default
            (:func:`set_exchange_timeout`) at each post.
    """

    def __init__(self, info: GroupInfo, timeout_s: Optional[float] = None) -> None:
        self.info = info
        self.timeout_s = timeout_s
        p, r = info.world_size, info.rank
        self.send_group_rank, self.recv_group_rank = (r + 1) % p, (r - 1) % p
        self.send_peer = info.global_rank(self.send_group_rank)
        self.recv_peer = info.global_rank(self.recv_group_rank)
        self._posts: dict[str, int] = {}
        self._grouped_by_device: dict[str, bool] = {}

    def post(
        self,
        send: Sequence[Optional[Tensor]],
        recv: Sequence[Optional[Tensor]],
        label: str,
        step: Optional[int] = None,
    ) -> PendingExchange:
        """Post ``send[i]`` to the next rank and ``recv[i]`` from the previous one, for every i.

        ``send[i]`` on this rank pairs with ``recv[i]`` on the next rank (same position, same
        tag). None or empty entries are skipped. Every sent tensor must be contiguous and left
        untouched until :meth:`PendingExchange.wait` returns. ``step`` names the exchange in
        error messages; by default the number of earlier posts with this ``label`` on this
        exchanger (the ring step when one exchanger serves one pass).
        """
        if step is None:
            step = self._posts.get(label, 0)
        self._posts[label] = self._posts.get(label, 0) + 1
        messages = []  # (op, tensor, tag, direction, peer_group, peer_global), in posting order
        for tag, (s, r) in enumerate(zip(send, recv)):
            if s is not None and s.numel() > 0:
                messages.append((dist.isend, s, tag, "send to", self.send_group_rank, self.send_peer))
            if r is not None and r.numel() > 0:
                messages.append((dist.irecv, r, tag, "receive from", self.recv_group_rank, self.recv_peer))
        device = messages[0][1].device if messages else None
        pending = PendingExchange([], label, step, self.info, exchange_timeout_for(self.info, device, self.timeout_s))
        if device is not None and device.type != "cpu" and self.info.backend_for(device) == "gloo":
            if self.info.comm_device(device).type != "cpu":  # e.g. "cuda:gloo": no host backend
                raise ValueError(
                    f"{label}: gloo cannot exchange {device.type} tensors point to point, and the "
                    f"group has no CPU backend to stage them through (its backends: "
                    f"{self.info.backends}); register one (init_process_group('cpu:gloo,{device.type}:gloo') "
                    "or 'gloo') or use NCCL (Note [gloo with device tensors] in comm/ring.py)")
            messages = pending.stage_on_host(messages)  # Note [gloo with device tensors]
        if messages and self._grouped(messages[0][1].device):
            ops = [dist.P2POp(op, t, peer_global, group=self.info.group, tag=tag)
                   for op, t, tag, _, _, peer_global in messages]
            pending.start_group(ops, [m[3:] for m in messages])
        else:
            for message in messages:
                pending.start(*message)
        record(label, sum(nbytes(m[1]) for m in messages if m[0] is dist.isend))
        return pending

    def _grouped(self, device: torch.device) -> bool:
        """Note [p2p grouping], decided once per device type (the backend is fixed)."""
        if device.type not in self._grouped_by_device:
            config = dist.get_backend_config(self.info.group)
            self._grouped_by_device[device.type] = grouped_p2p(config, device.type)
        return self._grouped_by_device[device.type]


def _group_meta(meta: list[tuple[str, int, int]]) -> tuple[str, int, int]:
    """One ``(direction, peer_group, peer_global)`` for a whole group, e.g.
    ``("send to rank 2 / receive from", 0, 0)``: every peer is named, and the entry's own peer is
    the source (the rank whose data this one waits for) when the group receives anything."""
    unique = sorted(dict.fromkeys(meta), key=lambda m: m[0] == "receive from")  # receives last
    *head, (last_dir, last_group, last_global) = unique
    parts = [f"{d} {_peer_text(g, gl)}" for d, g, gl in head] + [last_dir]
    return " / ".join(parts), last_group, last_global


def _peer_text(peer_group: int, peer_global: int) -> str:
    return (f"rank {peer_group}" if peer_group == peer_global
            else f"group rank {peer_group} (global rank {peer_global})")
