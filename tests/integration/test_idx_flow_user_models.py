"""Users' own idx-flow models, converted by convert_model, trained three SGD steps on P ranks.

Eight models written the way earth-system users write them from idx-flow's public classes (issue 25):

- ``unet``: a U-Net with a ``torch.cat`` skip (same-grid SpatialConv, SpatialPooling down,
  SpatialGroupNorm, SpatialUpsampling up, a SpatialConv on the concatenation), the residual of a
  same-grid convolution, and a forward hook that rescales the group norm's output;
- ``epd``: an encoder-processor-decoder whose processor is ``nn.Sequential(attn, lin, attn)`` (one
  attention bound twice) and whose root also binds the attention as ``self.global_attn``;
- ``classifier``: idx-flow's tutorial ViT classifier, ``SpatialViT -> Squeeze -> nn.Linear``,
  trained with cross entropy on the REPLICATED logits (``replicated_loss``), a hook on the Squeeze;
- ``autoencoder``: the README's spherical autoencoder on RING input, its batch norm bound as both
  ``self.bn1`` and ``self.norm`` (the forward uses ``self.norm``), a forward pre-hook on it;
- ``forecaster``: a FiLM-conditioned forecaster with a 3-step rollout in its forward, a static
  orography buffer ``[N, 1]`` declared in ``pixel_tensors``, a replicated conditioning vector;
- ``discriminator``: ``spectral_norm`` / ``weight_norm`` parametrizations on SpatialConv kernels and
  on the linear head, max pooling, a binary cross entropy on the replicated score;
- ``checkpointed``: transformer block and a convolution block under ``torch.utils.checkpoint``;
- ``posembed``: a user positional embedding ``nn.Parameter([1, N, E])`` declared in
  ``pixel_tensors``, a subclass of SpatialConv with its own ``__init__``, reachable through two
  parents (``self.first = self.body[0]``), a hook on the attention.

Reference: the unconverted model in float64 on the full field, trained in THIS process (three SGD
steps, the single-device loss). On real gloo ranks (world 2..5, one spawned group per world size,
all models in it) each rank converts the same model over an explicit group, feeds its
``shard_bounds`` range, takes its share of the loss (Note [one loss rule] in
``hpattn_dist/grad_sync.py``), runs ``sync_gradients`` and SGD. Compared at relative error 1e-10:
every step's output, input gradient and every parameter gradient, and the parameters after the
third step. The same ranks also check: ``torch.save`` of a converted model (raises until its group
is bound, then equals), a skewed input split (the same error on every rank), and that a converted
model's gather layers make no metadata collective of their own once shapes repeat.
"""

from __future__ import annotations

import copy
import functools
import io
from typing import Callable

import idx_flow
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from idx_flow.utils import compute_connection_indices
from torch.nn.utils import parametrizations
from torch.utils.checkpoint import checkpoint

from hpattn_dist.healpix import shard_bounds
from tests.harness import run_ranks

RTOL = 1e-10
B = 2
STEPS = 3
LR = 0.05


@functools.lru_cache(maxsize=None)
def _t(nside_in: int, nside_out: int, k: int, weights: bool = False):
    return compute_connection_indices(nside_in, nside_out, k, return_weights=weights)


class UNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inc = idx_flow.SpatialConv(192, _t(4, 4, 9)[0], filters=6)
        self.res = idx_flow.SpatialConv(192, _t(4, 4, 9)[0], filters=6)
        self.down = idx_flow.SpatialPooling(48, _t(4, 2, 4)[0], pool_type="mean")
        self.mid = idx_flow.SpatialConv(48, _t(2, 2, 9)[0], filters=8)
        self.gn = idx_flow.SpatialGroupNorm(2, 8)
        up, dist_up = _t(2, 4, 4)
        self.up = idx_flow.SpatialUpsampling(192, up, dist_up)
        self.out = idx_flow.SpatialConv(192, _t(4, 4, 9)[0], filters=3)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.act(self.inc(x))
        skip = skip + torch.tanh(self.res(skip))
        h = self.act(self.gn(self.mid(self.down(skip))))
        return self.out(torch.cat([skip, self.up(h)], dim=-1))


class EncoderProcessorDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = idx_flow.SpatialConv(48, _t(4, 2, 4)[0], filters=8)
        self.attn = idx_flow.SpatialSelfAttention(8, 2, attn_backend="manual")
        self.proc = nn.Sequential(self.attn, nn.Linear(8, 8), self.attn)
        self.global_attn = self.attn
        self.norm = idx_flow.SpatialLayerNorm(8)
        up, _, w = _t(2, 4, 4, True)
        self.dec = idx_flow.SpatialTransposeConv(192, up, w, filters=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.enc(x)
        h = h + self.proc(h)
        h = self.norm(h + self.global_attn(h))
        return self.dec(h)


class ViTClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vit = idx_flow.SpatialViT(48, _t(4, 2, 4)[0], embed_dim=8, depth=1, num_heads=2,
                                       mlp_ratio=2.0, attn_backend="manual")
        self.pool = idx_flow.Squeeze("mean")
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.vit(x)))


class Autoencoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # No bias before a batch norm: its gradient is zero up to rounding, no relative error.
        self.enc1 = idx_flow.SpatialConv(48, _t(4, 2, 4)[0], filters=6, bias=False)
        self.enc2 = idx_flow.SpatialConv(12, _t(2, 1, 4)[0], filters=8, bias=False)
        up1, _, w1 = _t(1, 2, 4, True)
        up2, _, w2 = _t(2, 4, 4, True)
        self.dec1 = idx_flow.SpatialTransposeConv(48, up1, w1, filters=6)
        self.dec2 = idx_flow.SpatialTransposeConv(192, up2, w2, filters=3)
        self.bn1 = idx_flow.SpatialBatchNorm(6)
        self.norm = self.bn1  # two names of one module; the forward uses the second
        self.bn2 = idx_flow.SpatialBatchNorm(8)
        self.activation = nn.SELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.activation(self.bn2(self.enc2(self.activation(self.norm(self.enc1(x))))))
        return self.dec2(self.activation(self.dec1(z)))


