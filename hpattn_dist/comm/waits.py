"""Waiting on peers: the exchange timeout, and the error that names who did not answer.

Note [exchange timeout]
~~~~~~~~~~~~~~~~~~~~~~~
Every wait of this library on a peer (a posted ring exchange, an all-to-all, a scatter / gather
all-gather, the signature ``all_gather``) is bounded by the exchange timeout,
:func:`set_exchange_timeout`. ``None`` (the default) waits as long as the process group's own
``timeout`` (``init_process_group(timeout=...)``), which the backend enforces anyway. A number of
seconds replaces it for these waits only (``Work.wait(timeout)``), shorter or longer. Choose it longer than the largest compute skew between ranks (a rank waits
for its neighbour to finish the block before), first call (warm-up) included. When it expires, or
the backend reports a broken connection (a peer died), an :class:`ExchangeError` names the peer (or
the group) and the operation. The process group is unusable after that: exit, as after any
collective timeout.

The exchange timeout is a HOST wait: ``Work.wait(timeout)`` blocks this thread, and gloo (a CPU
backend) answers it as soon as a peer's connection breaks, which is what makes a dead peer a
fast, named error. On NCCL (and every backend whose work runs on a device stream, chosen per
tensor device: ``"cpu:gloo,cuda:nccl"`` waits on the host for CPU tensors only) the same call
turns into a CPU busy-poll with 1 ms sleeps that also stops the CPU running ahead of the GPU,
and aborts the communicator on expiry; there every wait is the plain ``Work.wait()`` (the
compute stream waits for the communication stream, the host does not), and hangs are bounded by
the process group's own timeout and watchdog (``init_process_group(timeout=...)``; with
``TORCH_NCCL_ASYNC_ERROR_HANDLING`` the watchdog tears the process down). Set that timeout, not
this one, to bound NCCL exchanges (:func:`exchange_timeout_for`).
"""

from __future__ import annotations

import datetime
import math
import time
from typing import Any, Callable, Optional

import torch

from hpattn_dist.comm.groups import GroupInfo

__all__ = ["ExchangeError", "cause_text", "exchange_timeout_for", "get_exchange_timeout", "run_collective",
           "set_exchange_timeout", "wait_work"]

#: Backends whose ``Work.wait(timeout)`` is a host wait answered at once when a peer breaks.
HOST_WAIT_BACKENDS = ("gloo", "mpi")


class ExchangeError(RuntimeError):
    """A wait on a peer failed: the peer died, raised, is stuck, or the exchange timed out.

    Attributes:
        label: the operation (``"ring.forward"``, ``"all_gather.meta"``, ...).
        step: the exchange's number within its label for this exchanger (the ring step), or None.
        peer_group_rank, peer_global_rank: the peer waited on, or None for a collective.
        timed_out: True when the exchange timeout expired (rather than a backend error).
        elapsed_s: seconds spent waiting before the error.
    """

    def __init__(self, message: str, *, label: str, step: Optional[int] = None,
                 peer_group_rank: Optional[int] = None, peer_global_rank: Optional[int] = None,
                 timed_out: bool = False, elapsed_s: float = 0.0) -> None:
        super().__init__(message)
        self.label, self.step = label, step
        self.peer_group_rank, self.peer_global_rank = peer_group_rank, peer_global_rank
        self.timed_out, self.elapsed_s = timed_out, elapsed_s


_exchange_timeout_s: Optional[float] = None


def set_exchange_timeout(seconds: Optional[float]) -> Optional[float]:
    """Bound every wait of this library on a peer to ``seconds`` (None: the group's own timeout).

    See Note [exchange timeout]. Process-wide; set the same value on every rank.

    Returns:
        The previous value, so a caller can restore it.

    Raises:
        ValueError: ``seconds`` is not None nor a positive finite number.
    """
    global _exchange_timeout_s
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (
            math.isfinite(seconds) and seconds > 0
        ):
            raise ValueError(f"seconds must be None or a positive finite number, got {seconds!r}")
        seconds = float(seconds)
    previous, _exchange_timeout_s = _exchange_timeout_s, seconds
    return previous


def get_exchange_timeout() -> Optional[float]:
    """The exchange timeout in seconds, or None (the process group's own timeout applies)."""
    return _exchange_timeout_s


def exchange_timeout_for(info: GroupInfo, device: Optional[torch.device],
                         timeout_s: Optional[float] = None) -> Optional[float]:
    """The bound on a wait for ``info``'s collectives on tensors of ``device``: ``timeout_s`` (or
    the exchange timeout when None) on a host-waited backend (gloo), None on one that waits on
    the device (NCCL), where the process group's timeout and watchdog apply (Note [exchange
    timeout]). ``device`` None: a host wait."""
    backend = None if device is None else info.backend_for(device)
    if backend is not None and backend not in HOST_WAIT_BACKENDS:
        return None
    return get_exchange_timeout() if timeout_s is None else timeout_s


def wait_work(work: Any, timeout_s: Optional[float]) -> None:
    """Wait for a ``torch.distributed`` work handle, at most ``timeout_s`` seconds (None: the
    backend's own timeout).

    Raises:
        TimeoutError: the timeout expired (also when the backend reports it as a RuntimeError).
        RuntimeError: the backend reported a failure (e.g. a peer's connection was reset).
    """
    if timeout_s is None:
        work.wait()
        return
    start = time.monotonic()
    try:
        done = work.wait(timeout=datetime.timedelta(seconds=max(timeout_s, 1e-3)))
    except RuntimeError as err:
        if time.monotonic() - start >= 0.95 * timeout_s or "timed out" in str(err).lower():
            raise TimeoutError(str(err)) from err
        raise
    if done is False:
        raise TimeoutError(f"not completed after {timeout_s:g} s")


def cause_text(err: BaseException) -> str:
    """The error's message on one line, at most 300 characters (for messages naming a cause)."""
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."


def run_collective(info: GroupInfo, label: str, description: str, start: Callable[[], Any],
                   device: Optional[torch.device] = None) -> None:
    """Start a collective (``start()`` returns its async work handle) on tensors of ``device``
    and wait for it within the exchange timeout where the wait is on the host (Note [exchange
    timeout]); ``description`` says what it is in the error (``"the metadata all_gather"``).

    Raises:
        ExchangeError: the collective failed or timed out (a rank died, is stuck, or never called).
    """
    timeout_s = exchange_timeout_for(info, device)
    begin = time.monotonic()
    try:
        wait_work(start(), timeout_s)
    except (RuntimeError, TimeoutError) as err:
        elapsed = time.monotonic() - begin
        members = [info.global_rank(r) for r in range(info.world_size)]
        how = (f"did not complete within the exchange timeout of {timeout_s:g} s"
               if isinstance(err, TimeoutError) else f"failed after {elapsed:.2f} s")
        raise ExchangeError(
            f"{label} on {info.describe_rank(info.rank)}: {description} over global ranks {members} "
            f"{how}: a rank of the group died, raised or is stuck before calling it (cause: "
            f"{cause_text(err)}). The process group is unusable now.",
            label=label, timed_out=isinstance(err, TimeoutError), elapsed_s=elapsed,
        ) from err
