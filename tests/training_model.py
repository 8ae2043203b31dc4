"""A small transformer block (LayerNorm + attention + MLP) for the training tests and benchmarks.

``Block(attn)`` wraps any attention layer taking ``[B, N, E]``: the single-device oracle
(:class:`~hpattn_dist.oracle.SpatialSelfAttention`) for the float64 reference, the distributed
layer on the ranks. Parameters are created from a fixed seed, so both carry the same weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from hpattn_dist import DistributedSpatialSelfAttention, SpatialSelfAttention

B, E, H = 2, 16, 4


class Block(nn.Module):
    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(E), attn, nn.LayerNorm(E)
        self.mlp = nn.Sequential(nn.Linear(E, 2 * E), nn.GELU(), nn.Linear(2 * E, E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CrossBlock(nn.Module):
    """LayerNorm + cross-attention from ``x`` to the block's fixed source field ``[B, NK, E_kv]`` + MLP."""

    def __init__(self, attn: nn.Module, x_kv: torch.Tensor) -> None:
        super().__init__()
        self.norm1, self.norm_kv = nn.LayerNorm(E), nn.LayerNorm(x_kv.shape[-1])
        self.attn, self.norm2 = attn, nn.LayerNorm(E)
        self.mlp = nn.Sequential(nn.Linear(E, 2 * E), nn.GELU(), nn.Linear(2 * E, E))
        self.register_buffer("x_kv", x_kv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), self.norm_kv(self.x_kv))
        return x + self.mlp(self.norm2(x))


def make_block(distributed: bool, dropout: float = 0.0, **kw) -> Block:
    """float64 block, weights from seed 0 (identical for the oracle and the distributed layer)."""
    torch.manual_seed(0)
    cls = DistributedSpatialSelfAttention if distributed else SpatialSelfAttention
    if distributed:
        kw.setdefault("healpix_field", False)  # the tests' fields are point sets of any size
    kw.setdefault("attn_backend", "manual")
    block = Block(cls(E, H, dropout=dropout, **kw)).double()
    with torch.no_grad():  # LayerNorm starts at the identity; move it off so its gradients matter
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return block


def field(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ``[B, n, E]`` and loss weights ``[B, n, E]`` (float64)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, n, E, generator=g, dtype=torch.float64),
            torch.randn(B, n, E, generator=g, dtype=torch.float64))


def bounds(n: int, world: int, rank: int) -> slice:
    """Contiguous, uneven shard of ``n`` pixels."""
    sizes = [n // world + (1 if r < n % world else 0) for r in range(world)]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])
