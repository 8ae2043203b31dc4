"""``hpattn-dist verify`` for local attention: the sharded local layer against its dense oracle.

For each window ``"MODE:WINDOW_NSIDE"`` of ``VerifyConfig.local_windows`` (e.g.
``"neighbourhood:2"``), every rank builds the float64 oracle
:class:`~hpattn_dist.local.LocalSpatialSelfAttention` (dense window-masked attention) with the
verify seed, runs it on the FULL field, then runs
:class:`~hpattn_dist.local.DistributedLocalSpatialSelfAttention` with the same weights on its
shard, for every backend and dtype of the config, and compares output, input gradient and
(group-summed) parameter gradients under Note [verify tolerances] (:mod:`hpattn_dist.tools.tolerances`).
Rows are labelled ``cell:WINDOW_NSIDE`` and ``nbhd:WINDOW_NSIDE`` (neighbourhood).
"""

from __future__ import annotations

from functools import partial
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from hpattn_dist.local import DistributedLocalSpatialSelfAttention, LocalSpatialSelfAttention
from hpattn_dist.local.windows import parse_window
from hpattn_dist.tools.verify_cases import OracleCase, VerifyConfig, window_label

__all__ = ["local_cases"]


def local_cases(cfg: VerifyConfig, x: Tensor, group: Optional[dist.ProcessGroup] = None,
                windows: Optional[Sequence[str]] = None) -> Iterator[OracleCase]:
    """One case per window (default ``cfg.local_windows``) for
    :func:`~hpattn_dist.tools.verify_cases.run_oracle_cases`, on the full field ``x [B, N, E]``."""
    for spec in cfg.local_windows if windows is None else windows:
        mode, window_nside = parse_window(spec)
        torch.manual_seed(cfg.seed)
        oracle = LocalSpatialSelfAttention(x.shape[2], cfg.num_heads, window_nside=window_nside,
                                           mode=mode).double()
        make_layer = partial(DistributedLocalSpatialSelfAttention, x.shape[2], cfg.num_heads, window_nside=window_nside,
                             mode=mode, process_group=group)
        yield OracleCase(window_label(mode, window_nside), oracle,
                         make_layer, [("x", x)])
