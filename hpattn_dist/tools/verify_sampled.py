"""``hpattn-dist verify --sample-queries K``: the exactness check at sizes no rank can hold whole.

Legend: B batch, N = 12 * nside**2 pixels, N_r this rank's, E embed dim, H heads, D = E / H, K the
sampled query pixels, S their set, P ranks.

Note [sampled verification]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
The full-field check (:mod:`hpattn_dist.tools.verify`) runs the single-device float64 layer on
the whole field: impossible at nside 256 and beyond. Here no rank holds more than its shard and K
rows. The field is each rank's shard (generated block by block from the seed, or read with
:func:`hpattn_dist.io.read_shard`); the loss is restricted to K random query pixels,
``L = sum_{i in S} <g_i, y_i>``. The distributed layer runs forward and backward as in training.
The float64 reference uses only torch matrix products (none of this package's kernels, merges or
collectives but ``all_reduce``):

1. every rank gets the K sampled input rows (an ``all_reduce`` of a ``[B, K, E]`` tensor filled by
   their owners) and forms their queries;
2. every rank streams ITS OWN keys in chunks: scores of the K queries against the chunk (for
   windowed attention, the keys outside each query's window masked), a running log-sum-exp and
   output; the ranks' partial results combine with three ``all_reduce`` of ``[B, H, K]`` /
   ``[B, H, K, D]`` (max, then the sums of ``exp(lse_r - max)`` and of the weighted outputs);
3. the backward streams the same chunks again: with the global log-sum-exp the probabilities of the
   K rows are exact, so ``dV_j = sum_i p_ij dO_i`` and ``dK_j = scale * sum_i dS_ij q_i`` for EVERY
   key j, ``dQ_i`` for the sampled rows (summed over ranks), hence ``dx`` of every pixel (each rank
   its shard: through its K and V, and for sampled pixels through Q) and every parameter gradient
   of the restricted loss (summed over ranks).

So the check compares the sampled rows of the output, the whole input gradient and all parameter
gradients, under Note [verify tolerances]. A wrong result that touches only a few query rows is
found with probability about ``K * (wrong rows) / N``; errors in keys, values or any gradient show
in ``dx`` and the parameter gradients whatever K is.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from hpattn_dist.comm.groups import GroupInfo, resolve_group
from hpattn_dist.grad_sync import sync_gradients
from hpattn_dist.healpix import nside2npix, shard_bounds
from hpattn_dist.kernels import select_kernel
from hpattn_dist.precision import DTYPES
from hpattn_dist.tools.verify_cases import (
    CaseResult, VerifyConfig, compare_quantities, executed_strategy, strategy_variants,
)

__all__ = ["StreamedReference", "run_sampled_cases", "sample_pixels", "shard_field"]

_FIELD_BLOCK = 4096  # pixels per seeded block of the generated field
_KEY_CHUNK = 8192  # keys per chunk of the streamed reference


def shard_field(seed: int, batch: int, npix: int, embed: int, start: int, stop: int) -> Tensor:
    """Rows ``[start, stop)`` of a seeded random field ``[B, N, E]`` (float64), generated block by
    block so that no rank makes more than its range and one block."""
    out = torch.empty(batch, stop - start, embed, dtype=torch.float64)
    for k in range(start // _FIELD_BLOCK, math.ceil(stop / _FIELD_BLOCK)):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + k)
        block = torch.randn(batch, _FIELD_BLOCK, embed, generator=gen, dtype=torch.float64)
        a, b = max(start, k * _FIELD_BLOCK), min(stop, (k + 1) * _FIELD_BLOCK)
        out[:, a - start:b - start] = block[:, a - k * _FIELD_BLOCK:b - k * _FIELD_BLOCK]
    return out


def sample_pixels(seed: int, npix: int, k: int) -> Tensor:
    """``k`` distinct pixels of ``[0, npix)``, sorted, the same on every rank (seeded)."""
    k = min(k, npix)
    gen = torch.Generator().manual_seed(seed + 7)
    picked = torch.zeros(0, dtype=torch.int64)
    while picked.numel() < k:
        picked = torch.unique(torch.cat((picked, torch.randint(npix, (2 * k,), generator=gen))))
    return picked[torch.randperm(picked.numel(), generator=gen)[:k]].sort().values


def _all_reduce(t: Tensor, info: GroupInfo, op=dist.ReduceOp.SUM) -> Tensor:
    if info.world_size > 1:
        dist.all_reduce(t, op=op, group=info.group)
    return t


class StreamedReference:
    """The float64 reference of Note [sampled verification] for one set of weights.

    Args:
        x_local: this rank's shard ``[B, N_r, E]`` (any dtype; read in float64 chunk by chunk).
        start: the global index of its first pixel.
        npix: N.
        sampled: the K sampled pixels (sorted, the same on every rank).
        g: the upstream gradient of the sampled rows ``[B, K, E]`` (float64, the same everywhere).
        weights: the layer's float64 parameters (``qkv_proj.weight``, ``qkv_proj.bias``,
            ``out_proj.weight``, ``out_proj.bias``).
        heads: H. window: ``(window_nside, mode)`` for windowed attention, or None (global).
    """

    def __init__(self, x_local: Tensor, start: int, npix: int, sampled: Tensor, g: Tensor,
                 weights: dict[str, Tensor], heads: int, info: GroupInfo,
                 window: Optional[tuple[int, str]] = None) -> None:
        self.x, self.start, self.npix, self.sampled, self.g = x_local, start, npix, sampled, g
        self.w, self.heads, self.info, self.window = weights, heads, info, window
        b, _, e = x_local.shape
        self.b, self.e, self.d = b, e, e // heads
        self.scale = self.d ** -0.5
        stop = start + x_local.shape[1]
        mine = (sampled >= start) & (sampled < stop)
        self.mine = mine
        rows = torch.zeros(b, sampled.numel(), e, dtype=torch.float64)
        rows[:, mine] = x_local[:, sampled[mine] - start].double()
        self.xs = _all_reduce(rows, info)  # [B, K, E], every rank
        wq, wk, wv = self.w["qkv_proj.weight"].chunk(3)
        bq, bk, bv = self.w["qkv_proj.bias"].chunk(3) if "qkv_proj.bias" in self.w else (None,) * 3
        self.wq, self.wk, self.wv, self.bq, self.bk, self.bv = wq, wk, wv, bq, bk, bv
        self.q = self._heads(torch.nn.functional.linear(self.xs, wq, bq))  # [B, H, K, D]
        if window is not None:
            from hpattn_dist.local.windows import window_cells

            cells = window_cells(window[0], window[1])
            self.c = npix // cells.shape[0]
            self.q_window = cells[sampled // self.c]  # [K, slots], -1 = none

    def _heads(self, t: Tensor) -> Tensor:
        """``[B, n, E] -> [B, H, n, D]``"""
        return t.view(t.shape[0], t.shape[1], self.heads, self.d).transpose(1, 2)

    def _merge_heads(self, t: Tensor) -> Tensor:
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], self.e)

    def _chunks(self):
        """This rank's keys chunk by chunk: ``(a, b, x_chunk, k, v, allowed [K, n] or None)``."""
        n_r = self.x.shape[1]
        for a in range(0, n_r, _KEY_CHUNK):
            b = min(n_r, a + _KEY_CHUNK)
            x_c = self.x[:, a:b].double()
            k = self._heads(torch.nn.functional.linear(x_c, self.wk, self.bk))
            v = self._heads(torch.nn.functional.linear(x_c, self.wv, self.bv))
            allowed = None
            if self.window is not None:
                key_cells = (torch.arange(a, b) + self.start) // self.c  # [n]
                allowed = (self.q_window[:, :, None] == key_cells[None, None, :]).any(dim=1)  # [K, n]
            yield a, b, x_c, k, v, allowed

    def _scores(self, k: Tensor, allowed: Optional[Tensor]) -> Tensor:
        s = self.q @ k.transpose(-1, -2) * self.scale  # [B, H, K, n]
        return s if allowed is None else s.masked_fill(~allowed, -math.inf)

    def forward(self) -> Tensor:
        """The reference output of the sampled rows ``[B, K, E]`` (collective)."""
        b, h, k_n, d = self.q.shape
        lse = torch.full((b, h, k_n), -math.inf, dtype=torch.float64)
        out = torch.zeros(b, h, k_n, d, dtype=torch.float64)
        for _, _, _, k, v, allowed in self._chunks():
            s = self._scores(k, allowed)
            lse_c = torch.logsumexp(s, dim=-1)
            new = torch.logaddexp(lse, lse_c)
            keep = torch.where(torch.isfinite(new), torch.exp(lse - new), torch.zeros_like(new))
            p = torch.where(torch.isfinite(new)[..., None], torch.exp(s - new[..., None]), torch.zeros_like(s))
            out = out * keep[..., None] + p @ v
            lse = new
        top = _all_reduce(lse.clone(), self.info, dist.ReduceOp.MAX)
        safe_top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        weight = torch.where(torch.isfinite(lse), torch.exp(lse - safe_top), torch.zeros_like(lse))
        total = _all_reduce(weight.clone(), self.info)
        out = _all_reduce(out * weight[..., None], self.info)
        self.lse = torch.where(total > 0, safe_top + torch.log(total), torch.full_like(total, -math.inf))
        self.o = torch.where(total[..., None] > 0, out / total.clamp_min(1e-300)[..., None], torch.zeros_like(out))
        self.attn = self._merge_heads(self.o)  # [B, K, E]
        return torch.nn.functional.linear(self.attn, self.w["out_proj.weight"], self.w.get("out_proj.bias"))

    def backward(self) -> tuple[Tensor, dict[str, Tensor]]:
        """``(dx of this rank's shard [B, N_r, E], parameter gradients)`` of the restricted loss
        (collective; call after :meth:`forward`)."""
        g = self.g
        grads = {"out_proj.weight": torch.einsum("bko,bki->oi", g, self.attn)}
        if "out_proj.bias" in self.w:
            grads["out_proj.bias"] = g.sum(dim=(0, 1))
        d_o = self._heads(g @ self.w["out_proj.weight"])  # [B, H, K, D]
        delta = (d_o * self.o).sum(dim=-1)  # [B, H, K]
        dq = torch.zeros_like(self.q)
        dx = torch.zeros(self.x.shape, dtype=torch.float64)
        dwk = torch.zeros_like(self.wk)
        dwv = torch.zeros_like(self.wv)
        dbk = torch.zeros(self.e, dtype=torch.float64)
        dbv = torch.zeros(self.e, dtype=torch.float64)
        finite = torch.isfinite(self.lse)[..., None]
        for a, b, x_c, k, v, allowed in self._chunks():
            s = self._scores(k, allowed)
            p = torch.where(finite, torch.exp(s - torch.where(finite, self.lse[..., None], 0.0)), torch.zeros_like(s))
            dv = p.transpose(-1, -2) @ d_o  # [B, H, n, D]
            ds = p * (d_o @ v.transpose(-1, -2) - delta[..., None])
            dq += ds @ k * self.scale
            dk = ds.transpose(-1, -2) @ self.q * self.scale
            dk_e, dv_e = self._merge_heads(dk), self._merge_heads(dv)  # [B, n, E]
            dx[:, a:b] = dk_e @ self.wk + dv_e @ self.wv
            dwk += torch.einsum("bno,bni->oi", dk_e, x_c)
            dwv += torch.einsum("bno,bni->oi", dv_e, x_c)
            dbk += dk_e.sum(dim=(0, 1))
            dbv += dv_e.sum(dim=(0, 1))
        dq = _all_reduce(dq, self.info)
        dq_e = self._merge_heads(dq)  # [B, K, E]
        dx[:, self.sampled[self.mine] - self.start] += (dq_e @ self.wq)[:, self.mine]
        dwq = torch.einsum("bko,bki->oi", dq_e, self.xs)
        for t in (dwk, dwv, dbk, dbv):
            _all_reduce(t, self.info)
        grads["qkv_proj.weight"] = torch.cat((dwq, dwk, dwv))
        if self.bq is not None:
            grads["qkv_proj.bias"] = torch.cat((dq_e.sum(dim=(0, 1)), dbk, dbv))
        return dx, grads


