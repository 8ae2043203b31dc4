"""A small HEALPix transformer and a synthetic task on the sphere, shared by the launch scripts.

Public pieces (used by ``launch/train.py`` and the DeepSpeed example):

- :class:`ModelConfig`: model and data sizes, checked on construction.
- :func:`build_model`: the single-device model (built from :class:`SpatialSelfAttention`; turn it
  into a sequence-parallel one with :func:`hpattn_dist.convert_spatial_attention`).
- :func:`make_batch`: a synthetic batch ``(x [B, N, C_in], y [B, N, C_out])`` in NESTED order,
  identical on every rank that uses the same generator seed, or only some pixels of it (a rank's
  shard, as ``launch/write_store.py`` writes it).
- :func:`local_loss`: this rank's share of the per-pixel mean squared error (local SUM / GLOBAL
  count), so that ``sum_r local_loss_r`` is the single-device loss and
  :func:`hpattn_dist.grad_sync.sync_gradients` (SUM) gives the single-device gradient.
- :func:`pixel_centres`: unit vectors of NESTED pixel centres, pure torch.

Legend: B batch, N = 12 * nside**2 pixels, N_r pixels on rank r, E embed dim, C_in = 4 input
channels, C_out = 1 output channel, K bumps per sample.

Note [the synthetic task]
~~~~~~~~~~~~~~~~~~~~~~~~~
Each sample draws K random unit vectors ``d_k`` and random signs ``a_k = +-1``. The input at a
pixel with centre ``n`` is ``(n_x, n_y, n_z, s(n))`` with the field of narrow bumps

    s(n) = sum_k a_k * exp(kappa * (n . d_k - 1)),

and the target is a wider version of the same bumps seen from the ANTIPODE,

    y(n) = sum_k a_k * exp(kappa / 2 * (-n . d_k - 1)),

so the output at a pixel depends on input far away on the sphere (about half of it on another
rank): a convolution or a local window cannot solve it, global attention can (a query at ``n``
matching keys at ``-n`` is a bilinear form in the positions). The loss starts at the target's
variance and decreases steadily as the model learns it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
from torch import Tensor

from hpattn_dist import SpatialSelfAttention
from hpattn_dist.grad_sync import sharded_mean
from hpattn_dist.healpix import check_nside, nest2ring, nside2npix

__all__ = [
    "IN_CHANNELS",
    "OUT_CHANNELS",
    "ModelConfig",
    "HealpixTransformer",
    "build_model",
    "make_batch",
    "local_loss",
    "pixel_centres",
]

IN_CHANNELS = 4  # (x, y, z, s)
OUT_CHANNELS = 1


@dataclass
class ModelConfig:
    """Model and synthetic-data settings (the ``"model"`` section of a config file)."""

    embed_dim: int = 32
    """Embedding dimension ``E`` of every block."""
    num_heads: int = 4
    """Attention heads ``H`` (``E`` divisible by ``H``)."""
    depth: int = 2
    """Number of (attention + MLP) blocks."""
    mlp_ratio: float = 2.0
    """Hidden width of each MLP as a multiple of ``E``."""
    dropout: float = 0.0
    """Attention-weight dropout probability in ``[0, 1)``."""
    attn_backend: str = "auto"
    """``"auto" | "sdpa" | "manual"`` (see :class:`SpatialSelfAttention`)."""
    batch_size: int = 4
    """Samples per batch ``B``."""
    num_bumps: int = 4
    """Random bumps ``K`` per sample (Note [the synthetic task])."""
    kappa: float = 4.0
    """Sharpness of the input bumps; the target's are ``kappa / 2``."""

    def __post_init__(self) -> None:
        for name in ("embed_dim", "num_heads", "depth", "batch_size", "num_bumps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model.{name} must be a positive int, got {value!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"model.embed_dim ({self.embed_dim}) must be divisible by model.num_heads "
                f"({self.num_heads})"
            )
        if not self.mlp_ratio > 0:
            raise ValueError(f"model.mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout!r}")
        if self.attn_backend not in ("auto", "sdpa", "manual"):
            raise ValueError(
                f"model.attn_backend must be 'auto', 'sdpa' or 'manual', got {self.attn_backend!r}"
            )
        if not self.kappa > 0:
            raise ValueError(f"model.kappa must be > 0, got {self.kappa!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
        """Build from a mapping; unknown keys raise ``ValueError`` naming them."""
        return config_from_dict(cls, values, "model")


def config_from_dict(cls: type, values: Mapping[str, Any], section: str) -> Any:
    """``cls(**values)`` for a config dataclass; keys it has no field for raise ``ValueError``
    naming them and the ``section`` of the config file."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {section} config keys {unknown}; known: {sorted(known)}")
    return cls(**values)


class _Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    Shape: ``[B, N, E] -> [B, N, E]`` (``N_r`` once the attention is distributed: every other
    layer is per pixel).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = max(1, int(round(cfg.mlp_ratio * cfg.embed_dim)))
        self.norm1 = nn.LayerNorm(cfg.embed_dim)
        self.attn = SpatialSelfAttention(
            cfg.embed_dim, cfg.num_heads, dropout=cfg.dropout, attn_backend=cfg.attn_backend
        )
        self.norm2 = nn.LayerNorm(cfg.embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.embed_dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.embed_dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class HealpixTransformer(nn.Module):
    """Input projection, ``depth`` pre-norm blocks, final norm and a linear head.

    Shape: ``x`` ``[B, N, C_in]`` -> ``[B, N, C_out]``; after
    :func:`hpattn_dist.convert_spatial_attention`, ``[B, N_r, C_in] -> [B, N_r, C_out]`` on each
    rank of the sequence-parallel group.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.in_proj = nn.Linear(IN_CHANNELS, cfg.embed_dim)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim)
        self.head = nn.Linear(cfg.embed_dim, OUT_CHANNELS)

    def forward(self, x: Tensor) -> Tensor:
        h = self.in_proj(x)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def build_model(cfg: ModelConfig) -> HealpixTransformer:
    """The single-device model; its initial weights come from torch's default generator.

    Seed every rank identically (``torch.manual_seed``) before calling it, so that the replicas
    of a sequence-parallel group start equal.
    """
    return HealpixTransformer(cfg)


