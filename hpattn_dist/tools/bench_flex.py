"""The FlexAttention baseline of ``hpattn-dist bench --mode local``: the same HEALPix windows as a block mask.

Legend: B batch, H heads, N pixels (NESTED), D head dim, c pixels per window cell, N_c cells.

Note [flex baseline]
    PyTorch's FlexAttention is the nearest single-process peer of local attention: the windows are
    a ``mask_mod`` that looks the pair of cells up in the cell window table ``[N_c, N_c]``
    (``mask(b, h, i, j) = window[i // c, j // c]``, the same windows as
    :func:`hpattn_dist.local.windows.window_cells`), ``create_block_mask(..., _compile=True)``
    builds its block mask without an ``N x N`` tensor, and ``torch.compile(flex_attention)`` runs
    it (on CPU torch 2.13 compiles a forward only). Block sizes: the default 128 and the cell size
    c when that is another power of two of at least 16 (cell-aligned blocks are full blocks, which
    skip the mask); the faster is the baseline. A block size whose inductor kernel fails to build
    is reported as "did not build" with the exception's type. Timings alternate between the
    candidates in one process with the same threads and inputs; the minimum over the repeats is
    the figure (the machine is shared), the median is kept, and so is the minimum of the process's
    CPU time (``time.process_time``), which time slices lost to other processes do not inflate.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from hpattn_dist.healpix import npix2nside
from hpattn_dist.local import healpix_local_attention
from hpattn_dist.local.windows import check_window_fits, window_cells

__all__ = ["compare_with_flex", "flex_block_sizes", "flex_local_attention"]


def _cell_window(window_nside: int, mode: str, device: torch.device) -> Tensor:
    """Bool ``[N_c, N_c]``: cell v lies in the window of cell u."""
    cells = window_cells(window_nside, mode)
    n_cells = cells.shape[0]
    table = torch.zeros(n_cells, n_cells + 1, dtype=torch.bool)
    table.scatter_(1, torch.where(cells >= 0, cells, n_cells), True)
    return table[:, :n_cells].contiguous().to(device)


def flex_block_sizes(cell_pixels: int) -> tuple[int, ...]:
    """The block sizes tried (Note [flex baseline])."""
    sizes = [128]
    if cell_pixels >= 16 and cell_pixels & (cell_pixels - 1) == 0 and cell_pixels != 128:
        sizes.append(cell_pixels)
    return tuple(sizes)


def flex_local_attention(n: int, window_nside: int, mode: str, block_size: int,
                         device: torch.device) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``fn(q, k, v)``: compiled FlexAttention over ``[B, H, N, D]`` with the HEALPix windows."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    c = check_window_fits(npix2nside(n), window_nside)
    table = _cell_window(window_nside, mode, device)

    def mask_mod(b, h, q_idx, kv_idx):
        return table[q_idx // c, kv_idx // c]

    block_mask = create_block_mask(mask_mod, None, None, n, n, device=device, _compile=True,
                                   BLOCK_SIZE=block_size)
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def _alternating(fns: dict[str, Callable[[], Any]], warmup: int,
                 repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall times and CPU times (this process's, ``time.process_time``) of each function, the
    functions taking turns in every repeat."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


def compare_with_flex(q: Tensor, k: Tensor, v: Tensor, window_nside: int, mode: str,
                      group: Optional[dist.ProcessGroup], warmup: int, repeats: int,
                      base: dict[str, Any]) -> list[dict[str, Any]]:
    """Records: ``healpix_local_attention`` on one process (forward, forward+backward) and
    FlexAttention (forward) on ``q, k, v [B, H, N, D]``, alternating (Note [flex baseline]).

    ``group``: a group of this process alone (or None without torch.distributed).
    """
    n = q.shape[2]
    c = check_window_fits(npix2nside(n), window_nside)
    dout = torch.randn_like(q)
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))

    def ours() -> None:
        with torch.no_grad():
            healpix_local_attention(q, k, v, group, window_nside=window_nside, mode=mode)

    def ours_fwd_bwd() -> None:
        qg.grad = kg.grad = vg.grad = None
        healpix_local_attention(qg, kg, vg, group, window_nside=window_nside, mode=mode).backward(dout)

    fns: dict[str, Callable[[], Any]] = {"ours": ours, "ours fwd+bwd": ours_fwd_bwd}
    errors: dict[int, str] = {}
    for bs in flex_block_sizes(c):
        try:
            fn = flex_local_attention(n, window_nside, mode, bs, q.device)
            with torch.no_grad():
                fn(q, k, v)  # compile here: a kernel that does not build fails now
        except Exception as err:  # noqa: BLE001  (reported: the baseline "did not build")
            errors[bs] = f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
            continue
        fns[f"flex {bs}"] = lambda fn=fn: _no_grad(fn, q, k, v)
    times, cpu = _alternating(fns, warmup, repeats)
    rec = {**base, "impl": "attention", "mode": mode, "window_nside": window_nside, "cell_pixels": c,
           "threads": torch.get_num_threads(),
           "fwd_s": statistics.median(times["ours"]), "fwd_min_s": min(times["ours"]),
           "fwd_bwd_s": statistics.median(times["ours fwd+bwd"]), "fwd_bwd_min_s": min(times["ours fwd+bwd"]),
           "fwd_cpu_min_s": min(cpu["ours"]), "fwd_bwd_cpu_min_s": min(cpu["ours fwd+bwd"]),
           "fwd_times": times["ours"], "fwd_bwd_times": times["ours fwd+bwd"]}
    out = [rec]
    for bs in flex_block_sizes(c):
        flex = {**base, "impl": "flex", "mode": mode, "window_nside": window_nside, "cell_pixels": c,
                "threads": torch.get_num_threads(), "block_size": bs}
        if bs in errors:
            flex["error"] = errors[bs]
        else:
            t = times[f"flex {bs}"]
            flex.update({"fwd_s": statistics.median(t), "fwd_min_s": min(t), "fwd_times": t,
                         "fwd_cpu_min_s": min(cpu[f"flex {bs}"])})
        out.append(flex)
    built = [r for r in out[1:] if "error" not in r]
    if built:
        rec["speed_vs_flex_fwd"] = min(r["fwd_min_s"] for r in built) / rec["fwd_min_s"]
        rec["speed_vs_flex_fwd_cpu"] = min(r["fwd_cpu_min_s"] for r in built) / rec["fwd_cpu_min_s"]
    rec["fwd_bwd_over_fwd"] = rec["fwd_bwd_min_s"] / rec["fwd_min_s"]
    rec["fwd_bwd_over_fwd_cpu"] = rec["fwd_bwd_cpu_min_s"] / rec["fwd_cpu_min_s"]
    return out


def _no_grad(fn: Callable[..., Tensor], *args: Tensor) -> None:
    with torch.no_grad():
        fn(*args)
