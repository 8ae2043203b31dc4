"""checkpoint_context_fn with WINDOWED attention (the local layer, windowed cross-attention): the
policy saves ``hpattn::window_attention_fwd`` like the global ops (Note [checkpointing without
replaying communication]), so the backward sends exactly the bytes of an un-checkpointed block
and dropout is that of the forward whatever ``preserve_rng_state`` says. Before, the window op
was recomputed: its agreement and forward halo ran again in the backward, and with
``preserve_rng_state=False`` the recomputed dropout differed from the forward's (gradients off by
0.14-0.32 relative on 2 ranks, no error).

References: without dropout, float64 dense attention over healpy's windows
(``tests.local_reference``); with dropout, the same block un-checkpointed (its dropout is tested
against the reference keep mask in tests/distributed/test_local_attention.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from hpattn_dist import (
    DistributedLocalSpatialSelfAttention, DistributedSpatialCrossAttention, checkpoint_context_fn,
    count_communication, healpix,
)
from tests.harness import run_ranks
from tests.local_reference import healpy_window_mask, reference_local_attention

E, H, NSIDE, W = 8, 2, 4, 2
N = 12 * NSIDE**2


class Block(nn.Module):
    """``x + attn(lin(x))`` with the attention called twice (an aliased layer)."""

    def __init__(self, attn: nn.Module, cross: bool) -> None:
        super().__init__()
        self.attn, self.lin, self.cross = attn, nn.Linear(E, E), cross

    def call(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x) if self.cross else self.attn(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.call(x)
        return x + self.call(self.lin(x))


def _block(kind: str, dropout: float) -> Block:
    torch.manual_seed(0)
    if kind == "local":
        attn = DistributedLocalSpatialSelfAttention(E, H, dropout=dropout, window_nside=W)
    else:
        attn = DistributedSpatialCrossAttention(E, H, dropout=dropout, window_nside=W)
    return Block(attn, kind == "cross").double()


def _run(block: Block, x: torch.Tensor, policy: bool) -> dict:
    x = x.clone().requires_grad_()
    block.zero_grad()
    torch.manual_seed(11)
    if policy:
        y = checkpoint(block, x, use_reentrant=False, preserve_rng_state=False, context_fn=checkpoint_context_fn)
    else:
        y = block(x)
    torch.rand(3)  # the user's code draws random numbers between forward and backward
    with count_communication() as bwd:
        y.square().sum().backward()
    return {"y": y.detach(), "dx": x.grad, "dW": block.attn.out_proj.weight.grad.clone(),
            "dlin": block.lin.weight.grad.clone(), "bwd": dict(bwd.bytes_sent)}


def _job(rank: int, world: int, kind: str, dropout: float) -> dict:
    lo, hi = healpix.shard_bounds(N, world)[rank]
    x = torch.randn(1, N, E, dtype=torch.float64, generator=torch.Generator().manual_seed(1))[:, lo:hi]
    block = _block(kind, dropout)
    return {"plain": _run(block, x, False), "policy": _run(block, x, True), "lo": lo, "hi": hi,
            "state": {k: v.clone() for k, v in block.state_dict().items()}}


def _reference_output(state: dict) -> torch.Tensor:
    """The block in float64 on the full field, attention over healpy's windows."""
    allowed = healpy_window_mask(NSIDE, W, "neighbourhood")
    x = torch.randn(1, N, E, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sd = {k[len("attn."):]: v for k, v in state.items() if k.startswith("attn.")}
    d = E // H

    def attn(t: torch.Tensor) -> torch.Tensor:
        if "qkv_proj.weight" in sd:
            q, k, v = (t @ sd["qkv_proj.weight"].T + sd["qkv_proj.bias"]).reshape(1, N, 3, H, d).permute(2, 0, 3, 1, 4)
        else:
            q = (t @ sd["q_proj.weight"].T + sd["q_proj.bias"]).reshape(1, N, H, d).transpose(1, 2)
            k, v = (t @ sd["kv_proj.weight"].T + sd["kv_proj.bias"]).reshape(1, N, 2, H, d).permute(2, 0, 3, 1, 4)
        out = reference_local_attention(q, k, v, allowed).transpose(1, 2).reshape(1, N, E)
        return out @ sd["out_proj.weight"].T + sd["out_proj.bias"]

    x = x + attn(x)
    return x + attn(x @ state["lin.weight"].T + state["lin.bias"])


@pytest.mark.parametrize("kind", ["local", "cross"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_policy_keeps_the_window_op(kind, dropout):
    for res in run_ranks(_job, 2, kind, dropout, timeout=120.0):
        plain, policy = res["plain"], res["policy"]
        if dropout == 0.0:
            want = _reference_output(res["state"])[:, res["lo"]:res["hi"]]
            torch.testing.assert_close(plain["y"], want, rtol=1e-10, atol=1e-12)
        for key in ("y", "dx", "dW", "dlin"):
            torch.testing.assert_close(policy[key], plain[key], rtol=1e-12, atol=1e-14, msg=key)
        assert policy["bwd"] == plain["bwd"], (policy["bwd"], plain["bwd"])
