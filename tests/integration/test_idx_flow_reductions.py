"""idx-flow layers with statistics over all pixels, converted and run on real gloo ranks.

Reference: the UNCONVERTED idx-flow module in float64 on the full field, computed in the parent
process. Each rank feeds its range ``shard_bounds(N, P)[r]`` (uneven for N % P != 0) to the
converted module; the gathered outputs, input gradients, the sum over ranks of the parameter
gradients and (BatchNorm / InstanceNorm) the running stats must match to 1e-10 relative, on
groups of P = 1..5 ranks (subgroups of one world of 5, and the default group), nside 2..4, empty
shards included. Dropouts draw from another random stream than idx-flow, so they are checked for
what holds (Note [pixel dropout on shards]): the sharded run equals the converted
module at P = 1 bitwise, the mask has the layer's structure, and its keep rate is 1 - p.

Also: two ``idx_flow.SpatialTransformerBlock`` s converted with ``convert_spatial_attention`` on
3 ranks (the failure measured in issue 14) and on 5, and the converter's refusals.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from hpattn_dist.healpix import shard_bounds
from tests.harness import run_ranks

idx_flow = pytest.importorskip("idx_flow")

RTOL = 1e-10
BATCH, CH, STEPS = 2, 4, 2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# --------------------------------------------------------------------------------------------
# Cases: every case is a small idx-flow model built identically in the parent and on each rank.
# "out" says how the output is laid out: "sharded" [B, N_r, C] or "replicated" [B, C].
# --------------------------------------------------------------------------------------------


def _randomise(module: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for name, b in module.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen, dtype=b.dtype) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype))


def _build(case: dict) -> nn.Module:
    """The unconverted idx-flow model of ``case`` (float64, deterministic)."""
    kind, npix = case["kind"], 12 * case["nside"] ** 2
    torch.manual_seed(case["seed"])
    if kind == "batch_norm":
        model = idx_flow.SpatialBatchNorm(CH, momentum=case.get("momentum", 0.1))
        if not case.get("track", True):
            model.bn = nn.BatchNorm1d(CH, track_running_stats=False)
    elif kind == "instance_norm":
        model = idx_flow.SpatialInstanceNorm(CH, affine=case.get("affine", False))
        if case.get("track"):
            model.instance_norm = nn.InstanceNorm1d(CH, affine=True, track_running_stats=True, momentum=0.3)
    elif kind == "group_norm":
        model = idx_flow.SpatialGroupNorm(2, CH)
    elif kind == "squeeze":
        model = idx_flow.Squeeze(case["reduction"])
    elif kind == "bottleneck":  # Squeeze -> per-vector Linear (replicated weights) -> Unsqueeze
        model = nn.Sequential(idx_flow.Squeeze(case["reduction"]), nn.Linear(CH, 3), nn.Tanh(),
                              idx_flow.Unsqueeze(npix))
    elif kind == "channel_dropout":
        model = idx_flow.ChannelDropout(0.5)
    elif kind == "spatial_dropout":
        model = idx_flow.SpatialDropout(0.3)
    else:
        raise AssertionError(kind)
    model = model.double()
    _randomise(model, torch.Generator().manual_seed(case["seed"] + 1))
    if case.get("eval"):
        model.eval()
    return model


def _data(case: dict, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * case["seed"] + step)
    x = torch.randn(BATCH, 12 * case["nside"] ** 2, CH, generator=gen, dtype=torch.float64)
    if case.get("ties"):  # few distinct values: many tied maxima, also across ranks
        x = torch.randint(0, 3, x.shape, generator=gen).double()
    return x


def _loss_weight(case: dict, step: int, shape: torch.Size) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7000 * case["seed"] + step)
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def _is_replicated(case: dict) -> bool:
    return case["kind"] == "squeeze"


def _is_dropout(case: dict) -> bool:
    return case["kind"].endswith("dropout")


def _convert_all(model: nn.Module, group=None) -> nn.Module:
    """Replace every module the reductions registry knows (the converter under test)."""
    from hpattn_dist.comm.groups import resolve_group
    from hpattn_dist.integrations.idx_flow.context import ShardContext
    from hpattn_dist.integrations.idx_flow.reductions import converters

    table = converters()
    ctx = ShardContext(info=resolve_group(group), process_group=group)
    if type(model) in table:
        return table[type(model)](model, ctx)
    for name, child in model.named_children():
        if type(child) in table:
            model.add_module(name, table[type(child)](child, ctx))
    return model


def _bounds(case: dict, npix: int, size: int) -> list:
    """The shard plan, or with ``empty_last`` the plan over P - 1 ranks and an empty last shard."""
    if not case.get("empty_last") or size == 1:
        return shard_bounds(npix, size)
    return shard_bounds(npix, size - 1) + [(npix, npix)]


def _run(model: nn.Module, case: dict, rank: int, size: int) -> dict:
    """STEPS forward/backward steps on group rank ``rank``'s shard; what the parent compares."""
    npix = 12 * case["nside"] ** 2
    start, stop = _bounds(case, npix, size)[rank]
    outs, x_grads = [], []
    for step in range(STEPS):
        x = _data(case, step)[:, start:stop].clone().requires_grad_(True)
        if _is_dropout(case):
            torch.manual_seed(50_000 + 10 * case["seed"] + step)  # the seed group rank 0 draws from
        out = model(x)
        w = _loss_weight(case, step, (BATCH, *out.shape[1:]) if _is_replicated(case) else
                         (BATCH, npix, out.shape[-1]))
        if _is_replicated(case):
            # Every rank computes the replicated output; rank-dependent shares of the loss that
            # sum to the full loss check that the backward sums the partial gradients.
            w = w * (rank + 1) / (size * (size + 1) / 2)
        else:
            w = w[:, start:stop]
        (out * w).sum().backward()
        outs.append(out.detach())
        x_grads.append(x.grad.clone())
    return {
        "outs": outs,
        "x_grads": x_grads,
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
    }


