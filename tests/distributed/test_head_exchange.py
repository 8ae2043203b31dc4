"""``pixels_to_heads`` / ``heads_to_pixels`` on real gloo ranks against slices of the full tensors.

Rank r holds pixels ``rows(r)`` of full tensors ``X [B, H, N, D]``; after ``pixels_to_heads`` it
must hold ``X[:, heads(r)]`` (every pixel), and ``heads_to_pixels`` must invert that. Backward:
the gradient that reaches rank r's input is the slice of the full upstream gradient that the
forward moved away from it. Uneven shards, an empty shard, and one or three tensors at once.
"""

from __future__ import annotations

import functools

import pytest
import torch

from hpattn_dist.comm import count_communication
from hpattn_dist.comm.groups import resolve_group
from hpattn_dist.comm.head_exchange import heads_to_pixels, pixels_to_heads
from tests.harness import run_ranks

WORLD = 3
B, H, D = 2, 6, 4
SIZES = {"uneven": [4, 0, 7], "even": [3, 3, 3]}


def _full(name: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, sum(SIZES[name]), D, generator=g, dtype=torch.float64)


def _rows(sizes: list[int], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _heads(rank: int) -> slice:
    h = H // WORLD
    return slice(rank * h, (rank + 1) * h)


def _job(rank: int, world: int) -> dict:
    info = resolve_group(None)
    out = {}
    for name, sizes in SIZES.items():
        for t in (1, 3):
            xs = [_full(name, 10 * i)[:, :, _rows(sizes, rank)].clone().requires_grad_() for i in range(t)]
            with count_communication() as fwd:
                ys = pixels_to_heads(xs, info, sizes, "test")
            # Only the first output takes part in the loss: the others get no gradient (None).
            upstream = _full(name, 100)[:, _heads(rank)]
            with count_communication() as bwd:
                ys[0].backward(upstream)
            back = heads_to_pixels([y.detach() for y in ys], info, sizes, "back")
            ys2 = [y.detach().clone().requires_grad_() for y in ys]
            # The gradient as the exchange returns it (a leaf's .grad may be restrided).
            dy_layouts = []
            for y in ys2:
                y.register_hook(lambda g: dy_layouts.append(g.transpose(1, 2).is_contiguous()))
            zs = heads_to_pixels(ys2, info, sizes, "test2")
            torch.autograd.backward(zs, [_full(name, 200 + i)[:, :, _rows(sizes, rank)] for i in range(t)])
            out[(name, t)] = {
                "ys": [y.detach() for y in ys], "contiguous": all(y.is_contiguous() for y in ys),
                "dxs": [x.grad for x in xs], "back": [z.detach() for z in back],
                "back_strides": [z.transpose(1, 2).stride() for z in back],
                "dys": [y.grad for y in ys2], "dy_layouts": dy_layouts,
                "fwd": fwd.as_dict()["bytes_sent"], "bwd": bwd.as_dict()["bytes_sent"],
            }
    return out


@functools.lru_cache(maxsize=None)
def _results() -> list[dict]:
    return run_ranks(_job, WORLD, timeout=120.0)


@pytest.mark.parametrize("name", sorted(SIZES))
@pytest.mark.parametrize("t", [1, 3])
def test_pixels_to_heads_and_back(name, t):
    sizes = SIZES[name]
    n, h = sum(sizes), H // WORLD
    for rank, res in enumerate(_results()):
        r = res[(name, t)]
        for i in range(t):
            full = _full(name, 10 * i)
            assert torch.equal(r["ys"][i], full[:, _heads(rank)]), (rank, i)
            assert torch.equal(r["back"][i], full[:, :, _rows(sizes, rank)]), (rank, i)
            # Backward of pixels_to_heads: this rank's rows of every rank's upstream slice; the
            # outputs left out of the loss contribute zeros.
            expected = _full(name, 100)[:, :, _rows(sizes, rank)] if i == 0 else \
                torch.zeros(B, H, sizes[rank], D, dtype=torch.float64)
            assert torch.equal(r["dxs"][i], expected), (rank, i)
            # Backward of heads_to_pixels: this rank's heads of the full upstream gradient.
            assert torch.equal(r["dys"][i], _full(name, 200 + i)[:, _heads(rank)]), (rank, i)
        n_r = sizes[rank]
        assert r["contiguous"]
        # The attention output's gradient arrives as a [B, N, h, D] view, the layout the CPU flash
        # backward reads without a copy (Note [head exchange memory]).
        assert r["dy_layouts"] == [True] * t, r["dy_layouts"]
        # [B, N_r, T, H, D] underneath, so the layer's transpose + reshape is a view when T = 1
        assert r["back_strides"] == [(max(n_r, 1) * t * H * D, t * H * D, D, 1)] * t, r["back_strides"]
        assert r["fwd"] == {"test": t * (H - h) * n_r * B * D * 8}, r["fwd"]
        assert r["bwd"] == {"test.grad": t * h * (n - n_r) * B * D * 8}, r["bwd"]
