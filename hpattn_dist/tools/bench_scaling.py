"""``hpattn-dist bench --mode scaling``: the distributed layer against the single-process layer and
DeepSpeed-Ulysses, with the bytes each rank sends next to their closed form.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from hpattn_dist.comm.groups import resolve_group
from hpattn_dist.healpix import nside2npix, shard_bounds, shard_sizes
from hpattn_dist.kernels import select_kernel
from hpattn_dist.precision import DTYPES, acc_dtype
from hpattn_dist.oracle import SpatialSelfAttention
from hpattn_dist.strategies.auto import choose_strategy, communication_volume
from hpattn_dist.tools.verify_cases import make_distributed_layer, strategy_variants
from hpattn_dist.tools.bench_config import BenchConfig
from hpattn_dist.tools.bench_measure import gather_objects, gather_per_rank, layer_times, single_process_times


def expected_bytes(
    strategy: str, sizes: Sequence[int], rank: int, batch: int, heads: int, head_dim: int,
    dtype: torch.dtype, ulysses_degree: Optional[int] = None,
) -> Optional[dict[str, int]]:
    """Closed-form bytes rank ``rank`` sends in one forward+backward of ``strategy``
    (:func:`hpattn_dist.strategies.auto.communication_volume`, shape handshakes excluded), or
    None when the strategy has no formula. ``"auto"`` is resolved as the library resolves it.
    """
    if strategy == "auto":
        choice = choose_strategy(heads, len(sizes), dtype=dtype)
        strategy, ulysses_degree = choice.strategy, choice.ulysses_degree
    if strategy not in ("ring", "ulysses") and ulysses_degree is None:
        return None
    vol = communication_volume(
        strategy, batch=batch, heads=heads, head_dim=head_dim, sizes=list(sizes), rank=rank,
        itemsize=torch.empty((), dtype=dtype).element_size(),
        acc_itemsize=torch.empty((), dtype=acc_dtype(dtype)).element_size(),
        ulysses_degree=ulysses_degree,
    )
    return {"forward": vol.forward, "backward": vol.backward, "total": vol.total}


class _SdpaLocal(nn.Module):
    """Local attention for DeepSpeed's ``DistributedAttention``: ``[B, N, H/P, D]`` in and out."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)


class DeepSpeedUlyssesLayer(nn.Module):
    """The oracle's projections around ``deepspeed.sequence.layer.DistributedAttention`` + SDPA.

    Input and output: this rank's shard ``[B, N_r, E]`` (N_r equal on every rank).
    """

    def __init__(self, oracle: SpatialSelfAttention, group: Optional[dist.ProcessGroup]) -> None:
        super().__init__()
        if torch.device("cpu") == next(oracle.parameters()).device:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed.comm as ds_comm
        from deepspeed.sequence.layer import DistributedAttention

        if not ds_comm.is_initialized():
            ds_comm.init_distributed(dist_backend=dist.get_backend(), verbose=False)
        self.num_heads, self.embed_dim = oracle.num_heads, oracle.embed_dim
        self.qkv_proj = oracle.qkv_proj
        self.out_proj = oracle.out_proj
        self.attn = DistributedAttention(_SdpaLocal(), group or dist.group.WORLD,
                                         scatter_idx=2, gather_idx=1)

    def forward(self, x: Tensor) -> Tensor:
        batch, n_local, _ = x.shape
        qkv = self.qkv_proj(x).reshape(batch, n_local, 3, self.num_heads, -1)
        q, k, v = qkv.unbind(2)  # 3 x [B, N_r, H, D]
        out = self.attn(q, k, v, 0)  # [B, N_r, H, D]
        return self.out_proj(out.reshape(batch, n_local, self.embed_dim))


def _deepspeed_refusal(cfg: BenchConfig, npix: int, world: int) -> Optional[str]:
    try:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            return "deepspeed is not installed"
    except (ImportError, ValueError):
        return "deepspeed is not importable"
    if cfg.num_heads % world:
        return f"heads ({cfg.num_heads}) not divisible by P ({world})"
    if npix % world:
        return f"N ({npix}) not divisible by P ({world})"
    return None