# Groups of every size 1..5 inside ONE world of 5 ranks (each rank imports idx-flow, with healpy
# and scikit-learn, once): the last k ranks for k < 5, so group and global ranks differ, and the
# default group (None) for k = 5, where N % 5 != 0 gives uneven shards.
WORLD = 5
GROUPS = {1: [4], 2: [3, 4], 3: [2, 3, 4], 4: [1, 2, 3, 4], 5: None}


def _ranks_all(rank: int, world: int, cases: dict) -> dict:
    import torch.distributed as dist

    from hpattn_dist.comm.counters import count_communication

    groups = {k: None if ranks is None else dist.new_group(ranks) for k, ranks in GROUPS.items()}
    results = {}
    for k, ranks in GROUPS.items():
        members = list(range(world)) if ranks is None else ranks
        if rank not in members:
            continue
        group, grank = groups[k], members.index(rank)
        out = {"cases": [_run(_convert_all(_build(case), group), case, grank, k) for case in cases[k]]}

        # Communication of one BatchNorm training forward: signature + 2 all-reduces of [C] float64.
        bn = _convert_all(_build({"kind": "batch_norm", "nside": 2, "seed": 1}), group)
        with count_communication() as stats:
            bn(_data({"nside": 2, "seed": 1}, 0)[:, slice(*shard_bounds(48, k)[grank])])
        out["counted"] = (stats.calls["all_reduce.stats"], stats.bytes_sent["all_reduce.stats"])

        # Fail together: the group's last rank passes a shard with the wrong channel count.
        out["message"] = None
        if k > 1:
            x = torch.randn(BATCH, 5, CH + (grank == k - 1), dtype=torch.float64)
            try:
                bn(x)
            except ValueError as err:
                out["message"] = str(err)
        if k in (3, 5):
            out["blocks"] = _blocks_on_shards(grank, k, group)
        results[k] = out
    return results


