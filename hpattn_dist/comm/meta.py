"""The metadata all-gather: every rank's few ints, the one small collective of a call.

Used by the signature protocol (:mod:`hpattn_dist.comm.agreement`) and wherever a collective
needs its peers' sizes; counted under the label ``all_gather.meta``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from hpattn_dist.comm.counters import record
from hpattn_dist.comm.groups import GroupInfo, cpu_side_group
from hpattn_dist.comm.waits import run_collective

__all__ = ["all_gather_ints"]


def all_gather_ints(values: Sequence[int], info: GroupInfo, device: torch.device) -> list[tuple[int, ...]]:
    """Every rank's ``values`` (same length on all ranks), in group-rank order.

    One small collective of an int64 vector on ``info.meta_device(device)`` (the CPU whenever the
    group has a CPU backend, Note [init styles] in ``groups.py``; for a group without one, on its
    CPU side group where one could be made, Note [CPU side group]), bounded by the exchange
    timeout; with one rank, no communication. On gloo it is an ``all_to_all_single`` of the
    vector repeated P times: one round of messages, where gloo's ``all_gather`` runs P - 1
    dependent ring steps. NCCL keeps ``all_gather``.

    Raises:
        ExchangeError: the collective failed or timed out (a rank died, is stuck, or never called).
    """
    if info.world_size == 1:
        return [tuple(int(v) for v in values)]
    p = info.world_size
    home = info.meta_device(device)
    side = cpu_side_group(info) if home.type != "cpu" else None  # Note [CPU side group]
    if side is not None:
        home = torch.device("cpu")
    local = torch.tensor(list(values), dtype=torch.int64, device=home)
    if side is not None or info.backend_for(home) == "gloo":
        send = local.repeat(p)
        received = torch.empty_like(send)
        # The side group is gloo: a host wait within the exchange timeout (device None).
        run_collective(info, "all_gather.meta", "the metadata all_gather", lambda: dist.all_to_all_single(
            received, send, group=info.group if side is None else side, async_op=True),
            local.device if side is None else None)
        gathered = list(received.view(p, -1))
    else:
        gathered = [torch.empty_like(local) for _ in range(p)]
        run_collective(info, "all_gather.meta", "the metadata all_gather", lambda: dist.all_gather(
            gathered, local, group=info.group, async_op=True), local.device)
    record("all_gather.meta", local.numel() * local.element_size())
    return [tuple(int(v) for v in t.tolist()) for t in gathered]
