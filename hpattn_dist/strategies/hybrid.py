"""The hybrid (2D) schedule: Ulysses inside a sub-group x ring across sub-groups.

The registered ops run it (Note [ulysses op memory] in :mod:`hpattn_dist.strategies.ops`: the
head exchange, then the ring Function's body across the Ulysses groups); this module holds its
Note.

Legend: B batch, H heads, D head dim, U Ulysses degree (size of ``ulysses_group``), R ring degree
(size of ``ring_group``), P = U * R, h = H / U, N_r pixels on this rank, M_i = pixels of Ulysses
group i (sum of its N_r), N = sum of M_i. Rank layout: Note [hybrid layout] in
:mod:`hpattn_dist.mesh` (shards in ring-index-major, Ulysses-index-minor order).

Note [hybrid schedule]
    ::

        q, k, v [B, H, N_r, D]
            --all-to-all over ulysses_group (scatter heads, gather pixels)--> [B, h, M_i, D]
            --ring attention over ring_group (K/V of the R Ulysses groups rotate)--> [B, h, M_i, D]
            --all-to-all over ulysses_group (scatter pixels, gather heads)--> [B, H, N_r, D]

    Every Ulysses rank u holds heads ``u*h .. u*h+h-1`` of its group's pixels; the members of one
    ring group share u, so the ring combines the same head slice over all N pixels. U = P is
    Ulysses (the ring has one member), U = 1 is the ring (the all-to-alls move nothing).
    Backward: the adjoint all-to-alls (Note [all-to-all adjoint]) around the ring's explicit
    backward (Note [ring schedule]). A bare key mask travels as a mask (the ring compacts the
    keys masked everywhere); with a key bias the mask is folded into the bias, which travels as
    in Note [ulysses schedule].

Communication per rank (itemsize s, ring accumulators a): the Ulysses formulas with P -> U and
N -> M_i, plus the ring's over ring_group on blocks ``[B, h, M_i, D]``; exact formulas and their
equal-shard forms in :mod:`hpattn_dist.strategies.auto`.
"""