def run_scaling(cfg: BenchConfig, device: torch.device, threads_per_rank: int,
                progress: Optional[Callable[[str], None]] = None) -> list[dict[str, Any]]:
    """The scaling mode on every rank (collective); returns the records (same on every rank)."""
    info = resolve_group(None)
    world, rank = info.world_size, info.rank
    dtype = DTYPES[cfg.dtype]
    head_dim = cfg.head_dim
    records: list[dict[str, Any]] = []
    say = progress or (lambda _msg: None)
    for nside in cfg.nsides:
        npix = nside2npix(nside)
        torch.manual_seed(cfg.seed)
        oracle = SpatialSelfAttention(cfg.embed_dim, cfg.num_heads, attn_backend=cfg.backend)
        oracle = oracle.to(device=device, dtype=dtype)
        gen = torch.Generator().manual_seed(cfg.seed)
        x = torch.randn(cfg.batch, npix, cfg.embed_dim, generator=gen).to(device=device, dtype=dtype)
        g = torch.randn(cfg.batch, npix, cfg.embed_dim, generator=gen).to(device=device, dtype=dtype)
        sizes = shard_sizes(npix, world)
        start, stop = shard_bounds(npix, world)[rank]
        x_local, g_local = x[:, start:stop].contiguous(), g[:, start:stop].contiguous()
        base = {"nside": nside, "npix": npix, "world_size": world, "dtype": cfg.dtype,
                "batch": cfg.batch, "embed_dim": cfg.embed_dim, "num_heads": cfg.num_heads,
                "backend": cfg.backend, "threads_per_rank": threads_per_rank}
        probe = torch.empty(1, cfg.num_heads, 1, head_dim, dtype=dtype, device=device)
        kernel = select_kernel(cfg.backend, probe).name

        oracle_rec = None
        if cfg.oracle:
            say(f"nside {nside}: oracle, 1 process x {world * threads_per_rank} threads")
            oracle_rec = {**base, "impl": "oracle", "strategy": None, "kernel": cfg.backend,
                          "world_size": 1, "threads_per_rank": world * threads_per_rank}
            if rank == 0:
                rec = single_process_times(oracle, x, g, cfg, device, world * threads_per_rank)
                rec["peak_mem_bytes_per_rank"] = [rec.pop("peak_mem")["bytes"]]
                rec["bytes_per_rank"] = [0]
                rec.pop("comm")
                oracle_rec.update(rec)
            oracle_rec = gather_objects(oracle_rec)[0]
            records.append(oracle_rec)

        runs = []
        for strategy in cfg.strategy_names():
            variants = strategy_variants(strategy, world, cfg.num_heads, proper_only=True)
            if not variants:
                records.append({**base, "impl": "hpattn_dist", "strategy": strategy,
                                "skipped": f"no Ulysses degree 1 < U < P={world} divides "
                                           f"H={cfg.num_heads}"})
            runs += [(strategy, label, u) for label, u in variants]
        for strategy, label, degree in runs:
            say(f"nside {nside}: {label}, {world} ranks x {threads_per_rank} threads")
            rec = {**base, "impl": "hpattn_dist", "strategy": label, "kernel": kernel,
                   "ulysses_degree": degree}
            try:
                layer = make_distributed_layer(oracle, strategy=strategy, attn_backend=cfg.backend,
                                               group=None, dtype=dtype, device=device,
                                               ulysses_degree=degree)
                with torch.no_grad():
                    layer(x_local)  # configuration errors (ValueError on every rank) surface here
            except ValueError as err:
                rec["skipped"] = str(err)
                say(f"  skipped: {err}")
                records.append(rec)
                continue
            rec.update(gather_per_rank(layer_times(layer, x_local, g_local, cfg, device)))
            formula = expected_bytes(strategy, sizes, rank, cfg.batch, cfg.num_heads, head_dim, dtype,
                                     ulysses_degree=degree)
            rec["expected_bytes_per_rank"] = gather_objects(formula)
            records.append(rec)

        refusal = _deepspeed_refusal(cfg, npix, world) if cfg.deepspeed else "disabled"
        if refusal is None and world > 1:
            say(f"nside {nside}: deepspeed_ulysses, {world} ranks x {threads_per_rank} threads")
            rec = {**base, "impl": "deepspeed_ulysses", "strategy": "ulysses", "kernel": "torch sdpa"}
            peer = DeepSpeedUlyssesLayer(oracle, None)
            rec.update(gather_per_rank(layer_times(peer, x_local, g_local, cfg, device)))
            rec["bytes_per_rank"] = [
                expected_bytes("ulysses", sizes, r, cfg.batch, cfg.num_heads, head_dim, dtype)["total"]
                for r in range(world)]
            rec.pop("payload_bytes_per_rank")
            rec.pop("comm_per_rank")
            rec["bytes_source"] = "formula (DeepSpeed's all-to-alls are not counted by hpattn_dist)"
            records.append(rec)
        elif world > 1 and cfg.deepspeed:
            records.append({**base, "impl": "deepspeed_ulysses", "strategy": "ulysses",
                            "skipped": refusal})
        _add_ratios(records, nside)
    return records


def _add_ratios(records: list[dict[str, Any]], nside: int) -> None:
    rows = [r for r in records if r["nside"] == nside and "skipped" not in r]
    oracle = next((r for r in rows if r["impl"] == "oracle"), None)
    peer = next((r for r in rows if r["impl"] == "deepspeed_ulysses"), None)
    for r in rows:
        if r["impl"] == "oracle":
            continue
        if oracle is not None:
            r["efficiency_fwd"] = oracle["fwd_s"] / r["fwd_s"]
            r["efficiency_fwd_bwd"] = oracle["fwd_bwd_s"] / r["fwd_bwd_s"]
        if peer is not None and r["impl"] == "hpattn_dist":
            r["speed_vs_peer_fwd"] = peer["fwd_s"] / r["fwd_s"]
            r["speed_vs_peer_fwd_bwd"] = peer["fwd_bwd_s"] / r["fwd_bwd_s"]