def pixel_centres(
    nside: int,
    ipix: Optional[Tensor] = None,
    *,
    dtype: torch.dtype = torch.float64,
    device: Optional[torch.device | str] = None,
) -> Tensor:
    """Unit vectors of the centres of NESTED pixels (pure torch, any device).

    Goes through :func:`hpattn_dist.healpix.nest2ring` and the RING-scheme centre formulas
    (Gorski et al. 2005, as in HEALPix's ``pix2ang_ring``): ring ``i`` counted from the nearer
    pole has ``z = +-(1 - i**2 / (3 nside**2))`` in the caps, ``z = (2 nside - i) * 2 / (3 nside)``
    in the equatorial belt, and its ``j``-th pixel (1-based) sits at
    ``phi = (j - 1/2) * pi / (2 i)`` in the caps and ``(j - f) * pi / (2 nside)`` in the belt,
    with ``f = 1`` when ``i + nside`` is odd and ``1/2`` otherwise (alternate belt rings are
    shifted by half a pixel).

    Args:
        nside: resolution (a power of two).
        ipix: NESTED indices (int64, any shape); default ``arange(N)``.
        dtype: floating dtype of the result (computed in float64 first).
        device: device of the result when ``ipix`` is None.

    Returns:
        ``[*ipix.shape, 3]`` unit vectors ``(x, y, z)``.
    """
    nside = check_nside(nside)
    npix = nside2npix(nside)
    if ipix is None:
        ipix = torch.arange(npix, dtype=torch.int64, device=device)
    ring_pix = nest2ring(nside, ipix)
    ncap = 2 * nside * (nside - 1)
    nl4 = 4 * nside

    north = ring_pix < ncap
    south = ring_pix >= npix - ncap
    # Ring index from the nearer pole in the caps: the largest i with 2 i (i - 1) <= p, i.e.
    # floor((1 + sqrt(1 + 2 p)) / 2); float64 sqrt is exact enough far beyond nside 2**20.
    p_north = ring_pix.to(torch.float64)
    p_south = (npix - ring_pix).to(torch.float64)  # 1-based count from the end
    i_north = torch.floor((1 + torch.sqrt(1 + 2 * p_north)) / 2)
    i_south = torch.floor((1 + torch.sqrt(2 * p_south - 1)) / 2)
    j_north = p_north + 1 - 2 * i_north * (i_north - 1)
    j_south = 4 * i_south + 1 - (p_south - 2 * i_south * (i_south - 1))

    belt = (ring_pix - ncap).clamp(min=0)
    i_belt = torch.div(belt, nl4, rounding_mode="floor") + nside  # ring index from the north
    j_belt = (belt - (i_belt - nside) * nl4 + 1).to(torch.float64)
    shift = torch.where((i_belt + nside) % 2 == 1, 1.0, 0.5).to(torch.float64)
    i_belt = i_belt.to(torch.float64)

    z = torch.where(
        north,
        1 - i_north**2 / (3 * nside**2),
        torch.where(south, -1 + i_south**2 / (3 * nside**2), (2 * nside - i_belt) * 2 / (3 * nside)),
    )
    phi = torch.where(
        north,
        (j_north - 0.5) * (math.pi / 2) / i_north,
        torch.where(south, (j_south - 0.5) * (math.pi / 2) / i_south, (j_belt - shift) * math.pi / (2 * nside)),
    )
    sin_theta = torch.sqrt((1 - z) * (1 + z))
    vec = torch.stack((sin_theta * torch.cos(phi), sin_theta * torch.sin(phi), z), dim=-1)
    return vec.to(dtype)


