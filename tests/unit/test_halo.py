"""plan_halo on random tables and splits: every rank's plans, exchanged by hand, rebuild its inputs.

The exchange is simulated in one process: rank r receives, from each peer q, the rows that q's
plan sends to r (in q's order); the extended input ``[own rows | received rows]`` indexed by r's
``local_table`` must be exactly the table's rows of r's outputs (an independent set computation
checks the received pixels).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hpattn_dist.comm.halo import plan_halo


def _split(n: int, cuts: list[int]) -> list[tuple[int, int]]:
    edges = [0, *sorted(c % (n + 1) for c in cuts), n]
    return list(zip(edges[:-1], edges[1:]))


@settings(max_examples=60)
@given(n_in=st.integers(1, 40), n_out=st.integers(0, 30), k=st.integers(1, 5),
       p=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_plans_rebuild_every_ranks_inputs(n_in, n_out, k, p, seed, data) -> None:
    gen = torch.Generator().manual_seed(seed)
    table = torch.randint(-n_in, n_in, (n_out, k), generator=gen)  # negatives wrap as x[:, t]
    in_b = _split(n_in, data.draw(st.lists(st.integers(0, 10**6), min_size=p - 1, max_size=p - 1)))
    out_b = _split(n_out, data.draw(st.lists(st.integers(0, 10**6), min_size=p - 1, max_size=p - 1)))
    plans = [plan_halo(table, in_b, out_b, r) for r in range(p)]
    wrapped = table % n_in
    for r, plan in enumerate(plans):
        parts = []
        for q, peer in enumerate(plans):
            offset = sum(peer.send_counts[:r])
            parts.append(peer.send_indices[offset:offset + peer.send_counts[r]] + in_b[q][0])
            assert peer.send_counts[r] == plan.recv_counts[q]
        received = torch.cat(parts)
        own = set(range(*in_b[r]))
        needed = set(wrapped[out_b[r][0]:out_b[r][1]].flatten().tolist())
        assert set(received.tolist()) == needed - own and len(received) == len(needed - own)
        assert torch.equal(received, plan.recv_pixels)
        extended = torch.cat([torch.arange(*in_b[r]), received])
        assert torch.equal(extended[plan.local_table], wrapped[out_b[r][0]:out_b[r][1]])
        assert plan.total_rows == sum(q.rows_received for q in plans)
