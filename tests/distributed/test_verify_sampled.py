"""``verify --sample-queries``: its streamed reference, and that it catches planted errors.

* The streamed float64 reference (:class:`hpattn_dist.tools.verify_sampled.StreamedReference`)
  against the single-device float64 oracle on the full field, in one process: the sampled rows of
  the output, the input gradient of EVERY pixel and every parameter gradient of the restricted loss,
  global and windowed.
* On 5 real ranks (uneven shards of nside 4: 192 pixels): the exact layer passes; a planted error fails
  the check on every rank: an offset on the output (``inject_error``), one rank dropping a key
  block in its forward, and one rank's key gradients scaled by 1.001 in the backward only (which the
  output cannot see; ``dx`` and the parameter gradients do).
"""

from __future__ import annotations

import functools

import pytest
import torch

from hpattn_dist import SpatialSelfAttention
from hpattn_dist.comm.groups import GroupInfo
from hpattn_dist.healpix import nside2npix
from hpattn_dist.local import LocalSpatialSelfAttention
from hpattn_dist.tools.verify import VerifyConfig, run_verify
from hpattn_dist.tools.verify_sampled import StreamedReference, sample_pixels, shard_field
from tests.harness import run_ranks

B, E, H = 2, 16, 4


@pytest.mark.parametrize("window", [None, (2, "neighbourhood"), (2, "cell")])
def test_streamed_reference_equals_the_full_field_oracle(window):
    nside, k = 8, 24
    npix = nside2npix(nside)
    x = shard_field(5, B, npix, E, 0, npix)
    sampled = sample_pixels(5, npix, k)
    g = torch.randn(B, k, E, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    torch.manual_seed(3)
    if window is None:
        oracle = SpatialSelfAttention(E, H, attn_backend="manual").double()
    else:
        oracle = LocalSpatialSelfAttention(E, H, window_nside=window[0], mode=window[1]).double()
    xg = x.clone().requires_grad_(True)
    y = oracle(xg)
    (y[:, sampled] * g).sum().backward()
    weights = {n: p.detach().clone() for n, p in oracle.named_parameters()}
    ref = StreamedReference(x, 0, npix, sampled, g, weights, H, GroupInfo(None, 0, 1), window)
    y_ref = ref.forward()
    dx_ref, grads = ref.backward()
    torch.testing.assert_close(y_ref, y[:, sampled].detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx_ref, xg.grad, rtol=1e-12, atol=1e-12)
    for name, p in oracle.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-12, atol=1e-12)


def _verify_job(rank: int, world: int) -> dict[str, list]:
    from hpattn_dist.kernels.dispatch import BlockKernel

    forward, backward = BlockKernel.forward, BlockKernel.backward
    calls = {"n": 0}

    def dropping(self, q, k, v, *args, **kwargs):  # a rank that loses every second key block
        out, lse = forward(self, q, k, v, *args, **kwargs)
        calls["n"] += 1
        return out, (torch.full_like(lse, float("-inf")) if calls["n"] % 2 == 0 else lse)

    def scaled(self, *args, **kwargs):  # a backward-only error the output cannot show
        dq, dk, dv, dbias = backward(self, *args, **kwargs)
        return dq, dk * 1.001, dv, dbias

    out = {}
    for plant in ("none", "inject", "drop_block", "dk_scaled"):
        if plant == "drop_block" and rank == 1:
            BlockKernel.forward = dropping
        if plant == "dk_scaled" and rank == 2:
            BlockKernel.backward = scaled
        cfg = VerifyConfig(nside=4, batch=B, embed_dim=E, num_heads=H, strategies=("ring",), backends=("sdpa",),
                           dtypes=("float64",), sample_queries=32,
                           local_windows=("neighbourhood:2",) if plant in ("none", "inject") else (),
                           inject_error=1e-6 if plant == "inject" else 0.0)
        out[plant] = [(r.strategy, r.passed, {q.name: q.passed for q in r.quantities}) for r in run_verify(cfg)]
        BlockKernel.forward, BlockKernel.backward = forward, backward
    return out


@functools.lru_cache(maxsize=None)
def _runs() -> dict[str, list]:
    per_rank = run_ranks(_verify_job, 5, timeout=240.0)
    return {plant: [r[plant] for r in per_rank] for plant in per_rank[0]}


def test_exact_layer_passes_and_planted_errors_fail_on_every_rank():
    runs = _runs()
    for plant, per_rank in runs.items():
        assert all(r == per_rank[0] for r in per_rank), plant  # one verdict on every rank
    clean = runs["none"][0]
    assert [name for name, _, _ in clean] == ["ring", "nbhd:2"] and all(ok for _, ok, _ in clean)
    assert not any(ok for _, ok, _ in runs["inject"][0])
    dropped = runs["drop_block"][0][0]
    assert not dropped[1] and not dropped[2]["out"]
    scaled = runs["dk_scaled"][0][0]
    assert not scaled[1] and scaled[2]["out"]  # the forward is right: only the gradients show it
    assert not scaled[2]["dx"] and not scaled[2]["dqkv_proj.weight"]
