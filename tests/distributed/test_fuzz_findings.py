"""Minimal reproducers of what the differential fuzzer found beyond issue 23's list.

- B = 0 through windowed attention (local, and cross-grid with ``window_nside``) on more than one
  rank: the halo exchange's byte rows are empty and could not be reinterpreted as floats
  (``RuntimeError: self.stride(0) must be divisible by 4 ...``), and the key bias gradient's
  ``view(n, b, -1, L)`` was ambiguous for B = 0 -- fixed; the empty result and its gradients
  match the float64 reference.

Legend: B batch, H heads, N pixels, D head dim, P = 2 ranks.
"""

from __future__ import annotations

import torch

from tests.harness import run_ranks
from tests.local_reference import healpy_cross_window_mask, healpy_window_mask, reference_local_attention


def _empty_batch(rank: int, world: int) -> dict:
    from hpattn_dist import healpix_local_attention, ring_cross_attention

    out = {}
    g = torch.Generator().manual_seed(0)
    n, nk = 48, 12  # nside 2 queries; nside 1 keys for the cross call
    for name in ("local", "cross"):
        q = torch.randn(0, 2, n // world, 3, generator=g, dtype=torch.float64).requires_grad_()
        m = n // world if name == "local" else nk // world
        k, v = (torch.randn(0, 2, m, 3, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
        bias = torch.randn(0, 2, m, generator=g, dtype=torch.float64).requires_grad_()  # its gradient too
        if name == "local":
            o = healpix_local_attention(q, k, v, window_nside=1, mode="neighbourhood", key_bias=bias)
        else:
            o = ring_cross_attention(q, k, v, window_nside=1, mode="cell", key_bias=bias)
        o.sum().backward()
        out[name] = [t.detach() for t in (o, q.grad, k.grad, v.grad, bias.grad)]
    return out


def test_windowed_attention_takes_an_empty_batch_on_several_ranks():
    results = run_ranks(_empty_batch, 2, timeout=120)
    for name, allowed in (("local", healpy_window_mask(2, 1, "neighbourhood")),
                          ("cross", healpy_cross_window_mask(2, 1, 1, "cell"))):
        q = torch.zeros(0, 2, allowed.shape[0], 3, dtype=torch.float64, requires_grad=True)
        k, v = (torch.zeros(0, 2, allowed.shape[1], 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
        bias = torch.zeros(0, 2, allowed.shape[1], dtype=torch.float64, requires_grad=True)
        ref = reference_local_attention(q, k, v, allowed, key_bias=bias)
        ref.sum().backward()
        for i, want in enumerate((ref, q.grad, k.grad, v.grad, bias.grad)):
            got = torch.cat([r[name][i] for r in results], dim=-1 if i == 4 else 2)
            assert got.shape == want.shape, (name, i, got.shape, want.shape)
