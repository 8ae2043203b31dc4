"""``hpattn-dist verify`` for cross-grid attention: the sharded layer against its float64 oracle.

For each source resolution ``S`` of ``VerifyConfig.cross_nsides`` every rank builds the float64
oracle :class:`~hpattn_dist.cross.SpatialCrossAttention` with the verify seed and runs it with
queries on the verify field (nside ``cfg.nside``) and keys and values on a random source field of
nside ``S`` (an encoder when ``S > nside``, a decoder when ``S < nside``); then, for every backend
and dtype of the config, :class:`~hpattn_dist.cross.DistributedSpatialCrossAttention` with the
same weights on this rank's shards of both fields (each split by
:func:`~hpattn_dist.healpix.shard_bounds`), comparing output, both input gradients and the
group-summed parameter gradients under Note [verify tolerances] (:mod:`hpattn_dist.tools.tolerances`).
Rows are labelled ``cross:S`` (source nside S); with ``cfg.cross_window = "MODE:W"`` each source
also runs the locality option against the windowed oracle, rows ``cross:S:nbhd:W`` / ``cross:S:cell:W``.
"""

from __future__ import annotations

from functools import partial
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from hpattn_dist.cross import DistributedSpatialCrossAttention, SpatialCrossAttention
from hpattn_dist.healpix import nside2npix
from hpattn_dist.local.windows import parse_window
from hpattn_dist.tools.verify_cases import OracleCase, VerifyConfig, window_label

__all__ = ["cross_cases"]


def cross_cases(cfg: VerifyConfig, x: Tensor, group: Optional[dist.ProcessGroup] = None,
                source_nsides: Optional[Sequence[int]] = None) -> Iterator[OracleCase]:
    """One case per source nside (default ``cfg.cross_nsides``), and per source once more with
    ``cfg.cross_window``, for :func:`~hpattn_dist.tools.verify_cases.run_oracle_cases`; queries on
    the full field ``x [B, N, E]``."""
    windows = [None] + ([parse_window(cfg.cross_window)] if cfg.cross_window else [])
    for s, window in ((s, w) for s in (cfg.cross_nsides if source_nsides is None else source_nsides)
                      for w in windows):
        gen = torch.Generator().manual_seed(cfg.seed + 2)
        xs = torch.randn(x.shape[0], nside2npix(s), x.shape[2], generator=gen, dtype=torch.float64)
        mode, window_nside = window if window else ("neighbourhood", None)
        torch.manual_seed(cfg.seed)
        oracle = SpatialCrossAttention(x.shape[2], cfg.num_heads, attn_backend="manual",
                                       window_nside=window_nside, mode=mode).double()
        label = f"cross:{s}" + ("" if window is None else f":{window_label(mode, window_nside)}")
        make_layer = partial(DistributedSpatialCrossAttention, x.shape[2], cfg.num_heads, process_group=group,
                             window_nside=window_nside, mode=mode)
        yield OracleCase(label, oracle, make_layer,
                         [("x", x), ("x_kv", xs)])