def _cases(size: int) -> list:
    nside = 2 + size % 3  # nside 2, 3, 4 over the group sizes: N = 48, 108, 192
    base = [
        {"kind": "batch_norm"},
        {"kind": "batch_norm", "momentum": None},
        {"kind": "batch_norm", "eval": True},
        {"kind": "batch_norm", "eval": True, "track": False},
        {"kind": "instance_norm"},
        {"kind": "instance_norm", "affine": True, "track": True},
        {"kind": "group_norm"},
        {"kind": "squeeze", "reduction": "mean"},
        {"kind": "squeeze", "reduction": "sum"},
        {"kind": "squeeze", "reduction": "max"},
        {"kind": "squeeze", "reduction": "max", "ties": True},
        {"kind": "bottleneck", "reduction": "mean"},
        {"kind": "bottleneck", "reduction": "max"},
        {"kind": "channel_dropout"},
        {"kind": "spatial_dropout"},
        # A rank without pixels still takes part in every collective, forward and backward.
        {"kind": "batch_norm", "empty_last": True},
        {"kind": "instance_norm", "affine": True, "track": True, "empty_last": True},
        {"kind": "group_norm", "empty_last": True},
        {"kind": "squeeze", "reduction": "max", "empty_last": True},
        {"kind": "squeeze", "reduction": "mean", "empty_last": True},
        {"kind": "spatial_dropout", "empty_last": True},
    ]
    return [{**case, "nside": nside, "seed": 10 * size + i} for i, case in enumerate(base)]


@pytest.fixture(scope="module")
def sharded_runs() -> dict:
    """Every rank's results, by group size (one run_ranks call for the whole module)."""
    cases = {k: _cases(k) for k in GROUPS}
    per_rank = run_ranks(_ranks_all, WORLD, cases, timeout=240.0)
    return {k: (cases[k], [per_rank[r][k] for r in (GROUPS[k] or range(WORLD))]) for k in GROUPS}


def _reference(case: dict) -> dict:
    """The unconverted idx-flow model on the full field (dropouts: converted, single process)."""
    model = _build(case)
    if _is_dropout(case):
        model = _convert_all(model)  # P = 1: no process group, the mask the ranks must reproduce
    return _run(model, case, 0, 1)


