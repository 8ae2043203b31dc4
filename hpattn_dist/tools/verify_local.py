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

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from hpattn_dist.local import DistributedLocalSpatialSelfAttention, LocalSpatialSelfAttention
from hpattn_dist.local.windows import parse_window
from hpattn_dist.tools.verify_cases import CaseResult, VerifyConfig, run_oracle_cases, window_label

__all__ = ["run_local_cases"]


def run_local_cases(
    cfg: VerifyConfig,
    x: Tensor,
    g: Tensor,
    *,
    group: Optional[dist.ProcessGroup] = None,
    device: torch.device = torch.device("cpu"),
    progress: Optional[Callable[[str], None]] = None,
    windows: Optional[Sequence[str]] = None,
) -> list[CaseResult]:
    """Every (window, backend, dtype) case on the ranks of ``group`` (collective).

    Args:
        cfg: the verify config (backends, dtypes, seed, tolerances, self-test knobs).
        x, g: the full field ``[B, N, E]`` and upstream gradient (float64, NESTED).
        windows: the windows to check (default ``cfg.local_windows``).
    """
    results = []
    for spec in cfg.local_windows if windows is None else windows:
        mode, window_nside = parse_window(spec)
        torch.manual_seed(cfg.seed)
        oracle = LocalSpatialSelfAttention(x.shape[2], cfg.num_heads, window_nside=window_nside,
                                           mode=mode).double()

        def make_layer(backend: str) -> nn.Module:
            return DistributedLocalSpatialSelfAttention(x.shape[2], cfg.num_heads, attn_backend=backend,
                                                        window_nside=window_nside, mode=mode, process_group=group)

        results += run_oracle_cases(cfg, oracle, make_layer, [("x", x)], g, label=window_label(mode, window_nside),
                                    group=group, device=device, progress=progress)
    return results