class _Measured:
    """Wall time, allocator peak (Note [allocated peak]) and resident-set peak (Note [peak
    memory]) of the layer's forward + backward on this rank."""

    def __init__(self, device: torch.device) -> None:
        from hpattn_dist.tools.allocations import AllocatedPeak
        from hpattn_dist.tools.bench_measure import PeakMemory

        self.allocated, self.resident = AllocatedPeak(device), PeakMemory(device)

    def __enter__(self) -> "_Measured":
        self.resident.__enter__()
        self.allocated.__enter__()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.allocated.device.type == "cuda":
            torch.cuda.synchronize(self.allocated.device)
        self.seconds = time.perf_counter() - self.start
        self.allocated.__exit__(*exc)
        self.resident.__exit__(*exc)

    def per_rank(self, info: GroupInfo, device: torch.device) -> dict[str, list]:
        """Every rank's measurements (one small all-gather)."""
        mine = torch.tensor([self.seconds, float(self.allocated.peak), float(self.resident.bytes)],
                            dtype=torch.float64)
        rows = [mine.clone() for _ in range(info.world_size)]
        if info.world_size > 1:
            dist.all_gather(rows, mine.to(info.comm_device(device)), group=info.group)
        return {"time_s": [float(r[0]) for r in rows], "peak_allocated_bytes": [int(r[1]) for r in rows],
                "peak_rss_bytes": [int(r[2]) for r in rows]}


