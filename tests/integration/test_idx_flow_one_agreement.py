"""One metadata collective per call of a converted model, attention layers and dropouts included
(issue 25 item 9; Note [one agreement per model call], Note [attention plans in a model call],
Note [seeds in a model call]).

The model is issue 25's medium encoder-processor-decoder at small nsides (8 -> 4 -> 2 and back;
five gather layers, two ``SpatialTransformerBlock`` with their feed-forward ``nn.Dropout``),
float64, on real gloo ranks (world 2: Ulysses; world 3: the ring, H = 4 over 3 ranks), one
spawned group per world size with every case in it:

- collectives per call (forward + backward; parameters changed by an SGD step between calls):
  ``all_gather.meta`` is 1 once the key repeats, with dropout in training too, and in eval
  (blocks under ``torch.utils.checkpoint`` are recomputed after the call and agree there);
- exact: three SGD steps against the unconverted model in float64 on one process (rel 1e-10);
  with dropout 0.2 and the blocks under ``torch.utils.checkpoint``, equal to the same converted
  model on ONE process (no process group: the seeds come from the same draws) and to itself
  without checkpointing (the recomputation replays the forward's masks);
- one rank wrong INSIDE a steady-state call (the key known, no layer agreeing on its own): an
  attention weight, a gather layer's kernel, the attention's scale or dropout, a feed-forward
  dropout's probability, or the training mode differs on the last rank: the SAME ValueError on
  every rank, at the call's start (no halo or head exchange made), naming the parameter or the
  layer's setting; the next good call is exact again. A different CPU generator on one rank is
  no error: every rank drops with group rank 0's seeds, so the output equals the one-process
  run seeded like rank 0;
- a forward pre-hook that rewrites an attention's weights in place during the call (the same on
  every rank): that layer agrees on its own (2 metadata collectives per call) and stays exact;
- users' shapes of call, on a second model of the same grids (``Shared``: one attention and one
  dropout bound twice, a positional embedding owned by the root and declared in ``pixel_tensors``):
  the model called twice per step (a rollout), with dropout, and with its processor checkpointed
  (recomputed after both calls with each call's masks); a converted model inside a converted model;
  one metadata collective per converted model call, exact; and the root's pixel tensor different
  on the last rank: the same ValueError on every rank naming it (its hook shows the call a view
  of the parameter, which must still be checked).
"""

from __future__ import annotations

import copy
import functools

import idx_flow
import pytest
import torch
import torch.nn as nn
from idx_flow.utils import compute_connection_indices
from torch.utils.checkpoint import checkpoint

from hpattn_dist.healpix import shard_bounds
from tests.harness import run_ranks

RTOL = 1e-10
B, C_IN, N_IN, STEPS, LR = 2, 3, 768, 3, 0.05


@functools.lru_cache(maxsize=None)
def _t(nside_in: int, nside_out: int, k: int, weights: bool = False):
    return compute_connection_indices(nside_in, nside_out, k, return_weights=weights)


