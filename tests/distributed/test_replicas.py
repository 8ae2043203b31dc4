"""Replicated parameters and the field size are checked in every layer call (Note [replicated
parameter check]); the README's layer snippet runs as written on 2 real gloo ranks.

References: the single-device :class:`SpatialSelfAttention` (float64 where the test builds the
layer itself) loaded with group rank 0's ``state_dict``.
"""

from __future__ import annotations

import re
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from hpattn_dist import DistributedSpatialSelfAttention, SpatialSelfAttention, broadcast_parameters
from tests.harness import run_ranks

README = Path(__file__).resolve().parents[2] / "README.md"
E, HEADS = 16, 4


def _readme_snippet() -> str:
    """The first python block of the README section "## Using the distributed layer"."""
    text = README.read_text()
    section = text.split("\n## Using the distributed layer\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README: no python block under '## Using the distributed layer'"
    return match.group(1)


def _run_snippet(rank: int, world: int, code: str) -> dict:
    namespace: dict = {}
    # The harness already initialised the group: the snippet's own init_process_group is the
    # only line not run as written.
    with mock.patch.object(dist, "init_process_group", lambda *a, **k: None):
        exec(compile(code, "README.md snippet", "exec"), namespace)  # noqa: S102 - our own README
    return {"x_full": namespace["x_full"], "y_full": namespace["y_full"].detach(),
            "state": {k: v.clone() for k, v in namespace["attn"].state_dict().items()}}


def test_readme_layer_snippet_runs_as_written_on_two_ranks():
    outs = run_ranks(_run_snippet, 2, _readme_snippet(), timeout=90.0)
    for name, value in outs[0]["state"].items():
        assert torch.equal(value, outs[1]["state"][name]), name
    oracle = SpatialSelfAttention(64, 8, attn_backend="manual").double()
    oracle.load_state_dict({k: v.double() for k, v in outs[0]["state"].items()})
    with torch.no_grad():
        want = oracle(outs[0]["x_full"].double())
    for out in outs:
        torch.testing.assert_close(out["y_full"].double(), want, rtol=1e-5, atol=1e-5)


def _attempt(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except ValueError as err:
        return str(err)
    return None


def _mismatch(rank: int, world: int) -> dict:
    from hpattn_dist import convert_spatial_attention
    from hpattn_dist.healpix import scatter

    torch.manual_seed(rank)  # a different seed on every rank: different weights
    model = torch.nn.Sequential(torch.nn.Linear(E, E), SpatialSelfAttention(E, HEADS, attn_backend="manual"))
    model = convert_spatial_attention(model.double())
    gen = torch.Generator().manual_seed(5)
    x_full = torch.randn(2, 48, E, generator=gen, dtype=torch.float64)
    x_local = scatter(x_full)
    out = {"unseeded": _attempt(model, x_local)}
    broadcast_parameters(model)
    out["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    out["y"] = model(x_local).detach()
    with torch.no_grad():  # an in-place change on one rank after a good call: seen next call
        if rank == 1:
            model[1].out_proj.weight.add_(1e-3)
    out["drifted"] = _attempt(model, x_local)
    # the full field on rank 0, a shard on rank 1: 48 + 24 = 72 pixels, no HEALPix size
    layer = DistributedSpatialSelfAttention(E, HEADS, attn_backend="manual", name="attn").double()
    broadcast_parameters(layer)
    out["npix"] = _attempt(layer, x_full if rank == 0 else x_local)
    loose = DistributedSpatialSelfAttention(E, HEADS, attn_backend="manual", healpix_field=False).double()
    broadcast_parameters(loose)
    out["point_set"] = loose(x_full[:, :5 + 2 * rank]).shape[1]  # 5 + 7 = 12 points: allowed
    return out


def test_differing_parameters_and_non_healpix_fields_raise_on_every_rank():
    outs = run_ranks(_mismatch, 2, timeout=90.0)
    for rank, out in enumerate(outs):
        msg = out["unseeded"]
        assert msg is not None, f"rank {rank}: different weights were accepted"
        assert "DistributedSpatialSelfAttention '1'" in msg and "broadcast_parameters" in msg, msg
        assert "hold different parameters" in out["drifted"], out["drifted"]
        msg = out["npix"]
        assert msg is not None and "N = 72" in msg, msg
        assert "rank 0: N_r=48" in msg and "rank 1: N_r=24" in msg and "'attn'" in msg, msg
        assert out["point_set"] == 5 + 2 * rank
    assert outs[0]["unseeded"] == outs[1]["unseeded"] and outs[0]["npix"] == outs[1]["npix"]
    # after broadcast_parameters: rank 0's weights everywhere, and the oracle's output
    oracle = torch.nn.Sequential(torch.nn.Linear(E, E), SpatialSelfAttention(E, HEADS, attn_backend="manual"))
    oracle = oracle.double()
    oracle.load_state_dict(outs[0]["state"])
    for name, value in outs[0]["state"].items():
        assert torch.equal(value, outs[1]["state"][name]), name
    x_full = torch.randn(2, 48, E, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        want = oracle(x_full)
    torch.testing.assert_close(torch.cat([o["y"] for o in outs], dim=1), want, rtol=1e-10, atol=1e-12)


def test_fingerprint_is_cached_until_a_parameter_changes():
    from hpattn_dist.replicas import ParameterFingerprint

    layer = torch.nn.Linear(4, 4)
    fp = ParameterFingerprint()
    first = fp(layer.named_parameters())
    with mock.patch.object(torch.Tensor, "sum", side_effect=AssertionError("recomputed")):
        assert fp(layer.named_parameters()) == first  # no parameter changed: cached
    with torch.no_grad():
        layer.weight.mul_(2.0)
    assert fp(layer.named_parameters()) != first


def test_single_process_layer_checks_the_field_size():
    layer = DistributedSpatialSelfAttention(E, HEADS)
    with pytest.raises(ValueError, match="N = 50 pixels"):
        layer(torch.randn(1, 50, E))
    assert DistributedSpatialSelfAttention(E, HEADS, healpix_field=False)(torch.randn(1, 50, E)).shape == (1, 50, E)


def _local_mismatch(rank: int, world: int) -> dict:
    from hpattn_dist import (
        DistributedLocalSpatialSelfAttention, LocalSpatialSelfAttention, convert_spatial_attention,
    )

    torch.manual_seed(rank)  # a different seed on every rank: different weights
    model = torch.nn.Sequential(
        torch.nn.Linear(E, E), LocalSpatialSelfAttention(E, HEADS, attn_backend="manual", window_nside=1))
    model = convert_spatial_attention(model.double())
    x_full = torch.randn(2, 192, E, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sizes = [50, 100, 42][:world]
    sizes[-1] = 192 - sum(sizes[:-1])
    start = sum(sizes[:rank])
    x_local = x_full[:, start:start + sizes[rank]]
    out = {"unseeded": _attempt(model, x_local)}
    broadcast_parameters(model)
    out["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    out["y"] = model(x_local).detach()
    with torch.no_grad():  # an in-place change on the last rank after a good call: seen next call
        if rank == world - 1:
            model[1].qkv_proj.bias.add_(1e-3)
    out["drifted"] = _attempt(model, x_local)
    # the full field on rank 0, its shard elsewhere: no HEALPix size
    layer = DistributedLocalSpatialSelfAttention(E, HEADS, window_nside=1, name="local").double()
    broadcast_parameters(layer)
    out["npix"] = _attempt(layer, x_full if rank == 0 else x_local)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_local_layer_refuses_differing_parameters_and_non_healpix_fields_on_every_rank(world):
    from hpattn_dist import LocalSpatialSelfAttention

    outs = run_ranks(_local_mismatch, world, timeout=90.0)
    for rank, out in enumerate(outs):
        msg = out["unseeded"]
        assert msg is not None, f"rank {rank}: different weights were accepted"
        assert "DistributedLocalSpatialSelfAttention '1'" in msg and "broadcast_parameters" in msg, msg
        assert f"{world - 1} of {world} ranks differ" in msg, msg
        assert "hold different parameters" in out["drifted"] and "1 of" in out["drifted"], out["drifted"]
        assert out["npix"] is not None and "not a HEALPix field" in out["npix"] and "'local'" in out["npix"]
        assert "healpix_field=False" not in out["npix"], out["npix"]  # no such option here
    for key in ("unseeded", "drifted", "npix"):
        assert len({out[key] for out in outs}) == 1, key
    # after broadcast_parameters: rank 0's weights everywhere, and the float64 oracle's output
    for name, value in outs[0]["state"].items():
        assert all(torch.equal(value, out["state"][name]) for out in outs), name
    oracle = torch.nn.Sequential(
        torch.nn.Linear(E, E), LocalSpatialSelfAttention(E, HEADS, attn_backend="manual", window_nside=1))
    oracle = oracle.double()
    oracle.load_state_dict(outs[0]["state"])
    x_full = torch.randn(2, 192, E, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        want = oracle(x_full)
    torch.testing.assert_close(torch.cat([o["y"] for o in outs], dim=1), want, rtol=1e-10, atol=1e-12)


def _late(rank: int, world: int) -> dict:
    """Note [fingerprint one call late] on real ranks: every parameter counts as a device one."""
    from hpattn_dist import replicas
    from hpattn_dist.grad_sync import sync_gradients
    from hpattn_dist.healpix import scatter

    replicas._deferred = lambda p: True
    x_local = scatter(torch.randn(2, 48, E, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    out = {}
    torch.manual_seed(rank)  # different weights from the first call: raised at once
    first = DistributedSpatialSelfAttention(E, HEADS, attn_backend="manual", name="first").double()
    out["first"] = _attempt(first, x_local)
    broadcast_parameters(first)  # mended: the next call must not carry the old fingerprint
    out["mended"] = _attempt(first, x_local)
    layer = DistributedSpatialSelfAttention(E, HEADS, attn_backend="manual", name="late").double()
    broadcast_parameters(layer)
    for step in range(2):
        layer(x_local).square().sum().backward()
        sync_gradients(layer)  # equal weights: no error
    with torch.no_grad():
        if rank == world - 1:  # a permutation on the last rank after good calls
            layer.qkv_proj.weight.copy_(layer.qkv_proj.weight.roll(1, 0))
    layer.zero_grad()
    # the call carries the previous call's (equal) fingerprint: no error yet
    out["late_call"] = _attempt(lambda: layer(x_local).square().sum().backward())
    out["flushed"] = _attempt(sync_gradients, layer)  # before the optimizer step
    out["next_call"] = _attempt(layer, x_local)  # no sync_gradients in between: the next call
    # A call that fails on one rank before it reads its layer's fingerprint (a bad input), between
    # two updates made alike on every rank: the good call after it must not compare old with new.
    retry = DistributedSpatialSelfAttention(E, HEADS, attn_backend="manual", name="retry").double()
    broadcast_parameters(retry)

    def update() -> None:
        with torch.no_grad():
            for p in retry.parameters():
                p.mul_(1.01)

    retry(x_local)
    update()
    out["bad_input"] = _attempt(retry, x_local[..., :E - 1] if rank == 1 else x_local)
    update()
    out["retried"] = _attempt(retry, x_local)
    return out


def test_a_deferred_fingerprint_raises_on_every_rank_at_most_one_call_late():
    outs = run_ranks(_late, 2, timeout=90.0)
    for rank, out in enumerate(outs):
        assert out["first"] is not None and "'first'" in out["first"], (rank, out["first"])
        assert out["mended"] is None, (rank, out["mended"])
        assert out["late_call"] is None, (rank, out["late_call"])
        msg = out["flushed"]
        assert msg is not None and "sync_gradients" in msg and "'late'" in msg and "rank 1" in msg, (rank, msg)
        msg = out["next_call"]
        assert msg is not None and "'late'" in msg and "previous call" in msg, (rank, msg)
        assert out["bad_input"] is not None and "'retry'" in out["bad_input"], (rank, out["bad_input"])
        assert out["retried"] is None, (rank, out["retried"])


def _late_model(rank: int, world: int) -> dict:
    """A converted idx-flow model's one fingerprint per call, every parameter deferred."""
    from hpattn_dist import replicas
    from hpattn_dist.healpix import shard_bounds
    from tests.integration.test_idx_flow_one_agreement import N_IN, _convert, build, data

    replicas._deferred = lambda p: True
    model = _convert(build(), None)  # seeded alike on every rank
    a, b = shard_bounds(N_IN, world)[rank]
    x = data(0)[0][:, a:b]
    out = {}
    with torch.no_grad():
        model(x)  # the lazily built parameters made, equal
        if rank == world - 1:
            model.blocks[0].attn.qkv_proj.weight.add_(1e-3)
        out["late"] = _attempt(model, x)  # carries the previous call's (equal) fingerprint
        out["next"] = _attempt(model, x)
        broadcast_parameters(model)
        out["mended"] = _attempt(model, x)
    return out


def test_a_converted_models_deferred_fingerprint_raises_one_call_late_and_starts_afresh():
    outs = run_ranks(_late_model, 2, timeout=120.0)
    for rank, out in enumerate(outs):
        assert out["late"] is None, (rank, out["late"])
        assert out["next"] is not None and "blocks.0.attn.qkv_proj.weight" in out["next"], (rank, out["next"])
        assert out["mended"] is None, (rank, out["mended"])
