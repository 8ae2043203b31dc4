"""The configuration of ``hpattn-dist bench`` (:class:`BenchConfig`) and the names of its modes and
cases; every mode module reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from hpattn_dist.healpix import check_nside
from hpattn_dist.local.windows import WINDOW_MODES
from hpattn_dist.precision import DTYPES
from hpattn_dist.oracle import ATTN_BACKENDS
from hpattn_dist.strategies import STRATEGIES
from hpattn_dist.tools.config import load_section


MODES = ("scaling", "emulation", "memory", "masks", "local", "cross")


LOCAL_WINDOW_DIV = 8
"""Local mode: ``window_nside = max(1, nside // LOCAL_WINDOW_DIV)`` (issue 17's closing note)."""


MASK_SCENARIOS = ("one_rank", "global")


CROSS_CASES = ("encoder", "decoder")


CROSS_STRATEGIES = ("ring", "ulysses")
"""Cross mode: the strategies timed when ``strategies`` is empty."""


SCHEMA = "hpattn_dist.bench/1"


@dataclass
class BenchConfig:
    """What ``hpattn-dist bench`` measures. Defaults: ``hpattn_dist/tools/configs/bench.toml``
    (table ``[bench]``).

    Attributes:
        mode: ``"scaling" | "emulation" | "memory" | "masks" | "local" | "cross"`` (see the
            module docstring).
        nsides: HEALPix resolutions to measure (``N = 12 * nside**2``).
        batch: batch size ``B``.
        embed_dim: ``E`` (divisible by ``num_heads``).
        num_heads: ``H``; DeepSpeed-Ulysses and our ``ulysses`` need ``H % P == 0``.
        strategies: strategies to time; empty = every registered strategy.
        backend: layer ``attn_backend`` (``"auto" | "sdpa" | "manual"``); memory mode always
            uses ``"manual"``.
        dtype: ``float32 | bfloat16 | float16 | float64``.
        warmup: untimed repeats before timing.
        repeats: timed repeats; the median is reported.
        blocks: emulation mode: numbers of ring blocks ``P`` to emulate.
        oracle: time the single-process oracle baseline.
        deepspeed: time DeepSpeed-Ulysses when deepspeed is importable.
        seed: seed of weights and inputs.
        land_fractions: masks mode: fractions of masked ("land") pixels, each in ``[0, 1]``.
        data_nside, latent_nside: cross mode: the data grid and the (coarser or equal) latent grid.
        kv_dim: cross mode: the data grid's feature dimension ``C`` (the encoder's ``kv_dim``).
        cross_cases: cross mode: ``"encoder"`` (data -> latent) and/or ``"decoder"`` (latent -> data).
        windows: cross mode: ``"none"`` (attention to every source pixel) and/or locality windows
            ``"MODE:WINDOW_NSIDE"`` (:func:`hpattn_dist.local.windows.parse_window`).
        local_modes: local mode: the window modes (``"cell"``, ``"neighbourhood"``).
        local_layers: local mode: time the layers (local on P ranks, the global ring, local in
            one process); the attention against FlexAttention runs either way.
    """

    mode: str = "scaling"
    nsides: tuple[int, ...] = (16, 32)
    batch: int = 1
    embed_dim: int = 128
    num_heads: int = 4
    strategies: tuple[str, ...] = ()
    backend: str = "auto"
    dtype: str = "float32"
    warmup: int = 1
    repeats: int = 5
    blocks: tuple[int, ...] = (2, 4)
    oracle: bool = True
    deepspeed: bool = True
    seed: int = 0
    land_fractions: tuple[float, ...] = (0.0, 0.3, 0.7, 1.0)
    data_nside: int = 64
    latent_nside: int = 16
    kv_dim: int = 8
    cross_cases: tuple[str, ...] = CROSS_CASES
    windows: tuple[str, ...] = ("none",)
    local_modes: tuple[str, ...] = ("cell", "neighbourhood")
    local_layers: bool = True

    def __post_init__(self) -> None:
        self.nsides, self.strategies, self.blocks = tuple(self.nsides), tuple(self.strategies), \
            tuple(self.blocks)
        self.land_fractions = tuple(self.land_fractions)
        self.cross_cases, self.windows = tuple(self.cross_cases), tuple(self.windows)
        self.local_modes = tuple(self.local_modes)
        if not self.local_modes or any(m not in WINDOW_MODES for m in self.local_modes):
            raise ValueError(f"local_modes must be a non-empty list of {WINDOW_MODES}, got {self.local_modes!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.nsides:
            raise ValueError("nsides must not be empty")
        for n in self.nsides:
            check_nside(n, nest=True)
        for name in ("batch", "embed_dim", "num_heads", "repeats"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        for s in self.strategies:
            if s not in STRATEGIES:
                raise ValueError(f"strategies: unknown strategy {s!r}; registered: {tuple(STRATEGIES)}")
        if self.backend not in ATTN_BACKENDS:
            raise ValueError(f"backend must be one of {ATTN_BACKENDS}, got {self.backend!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if not self.blocks or any(not isinstance(b, int) or b < 1 for b in self.blocks):
            raise ValueError(f"blocks must be positive integers, got {self.blocks!r}")
        if not self.land_fractions or any(
                isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0
                for f in self.land_fractions):
            raise ValueError(f"land_fractions must be numbers in [0, 1], got {self.land_fractions!r}")
        for name in ("data_nside", "latent_nside"):
            check_nside(getattr(self, name), nest=True)
        if self.latent_nside > self.data_nside:
            raise ValueError(f"latent_nside ({self.latent_nside}) must not exceed data_nside "
                             f"({self.data_nside})")
        if isinstance(self.kv_dim, bool) or not isinstance(self.kv_dim, int) or self.kv_dim < 1:
            raise ValueError(f"kv_dim must be a positive integer, got {self.kv_dim!r}")
        if not self.cross_cases or any(c not in CROSS_CASES for c in self.cross_cases):
            raise ValueError(f"cross_cases must be a non-empty list of {CROSS_CASES}, got {self.cross_cases!r}")
        if not self.windows:
            raise ValueError('windows must not be empty (["none"]: no locality window)')
        for spec in self.windows:
            try:
                cross_window(spec, self.latent_nside)
            except ValueError as err:
                raise ValueError(f"windows: {err}, or 'none' (every source pixel)") from None

    def strategy_names(self) -> tuple[str, ...]:
        return self.strategies or tuple(STRATEGIES)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def head_tensors(self, n: int, seed: int, device: torch.device, count: int = 4) -> tuple[Tensor, ...]:
        """``count`` random ``[B, H, n, D]`` tensors (q, k, v, dout) of the config's dtype on ``device``,
        drawn in turn from one generator seeded ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(self.batch, self.num_heads, n, self.head_dim, generator=gen)
                     .to(device=device, dtype=DTYPES[self.dtype]) for _ in range(count))

    @classmethod
    def load(cls, path: Optional[Path], **overrides: Any) -> "BenchConfig":
        """Defaults of this class, then table ``[bench]`` of ``path``, then ``overrides``."""
        values = load_section(path, "bench", cls)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def cross_window(spec: str, nside: Optional[int] = None) -> Optional[tuple[str, int]]:
    """A ``windows`` entry: ``"none"`` -> None (every source pixel), ``"cell:4"`` ->
    ``("cell", 4)`` (:func:`~hpattn_dist.local.windows.parse_window`; with ``nside``, the window
    must divide it).

    Raises:
        ValueError: neither ``"none"`` nor ``MODE:WINDOW_NSIDE``.
    """
    if spec == "none":
        return None
    from hpattn_dist.local.windows import parse_window

    return parse_window(spec, nside)