class Medium(nn.Module):
    """Issue 25's medium model at nside 8: ``[B, 768, 3] -> [B, 768, 3]``."""

    def __init__(self, dropout: float = 0.0, checkpointed: bool = False) -> None:
        super().__init__()
        e = 16
        self.enc = nn.Sequential(
            idx_flow.SpatialConv(768, _t(8, 8, 9)[0], filters=e // 4), nn.GELU(),
            idx_flow.SpatialConv(192, _t(8, 4, 4)[0], filters=e // 2), nn.GELU(),
            idx_flow.SpatialConv(48, _t(4, 2, 4)[0], filters=e))
        self.blocks = nn.ModuleList([
            idx_flow.SpatialTransformerBlock(e, 4, mlp_ratio=2.0, dropout=dropout, attn_backend="manual")
            for _ in range(2)])
        up1, _, w1 = _t(2, 4, 4, True)
        up2, _, w2 = _t(4, 8, 4, True)
        self.dec = nn.Sequential(
            idx_flow.SpatialTransposeConv(192, up1, w1, filters=e // 2), nn.GELU(),
            idx_flow.SpatialTransposeConv(768, up2, w2, filters=C_IN))
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.enc(x)
        for block in self.blocks:
            h = checkpoint(block, h, use_reentrant=False) if self.checkpointed else block(h)
        return self.dec(h)


def build(dropout: float = 0.0, checkpointed: bool = False) -> nn.Module:
    """The float64 model with its lazy parameters created (the same in every process)."""
    torch.manual_seed(5)
    model = Medium(dropout, checkpointed)
    with torch.no_grad():
        model.eval()(torch.zeros(1, N_IN, C_IN))
    return model.double().train()


class Shared(nn.Module):
    """``[B, 768, 3] -> [B, 768, 3]``: ONE attention and ONE dropout bound twice in the processor
    (``nn.Sequential(attn, drop, lin, attn, drop)``), a positional embedding ``[1, 192, E]`` owned
    by the root (a pixel tensor), the processor optionally under ``torch.utils.checkpoint``."""

    def __init__(self, dropout: float = 0.0, checkpointed: bool = False) -> None:
        super().__init__()
        e = 8
        self.enc = idx_flow.SpatialConv(768, _t(8, 4, 4)[0], filters=e)
        self.attn = idx_flow.SpatialSelfAttention(e, 2, dropout=dropout, attn_backend="manual")
        self.drop = nn.Dropout(dropout)
        self.proc = nn.Sequential(self.attn, self.drop, nn.Linear(e, e), self.attn, self.drop)
        self.pos = nn.Parameter(0.1 * torch.randn(1, 192, e))
        up, _, w = _t(4, 8, 4, True)
        self.dec = idx_flow.SpatialTransposeConv(768, up, w, filters=C_IN)
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.enc(x) + self.pos
        h = h + (checkpoint(self.proc, h, use_reentrant=False) if self.checkpointed else self.proc(h))
        return self.dec(h)


class Outer(nn.Module):
    """A model around a model: ``inner(lin(x))``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.lin = nn.Linear(C_IN, C_IN).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.lin(x))


def build_shared(dropout: float = 0.0, checkpointed: bool = False, outer: bool = False) -> nn.Module:
    torch.manual_seed(6)
    model = Shared(dropout, checkpointed)
    with torch.no_grad():
        model.eval()(torch.zeros(1, N_IN, C_IN))
    model = model.double().train()
    return Outer(model) if outer else model


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return (torch.randn(B, N_IN, C_IN, generator=gen, dtype=torch.float64),
            torch.randn(B, N_IN, C_IN, generator=gen, dtype=torch.float64))


def train(model: nn.Module, rank: int, world: int, seed_of=lambda step, rank: 1000 + step,
          calls: int = 1) -> dict:
    """STEPS SGD steps on this rank's rows, the model called ``calls`` times per step (a rollout
    ``model(model(x))``); each step's output, input and parameter gradients, and the metadata
    collectives of each step (forward + backward)."""
    from hpattn_dist.comm.counters import count_communication
    from hpattn_dist.grad_sync import sharded_mean, sync_gradients

    opt = torch.optim.SGD(model.parameters(), lr=LR)
    a, b = shard_bounds(N_IN, world)[rank]
    steps, meta = [], []
    for step in range(STEPS):
        x_full, target = data(step)
        x = x_full[:, a:b].clone().requires_grad_(True)
        torch.manual_seed(seed_of(step, rank))  # the generator the dropout seeds come from
        opt.zero_grad(set_to_none=True)
        with count_communication() as stats:
            out = x
            for _ in range(calls):
                out = model(out)
            sharded_mean((out - target[:, a:b]) ** 2, N_IN).backward()
        meta.append(stats.calls["all_gather.meta"])
        if world > 1:
            sync_gradients(model)
        steps.append({"out": out.detach(), "x_grad": x.grad.detach(),
                      "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()}})
        opt.step()
    return {"steps": steps, "meta": meta}


def _convert(model: nn.Module, group) -> nn.Module:
    from hpattn_dist.integrations.idx_flow import convert_model

    if isinstance(model, Outer):  # the inner model converted first, then the outer one
        model.inner = _convert(model.inner, group)
        return convert_model(model, group, pixelwise=(Outer, Shared), pixel_tensors={"inner.pos": 1})
    if isinstance(model, Shared):
        return convert_model(model, group, pixelwise=(Shared,), pixel_tensors={"pos": 1})
    return convert_model(model, group, pixelwise=(Medium,))


# --------------------------------------------------------------------------------------------
# One rank wrong inside a steady-state call
# --------------------------------------------------------------------------------------------


def _nudge(param: torch.Tensor) -> None:
    with torch.no_grad():
        param.add_(1e-3)


def _unnudge(param: torch.Tensor) -> None:
    with torch.no_grad():
        param.sub_(1e-3)


def _set(module: nn.Module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    return lambda: setattr(module, name, old)


WRONG = {
    # name: (make rank `last` wrong, returning an undo; fragment of the error every rank raises)
    "attention weight": (lambda m: (_nudge(m.blocks[0].attn.qkv_proj.weight),
                                    lambda: _unnudge(m.blocks[0].attn.qkv_proj.weight))[1],
                         "blocks.0.attn.qkv_proj.weight"),
    "gather kernel": (lambda m: (_nudge(m.enc[2].kernel), lambda: _unnudge(m.enc[2].kernel))[1],
                      "enc.2.kernel"),
    "attention scale": (lambda m: _set(m.blocks[1].attn, "scale", 0.3), "'scale': 0.3"),
    "attention dropout": (lambda m: _set(m.blocks[0].attn, "_dropout_p", 0.25), "'dropout_p': 0.25"),
    "feed-forward dropout": (lambda m: _set(m.blocks[1].ffn[2], "p", 0.3), "'p': 0.3"),
    "eval on one rank": (lambda m: (m.blocks[0].eval(), lambda: m.blocks[0].train())[1],
                         "training_modes_crc32"),
}


def _call(model: nn.Module, x: torch.Tensor) -> dict:
    """One call without gradients: what this rank raised (or None) and the collectives it made."""
    from hpattn_dist.comm.counters import count_communication

    got = {"error": None, "message": ""}
    with count_communication() as stats:
        try:
            with torch.no_grad():
                model(x)
        except Exception as err:  # noqa: BLE001 - what each rank raised is the result
            got.update(error=type(err).__name__, message=str(err))
    got["calls"] = dict(stats.calls)
    return got


def _pixel_tensor_wrong(group, rank: int, world: int) -> dict:
    """The root's positional embedding differs on the last rank, in a steady-state call."""
    model = _convert(build_shared(), group)
    a, b = shard_bounds(N_IN, world)[rank]
    x = data(0)[0][:, a:b]
    with torch.no_grad():
        for _ in range(2):
            model(x)
        if rank == world - 1:
            model.pos.add_(1e-3)
    return _call(model, x)


def _one_rank_wrong(group, rank: int, world: int) -> dict:
    model = _convert(build(dropout=0.1), group)
    a, b = shard_bounds(N_IN, world)[rank]
    x = data(0)[0][:, a:b]
    with torch.no_grad():
        for _ in range(2):  # the key is known: no layer agrees on its own any more
            model(x)
    res = {}
    for name, (make_wrong, fragment) in WRONG.items():
        undo = make_wrong(model) if rank == world - 1 else (lambda: None)
        got = {"fragment": fragment, **_call(model, x)}
        undo()
        torch.manual_seed(3)
        with torch.no_grad():
            got["after"] = model.eval()(x)  # a good call right after: every rank is usable
        model.train()
        res[name] = got
    # A different CPU generator on one rank: group rank 0's call seed on every rank.
    torch.manual_seed(9 if rank == 0 else 10 + rank)
    with torch.no_grad():
        res["generator"] = model(x)
    return res


def _rewrites_weights(module: nn.Module, args) -> None:
    with torch.no_grad():
        module.out_proj.weight.clamp_(-0.2, 0.2)


# --------------------------------------------------------------------------------------------
# The ranks
# --------------------------------------------------------------------------------------------


def _ranks(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from hpattn_dist.comm.counters import count_communication

    group = dist.new_group(list(range(world)))
    res = {"plain": train(_convert(build(), group), rank, world),
           "dropout": train(_convert(build(dropout=0.2), group), rank, world),
           "dropout checkpointed": train(_convert(build(dropout=0.2, checkpointed=True), group), rank, world)}
    model = _convert(build(dropout=0.2), group).eval()
    a, b = shard_bounds(N_IN, world)[rank]
    res["eval meta"] = []
    for step in range(3):
        with count_communication() as stats, torch.no_grad():
            model(data(step)[0][:, a:b])
        res["eval meta"].append(stats.calls["all_gather.meta"])
    model = build()
    model.blocks[1].attn.register_forward_pre_hook(_rewrites_weights)
    res["rewrites"] = train(_convert(model, group), rank, world)
    res["wrong"] = _one_rank_wrong(group, rank, world)
    res["pixel tensor wrong"] = _pixel_tensor_wrong(group, rank, world)
    for kind, (kwargs, calls, _) in SHARED.items():
        res[kind] = train(_convert(build_shared(**kwargs), group), rank, world, calls=calls)
    return res


SHARED = {
    # kind: (build_shared's arguments, model calls per step, metadata collectives per step once
    # the key repeats: one per converted model call; the nested model's call holds the inner
    # one's; a checkpointed processor's 4 layer calls are recomputed in the backward, after the
    # model call, and agree there on their own, Note [seeds in a model call])
    "shared": ({}, 1, 1),
    "shared twice per step": ({}, 2, 2),
    "nested": ({"outer": True}, 1, 2),
    "shared dropout twice": ({"dropout": 0.2}, 2, 2),
    "shared dropout twice checkpointed": ({"dropout": 0.2, "checkpointed": True}, 2, 2 + 2 * 4),
}


@functools.lru_cache(maxsize=None)
def _results(world: int) -> list[dict]:
    return run_ranks(_ranks, world, timeout=300.0)


@functools.lru_cache(maxsize=None)
def _reference(kind: str) -> dict:
    """The unconverted model on the full field (``plain``, ``rewrites``), or the converted one on
    one process without a process group (``dropout``: the seeds come from the same draws)."""
    if kind == "plain":
        return train(build(), 0, 1)
    if kind in SHARED:  # dropout: the converted model on one process (no checkpointing)
        kwargs, calls, _ = SHARED[kind]
        kwargs = {k: v for k, v in kwargs.items() if k != "checkpointed"}
        model = build_shared(**kwargs)
        return train(_convert(model, None) if kwargs.get("dropout") else model, 0, 1, calls=calls)
    if kind == "rewrites":
        model = build()
        model.blocks[1].attn.register_forward_pre_hook(_rewrites_weights)
        return train(model, 0, 1)
    model = _convert(build(dropout=0.2), None)
    return train(model, 0, 1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _errors(got: dict, ref: dict, rank: int, world: int) -> dict[str, float]:
    a, b = shard_bounds(N_IN, world)[rank]
    errors = {}
    for step, (mine, theirs) in enumerate(zip(got["steps"], ref["steps"])):
        errors[f"step {step} out"] = _rel(mine["out"], theirs["out"][:, a:b])
        errors[f"step {step} x_grad"] = _rel(mine["x_grad"], theirs["x_grad"][:, a:b])
        for name, grad in theirs["grads"].items():
            errors[f"step {step} grad {name}"] = _rel(mine["grads"][name], grad)
    return {k: v for k, v in errors.items() if not v <= RTOL}


WORLDS = [2, 3]


@pytest.mark.parametrize("world", WORLDS)
def test_one_metadata_collective_per_call_once_shapes_repeat(world: int) -> None:
    layers = 5 + 2 + 4  # gather layers, attention layers, feed-forward dropouts
    for rank, res in enumerate(_results(world)):
        # (A checkpointed block's recomputation runs in the backward, after the call: its layers
        # agree on their own there, Note [seeds in a model call].)
        for kind in ("plain", "dropout"):
            # First call: the model's agreement and each layer's own; then the model's only, with
            # the parameters changed by SGD between calls (and the masks' seeds new each call).
            assert res[kind]["meta"][0] == 1 + layers, (kind, rank, res[kind]["meta"])
            assert res[kind]["meta"][1:] == [1] * (STEPS - 1), (kind, rank, res[kind]["meta"])
        assert res["eval meta"][1:] == [1, 1], (rank, res["eval meta"])


@pytest.mark.parametrize("world", WORLDS)
def test_converted_medium_model_trains_exactly(world: int) -> None:
    for rank, res in enumerate(_results(world)):
        for kind in ("plain", "dropout", "dropout checkpointed"):
            ref = _reference("plain" if kind == "plain" else "dropout")
            bad = _errors(res[kind], ref, rank, world)
            assert not bad, (kind, f"rank {rank}/{world}", bad)


@pytest.mark.parametrize("world", WORLDS)
def test_weights_rewritten_during_the_call_agree_on_their_own_and_stay_exact(world: int) -> None:
    for rank, res in enumerate(_results(world)):
        bad = _errors(res["rewrites"], _reference("rewrites"), rank, world)
        assert not bad, (f"rank {rank}/{world}", bad)
        assert res["rewrites"]["meta"][1:] == [2] * (STEPS - 1), res["rewrites"]["meta"]


@pytest.mark.parametrize("name", list(WRONG))
@pytest.mark.parametrize("world", WORLDS)
def test_one_rank_wrong_raises_on_every_rank_at_the_call(world: int, name: str) -> None:
    got = [res["wrong"][name] for res in _results(world)]
    messages = {g["message"] for g in got}
    assert len(messages) == 1, messages  # the same error on every rank
    for rank, g in enumerate(got):
        assert g["error"] == "ValueError" and g["fragment"] in g["message"], (rank, g)
        # Raised at the call's start: its one metadata collective, no data exchanged.
        assert g["calls"] == {"all_gather.meta": 1}, (rank, g["calls"])


@pytest.mark.parametrize("world", WORLDS)
def test_after_an_error_the_next_call_is_exact(world: int) -> None:
    model = build(dropout=0.1).eval()
    with torch.no_grad():
        expected = model(data(0)[0])
    for rank, res in enumerate(_results(world)):
        a, b = shard_bounds(N_IN, world)[rank]
        for name in WRONG:
            assert _rel(res["wrong"][name]["after"], expected[:, a:b]) <= RTOL, (name, rank)


@pytest.mark.parametrize("world", WORLDS)
def test_a_rank_with_another_generator_drops_with_rank_0s_seeds(world: int) -> None:
    model = _convert(build(dropout=0.1), None)
    with torch.no_grad():
        for _ in range(2):
            model(data(0)[0])
        torch.manual_seed(9)  # rank 0's generator
        expected = model(data(0)[0])
    for rank, res in enumerate(_results(world)):
        a, b = shard_bounds(N_IN, world)[rank]
        assert _rel(res["wrong"]["generator"], expected[:, a:b]) <= RTOL, rank


@pytest.mark.parametrize("kind", list(SHARED))
@pytest.mark.parametrize("world", WORLDS)
def test_shared_layers_rollouts_and_nested_models_agree_once_per_model_call(world: int, kind: str) -> None:
    """A layer bound twice, a model called twice per step (its processor recomputed after both
    calls, with the masks of each call), a converted model inside a converted model: one metadata
    collective per converted model call once the key repeats, exact (dropout: equal to the
    converted model on one process, not checkpointed)."""
    meta = SHARED[kind][2]
    ref = _reference(kind)
    for rank, res in enumerate(_results(world)):
        assert res[kind]["meta"][1:] == [meta] * (STEPS - 1), (kind, rank, res[kind]["meta"])
        bad = _errors(res[kind], ref, rank, world)
        assert not bad, (kind, f"rank {rank}/{world}", bad)


@pytest.mark.parametrize("world", WORLDS)
def test_a_root_pixel_tensor_that_differs_raises_on_every_rank(world: int) -> None:
    got = [res["pixel tensor wrong"] for res in _results(world)]
    assert len({g["message"] for g in got}) == 1, got
    for rank, g in enumerate(got):
        assert g["error"] == "ValueError" and "pos (" in g["message"], (rank, g)
        assert g["calls"] == {"all_gather.meta": 1}, (rank, g["calls"])