class FiLMForecaster(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.step_net = idx_flow.SpatialConv(192, _t(4, 4, 9)[0], filters=4)
        self.film = nn.Linear(3, 8)
        self.out = nn.Linear(4, 2)
        self.register_buffer("orography", torch.linspace(-1.0, 1.0, 192).reshape(192, 1) ** 2)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(cond).chunk(2, dim=-1)  # [B, 4] each, replicated
        outs = []
        for _ in range(3):
            h = torch.cat([x, self.orography.expand(x.shape[0], -1, -1)], dim=-1)
            h = torch.tanh(self.step_net(h) * (1 + gamma[:, None]) + beta[:, None])
            x = x + self.out(h)
            outs.append(x)
        return torch.cat(outs, dim=-1)


class Discriminator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = idx_flow.SpatialConv(48, _t(4, 2, 4)[0], filters=6)
        self.conv2 = idx_flow.SpatialConv(12, _t(2, 1, 4)[0], filters=8)
        self.act = nn.LeakyReLU(0.2)
        self.pool = idx_flow.Squeeze("max")
        self.head = nn.Linear(8, 1)

    def parametrize(self) -> None:
        parametrizations.spectral_norm(self.conv1, name="kernel")
        parametrizations.weight_norm(self.conv2, name="kernel")
        parametrizations.spectral_norm(self.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.act(self.conv2(self.act(self.conv1(x))))))


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = idx_flow.SpatialConv(48, _t(4, 2, 4)[0], filters=8)
        self.blocks = nn.ModuleList([
            idx_flow.SpatialTransformerBlock(8, 2, mlp_ratio=2.0, attn_backend="manual"),
            nn.Sequential(idx_flow.SpatialConv(48, _t(2, 2, 9)[0], filters=8), nn.GELU()),
        ])
        up, _, w = _t(2, 4, 4, True)
        self.dec = idx_flow.SpatialTransposeConv(192, up, w, filters=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = checkpoint(block, h, use_reentrant=False)
        return self.dec(h)


class MyConv(idx_flow.SpatialConv):
    """A user's subclass: its own defaults, idx-flow's forward."""

    def __init__(self, output_points: int, table) -> None:
        super().__init__(output_points, table, filters=8, weight_init="kaiming_normal")


class PosEmbedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(MyConv(48, _t(4, 2, 4)[0]), nn.GELU(),
                                  idx_flow.SpatialTransformerBlock(8, 2, mlp_ratio=2.0,
                                                                   attn_backend="manual"))
        self.first = self.body[0]  # reachable through two parents
        self.pos = nn.Parameter(0.1 * torch.randn(1, 48, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x) + self.pos
        for module in list(self.body)[1:]:
            h = module(h)
        return self.head(h)


def _rescale(module: nn.Module, args, out):
    return out * 1.5


def _shift_input(module: nn.Module, args):
    return (args[0] + 0.25,)


# kind -> (builder, input channels, output pixels (None: replicated), hooks, convert_model kwargs)
MODELS: dict[str, tuple[Callable[[], nn.Module], int, object, Callable, dict]] = {
    "unet": (UNet, 3, 192, lambda m: m.gn.register_forward_hook(_rescale), {"pixelwise": (UNet,)}),
    "epd": (EncoderProcessorDecoder, 3, 192, lambda m: None, {"pixelwise": (EncoderProcessorDecoder,)}),
    "classifier": (ViTClassifier, 3, None, lambda m: m.pool.register_forward_hook(_rescale),
                   {"pixelwise": (ViTClassifier,)}),
    "autoencoder": (Autoencoder, 3, 192, lambda m: m.bn1.register_forward_pre_hook(_shift_input),
                    {"pixelwise": (Autoencoder,)}),
    "forecaster": (FiLMForecaster, 2, 192, lambda m: None,
                   {"pixelwise": (FiLMForecaster,), "pixel_tensors": {"orography": 0}}),
    "discriminator": (Discriminator, 3, None, lambda m: None, {"pixelwise": (Discriminator,)}),
    "checkpointed": (Checkpointed, 3, 192, lambda m: None, {"pixelwise": (Checkpointed,)}),
    "posembed": (PosEmbedNet, 3, 48, lambda m: m.body[2].attn.register_forward_hook(_rescale),
                 {"pixelwise": (PosEmbedNet,), "pixel_tensors": {"pos": 1}}),
}


def build(kind: str) -> nn.Module:
    """The model of ``kind`` in float64 with its lazy parameters created (the same in every process)."""
    make, c_in, _, hooks, _ = MODELS[kind]
    torch.manual_seed(sum(map(ord, kind)))
    model = make()
    with torch.no_grad():
        args = (torch.zeros(1, 192, c_in),) + ((torch.zeros(1, 3),) if kind == "forecaster" else ())
        model.eval()(*args)  # idx-flow creates its lazy parameters here, in float32
    model = model.double().train()
    if kind == "discriminator":  # after double(): its power iterations at init run in float64
        model.parametrize()
    hooks(model)
    return model


def data(kind: str, step: int) -> dict:
    """Step ``step``'s full inputs and targets of ``kind`` (float64)."""
    _, c_in, n_out, _, _ = MODELS[kind]
    gen = torch.Generator().manual_seed(1000 * step + sum(map(ord, kind)))
    out = {"x": torch.randn(B, 192, c_in, generator=gen, dtype=torch.float64)}
    if kind == "forecaster":
        out["cond"] = torch.randn(B, 3, generator=gen, dtype=torch.float64)
    if kind == "classifier":
        out["labels"] = torch.randint(0, 5, (B,), generator=gen)
    elif kind == "discriminator":
        out["labels"] = torch.randint(0, 2, (B, 1), generator=gen).double()
    else:
        channels = {"forecaster": 6, "posembed": 3}.get(kind, 3)
        out["target"] = torch.randn(B, n_out, channels, generator=gen, dtype=torch.float64)
    return out


def loss_share(kind: str, out: torch.Tensor, d: dict, rows: slice, world: int) -> torch.Tensor:
    """This rank's share of the single-device loss (Note [one loss rule]); world 1: the loss."""
    from hpattn_dist.grad_sync import replicated_loss, sharded_mean

    if kind == "classifier":
        return replicated_loss(F.cross_entropy(out, d["labels"]))
    if kind == "discriminator":
        return replicated_loss(F.binary_cross_entropy_with_logits(out, d["labels"]))
    n_out = d["target"].shape[1]
    return sharded_mean((out - d["target"][:, rows]) ** 2, n_out)


def call(model: nn.Module, kind: str, d: dict, x: torch.Tensor) -> torch.Tensor:
    return model(x, d["cond"]) if kind == "forecaster" else model(x)


def train(model: nn.Module, kind: str, world: int, rank: int) -> dict:
    """Three SGD steps on this rank's shard; what each step saw, as plain tensors."""
    from hpattn_dist.grad_sync import sync_gradients

    opt = torch.optim.SGD(model.parameters(), lr=LR)
    n_out = MODELS[kind][2]
    a, b = shard_bounds(192, world)[rank]
    c, e = shard_bounds(n_out, world)[rank] if n_out else (0, 0)
    steps = []
    for step in range(STEPS):
        d = data(kind, step)
        x = d["x"][:, a:b].clone().requires_grad_(True)
        out = call(model, kind, d, x)
        opt.zero_grad(set_to_none=True)
        loss_share(kind, out, d, slice(c, e), world).backward()
        if world > 1:
            sync_gradients(model)
        steps.append({"out": out.detach(), "x_grad": x.grad.detach(),
                      "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                if p.grad is not None}})
        opt.step()
    steps.append({"params": {n: p.detach().clone() for n, p in model.named_parameters()}})
    return {"steps": steps, "rows": (a, b), "out_rows": (c, e)}


@functools.lru_cache(maxsize=None)
def reference(kind: str) -> dict:
    """The unconverted model trained on the full field in this process."""
    return train(build(kind), kind, 1, 0)


# --------------------------------------------------------------------------------------------
# Ranks
# --------------------------------------------------------------------------------------------


def _pickle_roundtrip(model: nn.Module, kind: str, group, rank: int, world: int) -> dict:
    from hpattn_dist.integrations.idx_flow import convert_model

    d = data(kind, STEPS)
    a, b = shard_bounds(192, world)[rank]
    with torch.no_grad():
        expected = call(model, kind, d, d["x"][:, a:b])
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    res = {}
    try:
        with torch.no_grad():
            call(loaded, kind, d, d["x"][:, a:b])
        res["unbound_error"] = None
    except RuntimeError as err:
        res["unbound_error"] = str(err)
    assert convert_model(loaded, group, **MODELS[kind][4]) is loaded  # binds the group again
    with torch.no_grad():
        res["rebound_equal"] = torch.equal(call(loaded, kind, d, d["x"][:, a:b]), expected)
    return res


def _skewed_split(model: nn.Module, rank: int, world: int) -> str:
    sizes = [b - a for a, b in shard_bounds(192, world)]
    sizes[0], sizes[-1] = sizes[0] + 5, sizes[-1] - 5
    start = sum(sizes[:rank])
    x = data("unet", 0)["x"][:, start:start + sizes[rank]]
    try:
        model(x)
    except ValueError as err:
        return str(err)
    return "no error"


def _metadata_per_call(group, rank: int, world: int) -> list[int]:
    """all_gather.meta calls in each of 3 calls of a converted model of 4 gather layers and a
    batch norm in training."""
    from hpattn_dist.comm.counters import count_communication
    from hpattn_dist.integrations.idx_flow import convert_model

    torch.manual_seed(0)
    model = nn.Sequential(idx_flow.SpatialConv(192, _t(4, 4, 9)[0], filters=4),
                          idx_flow.SpatialBatchNorm(4),
                          idx_flow.SpatialConv(48, _t(4, 2, 4)[0], filters=4),
                          idx_flow.SpatialConv(48, _t(2, 2, 9)[0], filters=4),
                          idx_flow.SpatialTransposeConv(192, *_t(2, 4, 4, True)[::2], filters=2))
    model(torch.zeros(1, 192, 3))
    convert_model(model, group)
    a, b = shard_bounds(192, world)[rank]
    x = torch.randn(B, 192, 3)[:, a:b].requires_grad_(True)
    calls = []
    for _ in range(3):
        with count_communication() as stats:
            model(x).sum().backward()
        calls.append(stats.calls["all_gather.meta"])
    return calls


class FirstSample(nn.Module):
    """A flag argument changes the shapes the layers see (``B`` 1 or 2) with the same input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = idx_flow.SpatialConv(48, _t(4, 2, 4)[0], filters=2)

    def forward(self, x: torch.Tensor, first_only: bool = False) -> torch.Tensor:
        return self.conv(x[:1] if first_only else x)


def _flag_changes_shapes(group, rank: int, world: int) -> list[bool]:
    """Calls with first_only False, True, False: each equals the unconverted model's rows."""
    from hpattn_dist.integrations.idx_flow import convert_model

    torch.manual_seed(0)
    model = FirstSample()
    model(torch.zeros(1, 192, 3))
    reference = copy.deepcopy(model)
    convert_model(model, group, pixelwise=(FirstSample,))
    x = torch.randn(B, 192, 3)
    (a, b), (c, d) = shard_bounds(192, world)[rank], shard_bounds(48, world)[rank]
    with torch.no_grad():
        return [torch.equal(model(x[:, a:b], flag), reference(x, flag)[:, c:d])
                for flag in (False, True, False)]


def _ranks(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from hpattn_dist.integrations.idx_flow import convert_model

    group = dist.new_group(list(range(world)))  # an explicit group: pickling must drop it
    res: dict = {}
    for kind in MODELS:
        model = build(kind)
        converted = convert_model(model, group, **MODELS[kind][4])
        res[kind] = train(converted, kind, world, rank)
        if kind == "unet":
            res["pickle"] = _pickle_roundtrip(converted, kind, group, rank, world)
            res["skewed"] = _skewed_split(converted, rank, world)
    res["metadata_per_call"] = _metadata_per_call(group, rank, world)
    res["flag_calls"] = _flag_changes_shapes(group, rank, world)
    return res


@functools.lru_cache(maxsize=None)
def _results(world: int) -> list[dict]:
    return run_ranks(_ranks, world, timeout=300.0)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _errors(kind: str, got: dict) -> dict[str, float]:
    ref = reference(kind)
    (a, b), (c, e) = got["rows"], got["out_rows"]
    errors: dict[str, float] = {}
    for step, (mine, theirs) in enumerate(zip(got["steps"][:STEPS], ref["steps"][:STEPS])):
        ref_out = theirs["out"] if MODELS[kind][2] is None else theirs["out"][:, c:e]
        errors[f"step {step} out"] = _rel(mine["out"], ref_out)
        errors[f"step {step} x_grad"] = _rel(mine["x_grad"], theirs["x_grad"][:, a:b])
        assert set(mine["grads"]) == set(theirs["grads"]), (kind, step)
        for name, grad in theirs["grads"].items():
            errors[f"step {step} grad {name}"] = _rel(mine["grads"][name], grad)
    for name, param in ref["steps"][STEPS]["params"].items():
        errors[f"param {name} after {STEPS} steps"] = _rel(got["steps"][STEPS]["params"][name], param)
    return errors


@pytest.mark.parametrize("world", [2, 3, 4, 5])
def test_users_models_train_exactly(world: int) -> None:
    results = _results(world)
    for rank, res in enumerate(results):
        for kind in MODELS:
            bad = {k: v for k, v in _errors(kind, res[kind]).items() if not v <= RTOL}
            assert not bad, (f"{kind} rank {rank}/{world}", bad)


@pytest.mark.parametrize("world", [2, 3, 4, 5])
def test_pickled_model_raises_until_bound_then_equals(world: int) -> None:
    for res in _results(world):
        assert res["pickle"]["unbound_error"] is not None
        assert "bind_process_group" in res["pickle"]["unbound_error"]
        assert res["pickle"]["rebound_equal"]


@pytest.mark.parametrize("world", [2, 3, 4, 5])
def test_skewed_split_is_refused_on_every_rank(world: int) -> None:
    messages = {res["skewed"] for res in _results(world)}
    assert len(messages) == 1
    (message,) = messages
    expected = [b - a for a, b in shard_bounds(192, world)]
    assert f"shard_bounds(192, {world}) = {expected}" in message, message


@pytest.mark.parametrize("world", [2, 3, 4, 5])
def test_gather_layers_agree_once_per_model_call(world: int) -> None:
    # First call: the model's agreement and each of the 5 layers' own; then the model's only.
    for res in _results(world):
        assert res["metadata_per_call"] == [6, 1, 1], res["metadata_per_call"]
        # A non-tensor argument is part of the call's key: a flag that changes the layers' shapes
        # makes another key, not a stale plan.
        assert res["flag_calls"] == [True, True, True], res["flag_calls"]
