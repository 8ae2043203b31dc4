"""Note [local attention memory] (in :mod:`hpattn_dist.local.execute`), counted from a rank's plan.

Legend: B batch, H heads, D head dim, N_r this rank's keys (``Nk_r``); a *unit* is one ``[B, H,
N_r, D]`` tensor of the layer's dtype. Pure arithmetic on a :class:`~hpattn_dist.local.plan.LocalPlan`:
the ONE count of what the windowed executor holds, read by ``tests/distributed/test_memory.py``
(against the live bytes of the op) and by the cost model
(:func:`hpattn_dist.cost_model.memory.local_layer_memory`, against the allocator's peak of a layer).
"""

from __future__ import annotations

from dataclasses import dataclass

from hpattn_dist.local.plan import LocalPlan

__all__ = ["LocalMemoryUnits", "local_attention_units"]


@dataclass(frozen=True)
class LocalMemoryUnits:
    """What one windowed call holds above its inputs, in units (Note [local attention memory]).

    Attributes:
        edge: the edge cells' K/V the forward saves for the backward (``2e``).
        forward: peak during the forward, the output and ``edge`` included.
        backward: peak during the backward with q, k, v, out and dout given, dq, dk, dv and the
            saved ``edge`` included.
    """

    edge: float
    forward: float
    backward: float


def local_attention_units(plan: LocalPlan, acc_ratio: float = 1.0) -> LocalMemoryUnits:
    """Note [local attention memory] for ``plan``, from its geometry: each group's share g of the
    rank's units and, for squares, its padded border b; the edge cells e, the halo rows sent s
    and received r (each per ``N_r``).

    ``acc_ratio``: the accumulation itemsize over the layer's (2 for bf16 / fp16, else 1); the
    backward's accumulators (dq, dk, dv, the edge cells' and the grids' gradients, dq of a group,
    the gradients' halo trip) count that many units each.
    """
    n_units, n_r = plan.n_units, plan.n_local_keys
    if n_r == 0 or n_units == 0:
        return LocalMemoryUnits(0.0, 0.0, 0.0)
    a = acc_ratio
    e = (plan.keys.n_edge + int(plan.keys.zero_cell)) * plan.key_cell_pixels / n_r
    s, r = plan.halo.rows_sent / n_r, plan.halo.rows_received / n_r
    fwd = bwd = 0.0
    for group in plan.groups:
        g = group.q_cells.numel() / n_units
        if group.pad:
            b = group.k_cells.numel() / group.q_cells.numel()
            fwd = max(fwd, g * (3 + 2 * b))  # q, padded K/V, kernel out, merge accumulator
            # q, dout, out; K/V and their gradient grids; dq (the kernel's and the sum); dk, dv
            bwd = max(bwd, g * (3 + 2 * b + 2 * b * a + 1 + a + 6))
        else:
            m = group.k_cells.shape[1]
            fwd = max(fwd, g * (1 + 2 * m + 1))
            bwd = max(bwd, g * (3 + 4 * m + 1))
    if plan.mode == "cell" and len(plan.groups) == 1 and plan.groups[0].q_view == 0 and not plan.halo.total_rows:
        return LocalMemoryUnits(0.0, 1.0, 3.0)  # read in place: the kernel's outputs are the results
    exchange_fwd = max(2 * s + 2 * r, 3 * r + 2 * e)  # all_to_all buffers; edge cells filled
    # dq, dk, dv, the saved edge cells, the two trips' buffers
    exchange_bwd = 3 * a + 2 * e + (2 * r + 2 * s) * a
    return LocalMemoryUnits(2 * e, max(1 + 2 * e + fwd, exchange_fwd),
                            max(3 * a + 2 * e + 2 * e * a + bwd, exchange_bwd))