def _build(cfg: VerifyConfig, embed: int, label: str, group, backend: str, ulysses_degree: Optional[int],
           window: Optional[tuple[int, str]]):
    """The float64 layer of the verify seed (its weights are the reference's) and the distributed
    layer under test."""
    from hpattn_dist.modules import DistributedSpatialSelfAttention
    from hpattn_dist.local import DistributedLocalSpatialSelfAttention

    torch.manual_seed(cfg.seed)
    if window is not None:
        return DistributedLocalSpatialSelfAttention(embed, cfg.num_heads, attn_backend=backend, window_nside=window[0],
                                                    mode=window[1], process_group=group)
    return DistributedSpatialSelfAttention(embed, cfg.num_heads, attn_backend=backend, process_group=group,
                                           strategy=label.split(":")[0], ulysses_degree=ulysses_degree)


def load_shard(cfg: VerifyConfig, group) -> tuple[Tensor, int, int]:
    """``(x_local [B, N_r, E] float64, start, N)``: this rank's shard, generated (seeded blocks) or
    read from ``cfg.data`` (:func:`hpattn_dist.io.read_shard`; ``[E, N_r]`` or ``[B, E, N_r]``)."""
    info = resolve_group(group)
    if cfg.data is None:
        npix = nside2npix(cfg.nside)
        start, stop = shard_bounds(npix, info.world_size)[info.rank]
        return shard_field(cfg.seed, cfg.batch, npix, cfg.embed_dim, start, stop), start, npix
    from hpattn_dist.io import read_shard

    x = read_shard(cfg.data, cfg.data_variable, group, time=cfg.data_time).double()
    x = x[None] if x.dim() == 2 else x
    npix = nside2npix(cfg.nside)
    start, _ = shard_bounds(npix, info.world_size)[info.rank]
    return x.movedim(-1, 1).contiguous(), start, npix


