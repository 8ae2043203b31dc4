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

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from hpattn_dist.comm.groups import resolve_group
from hpattn_dist.cross import DistributedSpatialCrossAttention, SpatialCrossAttention
from hpattn_dist.grad_sync import sync_gradients
from hpattn_dist.healpix import nside2npix, shard_bounds
from hpattn_dist.kernels import select_kernel
from hpattn_dist.local.windows import parse_window
from hpattn_dist.precision import DTYPES
from hpattn_dist.tools.verify import CaseResult, VerifyConfig, compare_quantities

__all__ = ["run_cross_cases"]


def _oracle_reference(oracle: SpatialCrossAttention, x: Tensor, xs: Tensor, g: Tensor) -> dict[str, Tensor]:
    """Oracle output and gradients (inputs, parameters) for loss ``sum(oracle(x, xs) * g)``."""
    x, xs = x.detach().clone().requires_grad_(True), xs.detach().clone().requires_grad_(True)
    oracle.zero_grad(set_to_none=True)
    y = oracle(x, xs)
    (y * g).sum().backward()
    ref = {"out": y.detach(), "dx": x.grad.detach(), "dx_kv": xs.grad.detach()}
    ref.update({"d" + name: p.grad.detach().clone() for name, p in oracle.named_parameters()})
    return ref


def run_cross_cases(
    cfg: VerifyConfig,
    x: Tensor,
    g: Tensor,
    *,
    group: Optional[dist.ProcessGroup] = None,
    device: torch.device = torch.device("cpu"),
    progress: Optional[Callable[[str], None]] = None,
    source_nsides: Optional[Sequence[int]] = None,
) -> list[CaseResult]:
    """Every (source nside, backend, dtype) case on the ranks of ``group`` (collective).

    Args:
        cfg: the verify config (backends, dtypes, seed, heads, tolerances, self-test knobs).
        x, g: the full query field ``[B, N, E]`` and upstream gradient (float64, NESTED).
        source_nsides: the source grids to check (default ``cfg.cross_nsides``).
    """
    info = resolve_group(group)
    start, stop = shard_bounds(x.shape[1], info.world_size)[info.rank]
    results = []
    windows = [None] + ([parse_window(cfg.cross_window)] if cfg.cross_window else [])
    for s, window in ((s, w) for s in (cfg.cross_nsides if source_nsides is None else source_nsides)
                      for w in windows):
        gen = torch.Generator().manual_seed(cfg.seed + 2)
        xs = torch.randn(x.shape[0], nside2npix(s), x.shape[2], generator=gen, dtype=torch.float64)
        s_start, s_stop = shard_bounds(xs.shape[1], info.world_size)[info.rank]
        mode, window_nside = window if window else ("neighbourhood", None)
        torch.manual_seed(cfg.seed)
        oracle = SpatialCrossAttention(x.shape[2], cfg.num_heads, attn_backend="manual",
                                       window_nside=window_nside, mode=mode).double()
        ref = _oracle_reference(oracle, x, xs, g)
        for backend in cfg.backends:
            for dtype_name in cfg.dtypes:
                label = f"cross:{s}" + ("" if window is None else
                                        f":{'nbhd' if mode == 'neighbourhood' else 'cell'}:{window_nside}")
                if progress is not None:
                    progress(f"{label} / {backend} / {dtype_name}")
                dtype = DTYPES[dtype_name]
                layer = DistributedSpatialCrossAttention(x.shape[2], cfg.num_heads, attn_backend=backend,
                                                         process_group=group, window_nside=window_nside,
                                                         mode=mode)
                layer.load_state_dict(oracle.state_dict())
                layer = layer.to(device=device, dtype=dtype)
                probe = torch.empty(1, cfg.num_heads, 1, layer.head_dim, dtype=dtype, device=device)
                result = CaseResult(label, backend, select_kernel(backend, probe).name, dtype_name)
                x_local = x[:, start:stop].to(device=device, dtype=dtype).clone().requires_grad_(True)
                xs_local = xs[:, s_start:s_stop].to(device=device, dtype=dtype).clone().requires_grad_(True)
                y_local = layer(x_local, xs_local)
                (y_local * g[:, start:stop].to(device=device, dtype=dtype)).sum().backward()
                sync_gradients(layer, group)
                pairs = [("out", (y_local.detach() + cfg.inject_error).cpu(), ref["out"][:, start:stop]),
                         ("dx", x_local.grad.cpu(), ref["dx"][:, start:stop]),
                         ("dx_kv", xs_local.grad.cpu(), ref["dx_kv"][:, s_start:s_stop])]
                pairs += [("d" + name, p.grad.cpu(), ref["d" + name]) for name, p in layer.named_parameters()]
                result.quantities = compare_quantities(pairs, dtype_name, cfg.tolerance_scale, group, device)
                results.append(result)
    return results
