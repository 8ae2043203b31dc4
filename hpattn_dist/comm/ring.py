"""The ring exchanger: send to the next rank, receive from the previous one, asynchronously.

Note [double buffering]
    A strategy posts the transfer of the block it will need next (:meth:`RingExchanger.post`)
    BEFORE computing on the block it holds, and waits only after that compute. Transfer time thus
    hides behind compute whenever compute is the longer of the two. We use plain ``isend`` /
    ``irecv`` (not ``batch_isend_irecv``, which crashed gloo ranks at exit after a following
    collective), with peers translated to GLOBAL ranks as ``torch.distributed`` requires.

Buffers with zero elements are neither sent nor received: both ends know every rank's shard
length, so they skip the same messages.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch.distributed as dist
from torch import Tensor

from hpattn_dist.comm.counters import record
from hpattn_dist.comm.groups import GroupInfo, nbytes


class PendingExchange:
    """Handles of one posted exchange; :meth:`wait` blocks until all of them completed."""

    def __init__(self, works: list) -> None:
        self._works = works

    def wait(self) -> None:
        for work in self._works:
            work.wait()
        self._works = []


class RingExchanger:
    """Ring neighbours of this rank in a process group.

    Args:
        info: the resolved group (see :func:`hpattn_dist.comm.groups.resolve_group`).
    """

    def __init__(self, info: GroupInfo) -> None:
        self.info = info
        p, r = info.world_size, info.rank
        self.send_peer = info.global_rank((r + 1) % p)
        self.recv_peer = info.global_rank((r - 1) % p)

    def post(
        self,
        send: Sequence[Optional[Tensor]],
        recv: Sequence[Optional[Tensor]],
        label: str,
    ) -> PendingExchange:
        """Post ``send[i]`` to the next rank and ``recv[i]`` from the previous one, for every i.

        ``send[i]`` on this rank pairs with ``recv[i]`` on the next rank (same position, same
        tag). None or empty entries are skipped. Every sent tensor must be contiguous and left
        untouched until :meth:`PendingExchange.wait` returns.
        """
        works = []
        sent = 0
        for tag, (s, r) in enumerate(zip(send, recv)):
            if s is not None and s.numel() > 0:
                works.append(dist.isend(s, self.send_peer, group=self.info.group, tag=tag))
                sent += nbytes(s)
            if r is not None and r.numel() > 0:
                works.append(dist.irecv(r, self.recv_peer, group=self.info.group, tag=tag))
        record(label, sent)
        return PendingExchange(works)