def run_sampled_cases(
    cfg: VerifyConfig,
    *,
    group: Optional[dist.ProcessGroup],
    device: torch.device,
    progress: Optional[Callable[[str], None]],
) -> list[CaseResult]:
    """Every (strategy variant or window, backend, dtype) case of ``cfg`` against the streamed
    float64 reference of Note [sampled verification] (collective); :func:`~hpattn_dist.tools.verify.run_verify`'s
    runner when ``cfg.sample_queries`` is set (arguments as there)."""
    from hpattn_dist.local.windows import parse_window

    info = resolve_group(group)
    x_local, start, npix = load_shard(cfg, group)
    batch, n_r, embed = x_local.shape
    sampled = sample_pixels(cfg.seed, npix, cfg.sample_queries)
    g = torch.randn(batch, sampled.numel(), embed, generator=torch.Generator().manual_seed(cfg.seed + 1),
                    dtype=torch.float64)
    mine = (sampled >= start) & (sampled < start + n_r)
    rows = sampled[mine] - start
    cases = [(label, u, None) for s in cfg.strategy_names() for label, u in strategy_variants(s, info.world_size,
                                                                                           cfg.num_heads)]
    cases += [(f"{'nbhd' if m == 'neighbourhood' else 'cell'}:{w}", None, (w, m))
              for m, w in (parse_window(spec) for spec in cfg.local_windows)]
    results: list[CaseResult] = []
    references: dict = {}
    for label, degree, window in cases:
        for backend in cfg.backends:
            for dtype_name in cfg.dtypes:
                if progress is not None:
                    progress(f"{label} / {backend} / {dtype_name} (sampled, K={sampled.numel()})")
                dtype = DTYPES[dtype_name]
                probe = torch.empty(1, cfg.num_heads, 1, embed // cfg.num_heads, dtype=dtype, device=device)
                result = CaseResult(label, backend, select_kernel(backend, probe).name, dtype_name)
                try:
                    layer = _build(cfg, embed, label, group, backend, degree, window)
                except ValueError as err:
                    result.skipped = str(err)
                    results.append(result)
                    continue
                weights = {n: p.detach().double().clone() for n, p in layer.named_parameters()}
                known = references.get(window)
                if known is None or any(not torch.equal(known[0][n], w) for n, w in weights.items()):
                    ref = StreamedReference(x_local, start, npix, sampled, g, weights, cfg.num_heads, info, window)
                    references[window] = known = (weights, ref.forward(), *ref.backward())
                _, y_ref, dx_ref, grads_ref = known
                layer = layer.to(device=device, dtype=dtype)
                x = x_local.to(device=device, dtype=dtype, copy=True).requires_grad_(True)
                dy = torch.zeros(x.shape, dtype=dtype, device=device)  # dL/dy: g on the sampled rows
                dy[:, rows] = g[:, mine].to(device=device, dtype=dtype)
                try:
                    with _Measured(device) as measured:
                        y = layer(x)
                        y.backward(dy)
                except ValueError as err:  # raised on every rank by the library's agreement
                    result.skipped = str(err)
                    results.append(result)
                    continue
                result.measured = measured.per_rank(info, device)
                sync_gradients(layer, group)
                pairs = [("out", (y.detach()[:, rows] + cfg.inject_error).cpu(), y_ref[:, mine]),
                         ("dx", x.grad.cpu(), dx_ref)]
                pairs += [("d" + n, p.grad.cpu(), grads_ref[n]) for n, p in layer.named_parameters()]
                result.quantities = compare_quantities(pairs, dtype_name, cfg.tolerance_scale, group, device)
                if window is None:
                    result.executed = executed_strategy(label, info.world_size, cfg.num_heads, dtype)
                results.append(result)
                del y, x, layer
    return results
