"""A graph inductor cached on disk at one world size is not served at another (Note [group
argument] in :mod:`hpattn_dist.strategies.ops`): two jobs share one cache directory, 3 ranks then
2, with the first rank's shard empty in both, so its shapes are the same in both jobs. Before the
group argument carried the group's size, the second job's rank 0 ran the 3-rank graph (its plan
sized for 3 ranks), raised, and its peer waited in the exchange.

Legend: N pixels of the field (nside 2), E embed dim."""

from __future__ import annotations

import os

import torch

from hpattn_dist import DistributedLocalSpatialSelfAttention, DistributedSpatialSelfAttention
from tests.harness import run_ranks

N, E = 48, 8


def _job(rank: int, world: int, cache_dir: str, sizes: list[int]) -> dict:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    start = sum(sizes[:rank])
    x = torch.randn(1, N, E, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = x[:, start:start + sizes[rank]]
    res = {}
    for name, make in (("ring", lambda: DistributedSpatialSelfAttention(E, 2, strategy="ring")),
                       ("window", lambda: DistributedLocalSpatialSelfAttention(E, 2, window_nside=1))):
        torch.manual_seed(0)
        layer = make().double()
        outs = []
        for fn in (layer, torch.compile(layer, fullgraph=True)):
            layer.zero_grad()
            xl = x.clone().requires_grad_(True)
            y = fn(xl)
            (y * y).sum().backward()
            outs.append((y.detach(), xl.grad, [p.grad.clone() for p in layer.parameters()]))
        res[name] = outs
    return res


def test_a_graph_cached_at_another_world_size_is_not_reused(tmp_path):
    for sizes in ([0, 24, 24], [0, 48]):
        for rank, res in enumerate(run_ranks(_job, len(sizes), str(tmp_path), sizes, timeout=300)):
            for name, ((ye, dxe, ge), (yc, dxc, gc)) in res.items():
                assert yc.shape == ye.shape == (1, sizes[rank], E), (sizes, rank, name)
                assert torch.allclose(yc, ye, rtol=1e-12, atol=1e-14), (sizes, rank, name)
                assert torch.allclose(dxc, dxe, rtol=1e-12, atol=1e-14), (sizes, rank, name)
                for a, b in zip(gc, ge):
                    assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), (sizes, rank, name)