@pytest.mark.parametrize("size", sorted(GROUPS))
def test_reductions_match_single_device(sharded_runs: dict, size: int) -> None:
    cases, got = sharded_runs[size]
    for i, case in enumerate(cases):
        ref = _reference(case)
        per_rank = [g["cases"][i] for g in got]
        label = f"group of {size}: {case}"
        for step in range(STEPS):
            if _is_replicated(case):
                for r in per_rank:
                    assert _rel(r["outs"][step], ref["outs"][step]) < RTOL, label
            else:
                out = torch.cat([r["outs"][step] for r in per_rank], dim=1)
                assert out.shape == ref["outs"][step].shape, label
                if _is_dropout(case):
                    assert torch.equal(out, ref["outs"][step]), label  # bitwise P-invariance
                else:
                    assert _rel(out, ref["outs"][step]) < RTOL, label
            x_grad = torch.cat([r["x_grads"][step] for r in per_rank], dim=1)
            assert _rel(x_grad, ref["x_grads"][step]) < RTOL, label
        assert ref["grads"].keys() == per_rank[0]["grads"].keys(), label
        for name, grad in ref["grads"].items():
            total = sum(r["grads"][name] for r in per_rank)
            assert _rel(total, grad) < RTOL, f"{label} {name}"
        for name, buf in ref["buffers"].items():
            for r in per_rank:
                if buf.is_floating_point():
                    assert _rel(r["buffers"][name], buf) < RTOL, f"{label} {name}"
                else:
                    assert torch.equal(r["buffers"][name], buf), f"{label} {name}"

    calls, sent = got[0]["counted"]
    if size == 1:
        assert (calls, sent) == (0, 0)
    else:
        assert calls == 2 and sent == 2 * (2 * (size - 1) * CH * 8 // size)
        for g in got:  # every rank raised the same error, naming the failed rank
            assert "SpatialBatchNorm" in g["message"] and "rank 4" in g["message"]


def test_batch_norm_running_stats_move() -> None:
    """The running-stats check above is not vacuous: the buffers change from their start."""
    case = {"kind": "batch_norm", "nside": 2, "seed": 3}
    start = dict(_build(case).named_buffers())
    after = _reference(case)["buffers"]
    assert after["bn.num_batches_tracked"].item() == start["bn.num_batches_tracked"].item() + STEPS
    assert _rel(after["bn.running_var"], start["bn.running_var"]) > 1e-3


def test_dropout_masks_have_their_structure_and_rate() -> None:
    """ChannelDropout drops whole channels, SpatialDropout whole pixels, each with rate p."""
    x = torch.ones(64, 48, 32, dtype=torch.float64)
    channel = _convert_all(idx_flow.ChannelDropout(0.5))
    spatial = _convert_all(idx_flow.SpatialDropout(0.25))
    torch.manual_seed(0)
    y_c, y_c2 = channel(x), channel(x)
    y_s = spatial(x)
    assert torch.equal(y_c, y_c[:, :1].expand_as(y_c))  # one decision per (b, c), all pixels
    assert torch.equal(y_s, y_s[:, :, :1].expand_as(y_s))  # one decision per (b, pixel)
    assert set(y_c.unique().tolist()) == {0.0, 2.0} and set(y_s.unique().tolist()) == {0.0, 4 / 3}
    assert not torch.equal(y_c, y_c2)  # a fresh seed each call
    kept_c = (y_c[:, 0] > 0).double().mean().item()  # 2048 decisions, sd 0.011
    kept_s = (y_s[:, :, 0] > 0).double().mean().item()  # 3072 decisions, sd 0.008
    assert abs(kept_c - 0.5) < 0.06 and abs(kept_s - 0.75) < 0.05
    channel.eval()
    assert channel(x) is x


def test_norms_in_float32_single_process() -> None:
    """float32 statistics (two passes, as torch) stay at rounding level against idx-flow."""
    x = torch.randn(3, 48, 8) * 2 + 5
    for module in (idx_flow.SpatialBatchNorm(8), idx_flow.SpatialInstanceNorm(8, affine=True),
                   idx_flow.SpatialGroupNorm(4, 8)):
        _randomise(module, torch.Generator().manual_seed(0))
        ref = module(x)
        out = _convert_all(module)(x)
        assert out.dtype == torch.float32 and (out - ref).abs().max() < 1e-5, type(module).__name__


def test_errors_name_the_layer_and_its_place() -> None:
    from hpattn_dist.comm.groups import resolve_group
    from hpattn_dist.integrations.idx_flow.context import ShardContext
    from hpattn_dist.integrations.idx_flow.reductions import converters

    ctx = ShardContext(info=resolve_group(None), process_group=None, name="enc.norm")
    bn = converters()[idx_flow.SpatialBatchNorm](idx_flow.SpatialBatchNorm(4), ctx)
    with pytest.raises(ValueError, match="SpatialBatchNorm 'enc.norm': expected 4 channels"):
        bn(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="SpatialBatchNorm 'enc.norm': expected more than 1 value"):
        bn(torch.randn(1, 1, 4))
    squeeze = idx_flow.Squeeze("median")
    with pytest.raises(ValueError, match="Squeeze 'enc.norm': unknown reduction 'median'"):
        converters()[idx_flow.Squeeze](squeeze, ctx)
    unsqueeze = converters()[idx_flow.Unsqueeze](idx_flow.Unsqueeze(48), ctx)
    with pytest.raises(ValueError, match=r"Unsqueeze 'enc.norm': expected a tensor \[B, C\]"):
        unsqueeze(torch.randn(2, 3, 4))


# --------------------------------------------------------------------------------------------
# SpatialTransformerBlock: attention converted, per-pixel parts untouched (issue 14's failure)
# --------------------------------------------------------------------------------------------

E, HEADS, NSIDE_BLOCK = 8, 2, 2


def _blocks() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(
        idx_flow.SpatialTransformerBlock(E, HEADS, mlp_ratio=2.0, attn_backend="manual"),
        idx_flow.SpatialTransformerBlock(E, HEADS, mlp_ratio=2.0),  # attn_backend="auto" (SDPA)
    ).double()


def _block_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    npix = 12 * NSIDE_BLOCK**2
    return (torch.randn(BATCH, npix, E, generator=gen, dtype=torch.float64),
            torch.randn(BATCH, npix, E, generator=gen, dtype=torch.float64))


def _blocks_on_shards(rank: int, size: int, group) -> dict:
    from hpattn_dist import convert_spatial_attention

    x_full, w_full = _block_data()
    start, stop = shard_bounds(x_full.shape[1], size)[rank]
    unconverted = _blocks()(x_full[:, start:stop]).detach()  # what issue 14 measured
    model = convert_spatial_attention(_blocks(), process_group=group)
    x = x_full[:, start:stop].clone().requires_grad_(True)
    out = model(x)
    (out * w_full[:, start:stop]).sum().backward()
    return {"out": out.detach(), "x_grad": x.grad, "unconverted": unconverted,
            "grads": {n: p.grad for n, p in model.named_parameters()},
            "types": [type(b.attn).__name__ for b in model]}


@pytest.mark.parametrize("size", [3, 5])
def test_transformer_blocks_converted_run_exactly_on_shards(sharded_runs: dict, size: int) -> None:
    got = [g["blocks"] for g in sharded_runs[size][1]]
    model = _blocks()
    x_full, w_full = _block_data()
    x_full.requires_grad_(True)
    ref = model(x_full)
    (ref * w_full).sum().backward()
    assert got[0]["types"] == ["DistributedSpatialSelfAttention"] * 2
    out = torch.cat([g["out"] for g in got], dim=1)
    assert _rel(out, ref.detach()) < RTOL
    assert _rel(torch.cat([g["x_grad"] for g in got], dim=1), x_full.grad) < RTOL
    for name, p in model.named_parameters():
        assert _rel(sum(g["grads"][name] for g in got), p.grad) < RTOL, name
    # Without the conversion the blocks attend within each shard: visibly wrong (the check above
    # can fail).
    assert _rel(torch.cat([g["unconverted"] for g in got], dim=1), ref.detach()) > 1e-3


# --------------------------------------------------------------------------------------------
# The attention converter's recognition and refusals (single process)
# --------------------------------------------------------------------------------------------


def test_attention_converter_keeps_idx_flow_parameters() -> None:
    from hpattn_dist import DistributedSpatialSelfAttention, convert_spatial_attention

    model = _blocks()
    model[1].attn.train(False)
    before = dict(model.named_parameters())
    keys = list(model.state_dict())
    convert_spatial_attention(model, strategy="ring")
    assert all(type(b.attn) is DistributedSpatialSelfAttention for b in model)
    assert list(model.state_dict()) == keys
    assert all(p is before[n] for n, p in model.named_parameters())
    assert model[0].attn.attn_backend == "manual" and model[1].attn.attn_backend == "auto"
    assert model[0].attn.training and not model[1].attn.training
    assert model[0].attn.strategy == "ring"


def test_attention_converter_refuses() -> None:
    from hpattn_dist import convert_spatial_attention

    with pytest.raises(ValueError, match="nothing was converted"):
        convert_spatial_attention(nn.Sequential(idx_flow.SpatialBatchNorm(4), nn.Linear(4, 4)))

    class OwnForward(idx_flow.SpatialSelfAttention):  # same attributes, another function
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(ValueError, match=r"1 \(.*OwnForward\).*its own forward"):
        convert_spatial_attention(nn.Sequential(nn.Linear(8, 8), OwnForward(8, 2)))

    rescaled = idx_flow.SpatialSelfAttention(8, 2, attn_backend="manual")
    rescaled.scale = 1.0
    with pytest.raises(ValueError, match="scale"):
        convert_spatial_attention(rescaled)

    mismatched = idx_flow.SpatialSelfAttention(8, 2, dropout=0.1)
    mismatched.dropout.p = 0.2
    with pytest.raises(ValueError, match="dropout"):
        convert_spatial_attention(mismatched)

    with pytest.raises(ValueError, match="attn_backend"):  # idx-flow runs SDPA for any other name
        convert_spatial_attention(idx_flow.SpatialSelfAttention(8, 2, attn_backend="flash"))

    with pytest.raises(ValueError, match="dropout"):  # the distributed layer needs p < 1
        convert_spatial_attention(idx_flow.SpatialSelfAttention(8, 2, dropout=1.0))

    class CopyOfSeed(idx_flow.SpatialSelfAttention):  # a user's copy keeps the forward: converts
        pass

    CopyOfSeed.__name__ = "SpatialSelfAttention"
    assert type(convert_spatial_attention(CopyOfSeed(8, 2))).__name__ == "DistributedSpatialSelfAttention"


def test_importing_hpattn_dist_does_not_import_idx_flow() -> None:
    code = ("import sys, hpattn_dist, hpattn_dist.modules, hpattn_dist.comm.all_reduce; "
            "assert 'idx_flow' not in sys.modules, 'idx_flow imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
