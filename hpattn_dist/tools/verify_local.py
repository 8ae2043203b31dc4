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
from torch import Tensor

from hpattn_dist.comm.groups import resolve_group
from hpattn_dist.grad_sync import sync_gradients
from hpattn_dist.healpix import shard_bounds
from hpattn_dist.kernels import select_kernel
from hpattn_dist.local import DistributedLocalSpatialSelfAttention, LocalSpatialSelfAttention
from hpattn_dist.local.windows import parse_window
from hpattn_dist.precision import DTYPES
from hpattn_dist.tools.verify import CaseResult, VerifyConfig, compare_quantities, oracle_reference

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
    info = resolve_group(group)
    start, stop = shard_bounds(x.shape[1], info.world_size)[info.rank]
    results = []
    for spec in cfg.local_windows if windows is None else windows:
        mode, window_nside = parse_window(spec)
        torch.manual_seed(cfg.seed)
        oracle = LocalSpatialSelfAttention(x.shape[2], cfg.num_heads, window_nside=window_nside,
                                           mode=mode).double()
        ref = oracle_reference(oracle, x, g)
        for backend in cfg.backends:
            for dtype_name in cfg.dtypes:
                label = f"{'nbhd' if mode == 'neighbourhood' else 'cell'}:{window_nside}"
                if progress is not None:
                    progress(f"{label} / {backend} / {dtype_name}")
                dtype = DTYPES[dtype_name]
                layer = DistributedLocalSpatialSelfAttention(
                    x.shape[2], cfg.num_heads, attn_backend=backend, window_nside=window_nside,
                    mode=mode, process_group=group)
                layer.load_state_dict(oracle.state_dict())
                layer = layer.to(device=device, dtype=dtype)
                probe = torch.empty(1, cfg.num_heads, 1, layer.head_dim, dtype=dtype, device=device)
                result = CaseResult(label, backend, select_kernel(backend, probe).name, dtype_name)
                x_local = x[:, start:stop].to(device=device, dtype=dtype).clone().requires_grad_(True)
                y_local = layer(x_local)
                (y_local * g[:, start:stop].to(device=device, dtype=dtype)).sum().backward()
                sync_gradients(layer, group)
                pairs = [("out", (y_local.detach() + cfg.inject_error).cpu(), ref["out"][:, start:stop]),
                         ("dx", x_local.grad.cpu(), ref["dx"][:, start:stop])]
                pairs += [("d" + name, p.grad.cpu(), ref["d" + name]) for name, p in layer.named_parameters()]
                result.quantities = compare_quantities(pairs, dtype_name, cfg.tolerance_scale, group, device)
                results.append(result)
    return results
