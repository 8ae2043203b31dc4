"""Work per rank and a time lower bound from FLOPs and link bandwidth.

Legend as in :mod:`hpattn_dist.cost_model.memory`; Q and K the query and key rows one rank's
kernels multiply (global: Q = h * M queries per head group against all N keys; windowed: each
unit's ``c`` queries, padding included, against its ``m * c`` window keys).

Note [time lower bound]
    FLOPs of one layer's forward and backward on a rank: the projections, ``2 * B * N_r * 4E^2``
    forward and twice that backward; attention, ``4 * B * D`` per (query, key, head) forward (the
    products ``q k^T`` and ``p v``) and ``10 * B * D`` backward (the scores again, ``dV``, ``dP``,
    ``dQ``, ``dK``: five products, as the fused kernels do it), so 14 per pair in all.

    A rank cannot finish sooner than its FLOPs at the device's peak rate, nor sooner than its bytes
    at the link's rate. The ring's K/V and dK/dV transfers are posted before each block is
    computed (Note [double buffering]), so they can hide behind the attention; the all-to-alls of
    Ulysses and the halo exchange run before and after their compute and cannot. Hence::

        time >= max(attention FLOPs / F, ring bytes / W) + (other FLOPs) / F + (other bytes) / W

    with F the peak FLOP/s and W the bytes per second one rank can send. It is a bound, not a
    prediction: kernels reach a fraction of F (measure yours with ``hpattn-dist bench``), and
    latency, stragglers and the agreement's all-gather are not in it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LayerWork", "attention_flops", "time_lower_bound"]


@dataclass(frozen=True)
class LayerWork:
    """FLOPs of one rank for one layer's forward and backward (Note [time lower bound]).

    Attributes:
        attention: FLOPs of the attention kernels.
        projections: FLOPs of ``qkv_proj`` and ``out_proj``.
    """

    attention: int
    projections: int

    @property
    def total(self) -> int:
        return self.attention + self.projections


def attention_flops(batch: int, head_dim: int, pairs: int, n_local: int, embed_dim: int) -> LayerWork:
    """FLOPs of a rank whose kernels score ``pairs`` (query, key, head) triples, forward and
    backward, and whose projections see ``n_local`` pixels of width ``embed_dim``."""
    return LayerWork(attention=14 * batch * head_dim * pairs,
                     projections=3 * 2 * batch * n_local * 4 * embed_dim * embed_dim)


def time_lower_bound(work: LayerWork, overlapped_bytes: int, blocking_bytes: int, flops_per_s: float,
                     bytes_per_s: float) -> float:
    """Seconds, Note [time lower bound]: ``overlapped_bytes`` may hide behind the attention's
    FLOPs (the ring's), ``blocking_bytes`` (all-to-alls, halo) cannot."""
    attention = max(work.attention / flops_per_s, overlapped_bytes / bytes_per_s)
    return attention + work.projections / flops_per_s + blocking_bytes / bytes_per_s
