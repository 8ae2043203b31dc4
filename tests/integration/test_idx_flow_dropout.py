"""Element-wise dropout and the MLPs' batch norms inside converted idx-flow models.

``nn.Dropout`` (transformer feed-forward, ``SpatialViT.embed_dropout``, inside ``GlobalMLP`` /
``SpatialMLP``) draws its mask from another random stream than idx-flow once converted (Note
[pixel dropout on shards]), so in training the reference is the converted model on ONE process
(no process group): a run on 5 real gloo ranks (uneven shards: 48 and 192 pixels over 5) must
equal it to 1e-12 in float64, forward and backward, after ``sync_gradients``. What the masks must
be (rate, independence across positions, identity in eval) is checked on one process against
closed forms. Deterministic layers (the MLPs' ``BatchNorm1d``) are compared against the
unconverted idx-flow model itself.
"""

from __future__ import annotations

import copy
from functools import lru_cache

import idx_flow
import pytest
import torch
import torch.nn as nn
from idx_flow.utils import compute_connection_indices

from hpattn_dist.grad_sync import sync_gradients
from hpattn_dist.healpix import shard_bounds
from hpattn_dist.integrations.idx_flow import convert_model
from tests.harness import run_ranks

WORLD = 5
RTOL_P = 1e-12  # P ranks against one process, same masks: only summation orders differ
RTOL_REF = 1e-10  # against the unconverted idx-flow model
BATCH, C_IN, N_IN = 2, 3, 192


@lru_cache(maxsize=None)
def _table(nside_in: int, nside_out: int, k: int):
    return compute_connection_indices(nside_in, nside_out, k)


def _build(kind: str, dropout: float = 0.2) -> nn.Module:
    """A float64 model with its lazy parameters created; ``N_IN`` input pixels."""
    torch.manual_seed(7)
    if kind == "vit":  # embed dropout, feed-forward dropouts, attention dropout
        model = idx_flow.SpatialViT(48, _table(4, 2, 4)[0], embed_dim=8, depth=2, num_heads=2,
                                    mlp_ratio=2.0, output_dim=3, dropout=dropout,
                                    attn_backend="manual")
    elif kind == "mlps":  # BatchNorm1d and nn.Dropout over [B * N_r, C] rows; a replicated [B, C]
        model = nn.Sequential(
            idx_flow.SpatialMLP(48, _table(4, 2, 4)[0], hidden_units=(6, 5),
                                activations=("relu", "linear"), dropout=dropout,
                                use_batch_norm=True),
            idx_flow.GlobalMLP(hidden_units=(7, 4), activations=("gelu", "linear"),
                               dropout=dropout, use_batch_norm=True, residual=True),
            nn.Dropout(dropout),
            _Bottleneck(4, dropout),
        )
    else:
        raise ValueError(kind)
    with torch.no_grad():
        model.eval()(torch.zeros(1, N_IN, C_IN))  # idx-flow creates its lazy parameters here
    return model.double().train()


class _Bottleneck(nn.Module):
    """``x + Unsqueeze(Dropout(Linear(Squeeze(x))))``: dropout on a replicated ``[B, C]``."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.squeeze = idx_flow.Squeeze("mean")
        self.linear = nn.Linear(channels, channels)
        self.dropout = nn.Dropout(dropout)
        self.unsqueeze = idx_flow.Unsqueeze(48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.unsqueeze(self.dropout(self.linear(self.squeeze(x))))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(BATCH, N_IN, C_IN, generator=gen, dtype=torch.float64)
    w = torch.randn(BATCH, 48, 4, generator=gen, dtype=torch.float64)
    return x, w


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _train_step(model: nn.Module, rank: int, world: int) -> dict:
    """Two training forwards/backwards on this rank's shard: outputs, input grads, param grads."""
    x_full, w_full = _data()
    a, b = shard_bounds(N_IN, world)[rank]
    c, d = shard_bounds(48, world)[rank]
    outs, x_grads = [], []
    for step in range(2):
        torch.manual_seed(1000 + step)  # the generator group rank 0 draws the seeds from
        x = x_full[:, a:b].clone().requires_grad_(True)
        out = model(x)
        (out * w_full[:, c:d, : out.shape[-1]]).sum().backward()
        outs.append(out.detach())
        x_grads.append(x.grad)
    if world > 1:
        sync_gradients(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: buf.clone() for n, buf in model.named_buffers() if buf.is_floating_point()}
    return {"out": outs, "x_grad": x_grads, "grads": grads, "buffers": buffers}


def _ranks(rank: int, world: int) -> dict:
    results = {}
    for kind in ("vit", "mlps"):
        model = _build(kind)
        convert_model(model, pixelwise=(_Bottleneck,))
        results[kind] = _train_step(model, rank, world)
        # Without dropout the converted model is the unconverted one (the MLPs' BatchNorm1d included).
        model, ref = _build(kind, dropout=0.0), _build(kind, dropout=0.0)
        convert_model(model, pixelwise=(_Bottleneck,))
        results[kind + " p=0"] = _train_step(model, rank, world)
        results[kind + " p=0 ref"] = _train_step(ref, 0, 1) if rank == 0 else None

    # A 2-D input that is not replicated (different on each rank) is refused on every rank.
    dropout = convert_model(nn.Sequential(nn.Dropout(0.5))).train()
    try:
        dropout(torch.full((4, 3), float(rank)))
        results["refusal"] = "no error"
    except ValueError as err:
        results["refusal"] = str(err)
    return results


