"""The ring exchanger: send to the next rank, receive from the previous one, asynchronously.

Note [double buffering]
    A strategy posts the transfer of the block it will need next (:meth:`RingExchanger.post`)
    BEFORE computing on the block it holds, and waits only after that compute. Transfer time thus
    hides behind compute whenever compute is the longer of the two. We use plain ``isend`` /
    ``irecv`` (not ``batch_isend_irecv``, which crashed gloo ranks at exit after a following
    collective), with peers translated to GLOBAL ranks as ``torch.distributed`` requires.

Buffers with zero elements are neither sent nor received: both ends know every rank's shard
length, so they skip the same messages.

Failures: :meth:`PendingExchange.wait` is bounded by the exchange timeout (Note [exchange timeout]
in ``comm/waits.py``, :func:`set_exchange_timeout`) and turns a backend error or a timeout into
an :class:`ExchangeError` naming the label, the step, the direction and the peer (group rank and
global rank), e.g. ``ring.forward step 1: receive from rank 1 failed after 0.02 s: ...``.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import torch.distributed as dist
from torch import Tensor

from hpattn_dist.comm.counters import record
from hpattn_dist.comm.groups import GroupInfo, nbytes
from hpattn_dist.comm.waits import ExchangeError, cause_text, get_exchange_timeout, set_exchange_timeout, wait_work

__all__ = ["ExchangeError", "PendingExchange", "RingExchanger", "set_exchange_timeout"]


class PendingExchange:
    """Handles of one posted exchange; :meth:`wait` blocks until all of them completed.

    Args:
        works: ``(work, direction, peer_group_rank, peer_global_rank)`` per posted message,
            direction ``"send to"`` or ``"receive from"``.
        label, step: what the exchange is, for error messages.
        info: the group (to name this rank in messages).
        timeout_s: bound on :meth:`wait` (None: the process group's own timeout).
    """

    def __init__(self, works: list, label: str = "exchange", step: Optional[int] = None,
                 info: Optional[GroupInfo] = None, timeout_s: Optional[float] = None) -> None:
        self._works = works
        self.label, self.step, self.info, self.timeout_s = label, step, info, timeout_s

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

    def _error(self, err: BaseException, direction: str, peer_group: int, peer_global: int,
               elapsed: float) -> ExchangeError:
        timed_out = isinstance(err, TimeoutError)
        where = self.label if self.step is None else f"{self.label} step {self.step}"
        peer = (f"rank {peer_group}" if peer_group == peer_global
                else f"group rank {peer_group} (global rank {peer_global})")
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
        timeout_s = self.timeout_s if self.timeout_s is not None else get_exchange_timeout()
        pending = PendingExchange([], label, step, self.info, timeout_s)
        sent = 0
        for tag, (s, r) in enumerate(zip(send, recv)):
            if s is not None and s.numel() > 0:
                pending.start(dist.isend, s, tag, "send to", self.send_group_rank, self.send_peer)
                sent += nbytes(s)
            if r is not None and r.numel() > 0:
                pending.start(dist.irecv, r, tag, "receive from", self.recv_group_rank, self.recv_peer)
        record(label, sent)
        return pending
