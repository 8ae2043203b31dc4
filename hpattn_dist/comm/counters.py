"""Counting of every byte this library sends, so tests and benchmarks can assert traffic.

Each communication primitive in :mod:`hpattn_dist.comm` reports what it sent through
:func:`record`. Counting is per process and off unless a :func:`count_communication` block is
active, so the hot path pays one attribute check.

Example::

    with count_communication() as stats:
        out = ring_attention(q, k, v)
    stats.calls["ring.forward"], stats.bytes_sent["ring.forward"]
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional


@dataclass
class CommStats:
    """Calls and bytes sent by this process, keyed by a label such as ``"ring.forward"``.

    ``calls[label]`` counts exchanges (one exchange = one posted send of a buffer, or one
    collective call); ``bytes_sent[label]`` counts the payload bytes this process sent.
    """

    calls: Counter = field(default_factory=Counter)
    bytes_sent: Counter = field(default_factory=Counter)

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_sent.values())

    def as_dict(self) -> dict:
        return {"calls": dict(self.calls), "bytes_sent": dict(self.bytes_sent)}


_active: list[CommStats] = []


def record(label: str, nbytes: int, calls: int = 1) -> None:
    """Add ``calls`` exchanges carrying ``nbytes`` payload bytes to every active counter."""
    for stats in _active:
        stats.calls[label] += calls
        stats.bytes_sent[label] += nbytes


@contextlib.contextmanager
def count_communication(stats: Optional[CommStats] = None) -> Iterator[CommStats]:
    """Count the communication of this process inside the block (nested blocks all count)."""
    stats = CommStats() if stats is None else stats
    _active.append(stats)
    try:
        yield stats
    finally:
        _active.remove(stats)