@pytest.fixture(scope="module")
def runs() -> tuple[list, dict]:
    one = _ranks(0, 1)  # one process, no process group: the function the ranks must reproduce
    return run_ranks(_ranks, WORLD, timeout=240.0), one


def _compare(got: dict, ref: dict, c: int, d: int, rtol: float) -> dict:
    errors = {}
    for step, (out, ref_out) in enumerate(zip(got["out"], ref["out"])):
        errors[f"out {step}"] = _rel(out, ref_out[:, c:d])
    # Relative to the whole gradient's norm: the bias of a Linear before a batch norm has a
    # gradient that is zero up to rounding, whose own relative error means nothing.
    scale = torch.stack([g.norm() for g in ref["grads"].values()]).norm()
    for name, grad in got["grads"].items():
        errors[f"grad {name}"] = float((grad - ref["grads"][name]).norm() / scale)
    for name, buf in got["buffers"].items():  # running means of zero-mean (normalised) inputs ~ 0
        ref_buf = ref["buffers"][name]
        errors[f"buffer {name}"] = float((buf - ref_buf).norm() / max(float(ref_buf.norm()), 1.0))
    return {k: v for k, v in errors.items() if not v <= rtol}


@pytest.mark.parametrize("kind", ["vit", "mlps"])
def test_training_with_dropout_is_the_same_on_5_ranks_as_on_1(runs, kind: str) -> None:
    per_rank, one = runs
    x_grads = []
    for rank, res in enumerate(per_rank):
        c, d = shard_bounds(48, WORLD)[rank]
        bad = _compare(res[kind], one[kind], c, d, RTOL_P)
        assert not bad, (f"rank {rank}/{WORLD} {kind}", bad)
        x_grads.append(res[kind]["x_grad"])
    for step in range(2):
        full = torch.cat([g[step] for g in x_grads], dim=1)
        assert _rel(full, one[kind]["x_grad"][step]) <= RTOL_P
    assert one[kind]["out"][0].ne(one[kind]["out"][1]).any()  # a fresh mask per step


@pytest.mark.parametrize("kind", ["vit", "mlps"])
def test_without_dropout_the_converted_model_is_idx_flow(runs, kind: str) -> None:
    per_rank, one = runs
    ref = per_rank[0][kind + " p=0 ref"]
    assert ref["buffers"] or kind == "vit"  # the MLPs' running statistics are compared
    for rank, res in enumerate(per_rank):
        c, d = shard_bounds(48, WORLD)[rank]
        bad = _compare(res[kind + " p=0"], ref, c, d, RTOL_REF)
        assert not bad, (f"rank {rank}/{WORLD} {kind}", bad)
    assert not _compare(one[kind + " p=0"], ref, 0, 48, RTOL_REF)


def test_a_2d_shard_is_refused_on_every_rank(runs) -> None:
    per_rank, one = runs
    assert one["refusal"] == "no error"  # one process: a [B, C] is trivially replicated
    for rank, res in enumerate(per_rank):
        assert "Dropout" in res["refusal"] and "crc" in res["refusal"], (rank, res["refusal"])


def test_masks_rate_and_independence_across_positions() -> None:
    p = 0.25
    dropout = convert_model(nn.Sequential(nn.Dropout(p))).train()
    torch.manual_seed(3)
    x = torch.ones(2, N_IN, 16, dtype=torch.float64)
    y = dropout(x)
    kept = y != 0
    assert torch.all(y[kept] == 1 / (1 - p))
    rate = 1 - kept.double().mean().item()
    assert abs(rate - p) < 0.025, rate  # 6144 draws: 4.5 standard deviations
    # Two equal shards of one field would hold pixels i and i + N/2 at the same local index: the
    # masks there must be independent (agreement p^2 + (1-p)^2 = 0.625), not equal.
    agree = (kept[:, : N_IN // 2] == kept[:, N_IN // 2:]).double().mean().item()
    assert 0.55 < agree < 0.70, agree
    assert (kept[0] != kept[1]).any()  # samples differ
    assert (kept[:, :, 0] != kept[:, :, 1]).any()  # channels differ
    torch.manual_seed(3)
    assert torch.equal(dropout(x), y)  # the default generator's state decides the mask
    assert not torch.equal(dropout(x), y)


def test_eval_and_p0_return_the_input_and_the_model_is_idx_flow() -> None:
    model = _build("mlps")
    ref = copy.deepcopy(model)
    convert_model(model, pixelwise=(_Bottleneck,))
    x, _ = _data()
    model.eval()
    ref.eval()
    assert torch.equal(model(x), ref(x))  # no attention: the same arithmetic, bitwise
    inner = model[2]
    assert type(inner).__name__ == "ShardedDropout" and inner(x) is x
    vit = _build("vit")
    vit_ref = copy.deepcopy(vit)
    convert_model(vit)
    vit.eval()
    vit_ref.eval()
    assert _rel(vit(x), vit_ref(x)) <= RTOL_P
    zero = convert_model(nn.Sequential(nn.Dropout(0.0))).train()
    assert zero(x) is x
    everything = convert_model(nn.Sequential(nn.Dropout(1.0))).train()
    assert torch.equal(everything(x), torch.zeros_like(x))  # as torch: zeros, not 0 / 0


def test_other_dropouts_are_refused() -> None:
    with pytest.raises(ValueError, match=r"AlphaDropout"):
        convert_model(nn.Sequential(nn.Linear(3, 3), nn.AlphaDropout(0.1)))
