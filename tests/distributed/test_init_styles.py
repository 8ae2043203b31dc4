"""Process-group init styles on real gloo ranks (issue 24 item 1; Note [init styles] in
``hpattn_dist/comm/groups.py``): a bare ``init_process_group()`` (``dist.get_backend`` says
"undefined"), and groups made with ``backend="gloo"`` and ``backend="cpu:gloo"``. For each, the
library reads which backend serves CPU tensors (gloo), keeps the metadata and the data on the CPU,
posts the ring's sends and receives separately (gloo does not coalesce; a bare init was taken
for an unknown, grouped backend), and ring, Ulysses and the layer equal the float64 reference.

Legend: B batch, H heads, N pixels, D head dim, P = 2.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from hpattn_dist.comm.groups import resolve_group
from hpattn_dist.comm.ring import RingExchanger
from hpattn_dist.strategies import sharded_attention
from tests.harness import run_ranks
from tests.reference import reference_attention

WORLD, B, H, N, D = 2, 2, 2, 10, 4
STYLES = ("bare init", "gloo", "cpu:gloo")


def _full():
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(3))


def _job(rank: int, world: int) -> dict:
    # The default group is the bare init (run_ranks(backend=None)); the others are groups of the
    # same ranks made in the other styles.
    groups = {"bare init": None, "gloo": dist.new_group([0, 1], backend="gloo"),
              "cpu:gloo": dist.new_group([0, 1], backend="cpu:gloo")}
    res = {"default backend": dist.get_backend()}
    half = N // 2
    for style, group in groups.items():
        info = resolve_group(group)
        cpu = torch.device("cpu")
        res[style] = {
            "cpu backend": info.backend_for(cpu), "data": info.comm_device(cpu), "meta": info.meta_device(cpu),
            # CUDA data's metadata stays on the CPU backend (Note [agreement off the device])
            "cuda meta": info.meta_device(torch.device("cuda")),
            "ring grouped": RingExchanger(info)._grouped(cpu),
        }
        q, k, v = (t[:, :, rank * half:(rank + 1) * half] for t in _full())
        for strategy in ("ring", "ulysses"):
            res[style][strategy] = sharded_attention(strategy, q, k, v, group)
    return res


@functools.lru_cache(maxsize=None)
def _results() -> list:
    return run_ranks(_job, WORLD, backend=None, timeout=60)


def test_a_bare_init_reports_no_backend_name():
    assert all(r["default backend"] == "undefined" for r in _results())


@pytest.mark.parametrize("style", STYLES)
def test_each_style_communicates_cpu_tensors_on_gloo(style):
    cpu = torch.device("cpu")
    for r in _results():
        got = r[style]
        assert got["cpu backend"] == "gloo" and got["data"] == got["meta"] == got["cuda meta"] == cpu, got
        assert got["ring grouped"] is False, style  # separate isend/irecv: gloo does not coalesce


@pytest.mark.parametrize("strategy", ["ring", "ulysses"])
@pytest.mark.parametrize("style", STYLES)
def test_each_style_gives_the_reference(style, strategy):
    got = torch.cat([r[style][strategy] for r in _results()], dim=2)
    torch.testing.assert_close(got, reference_attention(*_full()), rtol=0, atol=1e-12)
