"""The Ulysses (head-parallel) schedule: all-to-all to whole heads, local full attention, and back.

The registered ops run it (``hpattn::attention_fwd``, ``attention_heads``, ``heads_to_pixels``,
Note [ulysses op memory] in :mod:`hpattn_dist.strategies.ops`); this module holds its Note.

Legend: B batch, H heads, D head dim, P ranks in the group, r this rank, h = H / P heads per rank,
N_r pixels on rank r (ranks may differ, zero included), N = sum of N_r.

Note [ulysses schedule]
    Forward::

        q, k, v [B, H, N_r, D]
            --one all-to-all (scatter heads, gather pixels)--> 3 x [B, h, N, D]   heads r*h .. r*h+h-1
            --local attention over all N keys (one block, same kernel dispatch as the ring)-->
        out [B, h, N, D] --all-to-all (scatter pixels, gather heads)--> [B, H, N_r, D]

    Both all-to-alls pack and unpack with one copy each (Note [head exchange layout] in
    ``comm/head_exchange.py``).

    Pixels arrive in group-rank order, so the global pixel index of a key is its position in the
    gathered sequence, exactly as in the ring (Note [ring schedule]); with the
    head offset ``r * h`` the position-keyed dropout mask (Note [position-keyed dropout]) is the
    ring's, so results do not depend on the strategy or on P.

    A key bias ``[B, H, N_r]`` (the key mask folded in) travels like q (-> ``[B, h, N]``); a
    head-shared bias ``[B, 1, N_r]`` is all-gathered to ``[B, 1, N]``
    (:func:`~hpattn_dist.comm.head_exchange.gather_pixels`); a bare key mask travels as a mask
    (1 byte per key). Its gradient comes home in the door's backward by the adjoint all-to-all
    (``[B, 1, N]`` -> ``[B, U, N_r]``, summed over the U ranks' heads: the reduce-scatter).

    Backward: the adjoint all-to-alls (Note [all-to-all adjoint]) around the block backward,
    which uses the saved final lse (no recomputation).

Communication per rank (bytes, itemsize s; exact formulas in :mod:`hpattn_dist.strategies.auto`):
forward ``s * B * D * (3 * (H - h) * N_r + h * (N - N_r))``, backward
``s * B * D * ((H - h) * N_r + 3 * h * (N - N_r))``; with equal shards each is
``4 * (P - 1) / P * B * H * N_r * D * s``.
"""
