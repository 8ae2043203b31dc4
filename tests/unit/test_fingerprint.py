"""The replicated-parameter fingerprint (Note [replicated parameter check] in ``hpattn_dist/replicas.py``):
equal parameters give equal fingerprints, permuted ones do not, and the position-weighted sum is
the closed form ``sum_i frac(i * phi) p_i`` whatever the chunking."""

from __future__ import annotations

import math

import torch

from hpattn_dist import replicas
from hpattn_dist.comm.agreement import bits_float
from hpattn_dist.replicas import ParameterFingerprint


def _fingerprint(params):
    return ParameterFingerprint()((str(i), p) for i, p in enumerate(params))


def test_weighted_sum_is_the_closed_form_across_chunks(monkeypatch):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 5, generator=g), torch.randn(11, generator=g, dtype=torch.float64)
    phi = (math.sqrt(5) - 1) / 2
    want = sum(math.modf(i * phi)[0] * float(x) for i, x in enumerate(torch.cat([a.double().reshape(-1), b])))
    for chunk in (3, 1 << 22):
        monkeypatch.setattr(replicas, "_CHUNK", chunk)
        got = bits_float(_fingerprint([a, b])[1][3])
        assert abs(got - want) <= 1e-12 * sum(abs(float(x)) for x in torch.cat([a.double().reshape(-1), b]))


def test_permutations_change_the_fingerprint_and_copies_do_not():
    g = torch.Generator().manual_seed(1)
    w, u = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    base = _fingerprint([w, u])
    assert _fingerprint([w.clone(), u.clone()]) == base
    for permuted in ([w.T.contiguous(), u], [w, u.flip(0)], [u, w], [w.roll(1), u]):
        layout, sums = _fingerprint(permuted)
        assert layout == base[0]  # names, shapes and dtypes are the same
        for i in range(3):  # the plain sums cannot see a permutation (up to rounding)
            assert abs(bits_float(sums[i]) - bits_float(base[1][i])) <= 1e-12 * bits_float(base[1][1])
        assert abs(bits_float(sums[3]) - bits_float(base[1][3])) > 1e-6 * bits_float(base[1][1])