def make_batch(
    cfg: ModelConfig,
    nside: int,
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device | str] = None,
    pixels: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """One synthetic batch in NESTED order (Note [the synthetic task]).

    The random draws come from ``generator`` (a CPU generator), so every rank seeding it equally
    gets the same batch; the field is computed in float64 on ``device``, then cast to ``dtype``.
    ``pixels`` (NESTED indices, e.g. one rank's range) computes only those pixels: the draws are
    the same, so a rank can make its shard of the batch without the full field.

    Returns:
        ``x`` ``[B, n, C_in]`` and ``y`` ``[B, n, C_out]``, ``n = N`` or ``len(pixels)``.
    """
    if pixels is not None and device is not None:
        pixels = pixels.to(device)
    n = pixel_centres(nside, pixels, device=device)  # [n, 3]
    directions = torch.randn(cfg.batch_size, cfg.num_bumps, 3, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=-1, keepdim=True)  # [B, K, 3]
    signs = torch.randint(0, 2, (cfg.batch_size, cfg.num_bumps), generator=generator)
    amplitudes = (2 * signs - 1).to(torch.float64)  # [B, K], +-1
    directions, amplitudes = directions.to(n.device), amplitudes.to(n.device)

    cos = torch.einsum("nc,bkc->bnk", n, directions)  # [B, n, K]
    field = (amplitudes[:, None, :] * torch.exp(cfg.kappa * (cos - 1))).sum(-1)  # [B, n]
    target = (amplitudes[:, None, :] * torch.exp(cfg.kappa / 2 * (-cos - 1))).sum(-1)  # [B, n]

    x = torch.cat((n.expand(cfg.batch_size, -1, -1), field[..., None]), dim=-1)
    return x.to(dtype), target[..., None].to(dtype)


def local_loss(pred_local: Tensor, y_local: Tensor, npix: int) -> Tensor:
    """This rank's share of the per-pixel mean squared error.

    ``sum((pred_local - y_local) ** 2) / (B * N * C_out)``: summed over the sequence-parallel group
    it equals the single-device ``mse_loss(pred, y)`` (see :mod:`hpattn_dist.grad_sync`).

    Args:
        pred_local, y_local: ``[B, N_r, C_out]``.
        npix: the GLOBAL pixel count ``N``.
    """
    if pred_local.shape != y_local.shape:
        raise ValueError(
            f"pred_local {tuple(pred_local.shape)} and y_local {tuple(y_local.shape)} differ"
        )
    return sharded_mean((pred_local - y_local) ** 2, npix, dim=1)
