"""A new process group after ``destroy_process_group()``: what was built with ``process_group=None``
follows the new WORLD (issue 23 item 7; Note [groups resolved per call] in
``hpattn_dist/comm/groups.py``).

On P = 2 gloo ranks: a converted idx-flow encoder-decoder (halo layers, SpatialBatchNorm, a
transformer block), a converted SpatialViT (its ``pos_embed`` rows) and a hybrid layer (Ulysses
sub-groups created on its first call and cached) run once, then torch's own
``destroy_process_group()`` and ``init_process_group`` make a new WORLD, and the same objects run
again. Both calls equal the unconverted float64 models on the full field.

Legend: B batch, N pixels, E embed dim, H heads, P = 2.
"""

from __future__ import annotations

import copy
import functools
import tempfile

import torch
import torch.distributed as dist

from hpattn_dist import DistributedSpatialSelfAttention, SpatialSelfAttention
from hpattn_dist.healpix import shard_bounds
from tests.harness import run_ranks
from tests.integration.test_idx_flow_models import _build

WORLD, B, N, E, H = 2, 2, 12, 8, 2


def _models(rank: int, world: int) -> dict:
    """name -> (converted model, its input shard, the reference's output rows)."""
    from hpattn_dist.integrations.idx_flow import convert_model

    made = {}
    for i, kind in enumerate(("encoder_decoder", "vit")):
        model, x, _ = _build(kind, 100 + i)
        with torch.no_grad():
            ref = copy.deepcopy(model)(x)
        convert_model(model)
        a, b = shard_bounds(x.shape[1], world)[rank]
        c, d = shard_bounds(ref.shape[1], world)[rank]
        made[kind] = (model, x[:, a:b], ref[:, c:d])
    torch.manual_seed(0)
    single = SpatialSelfAttention(E, H, attn_backend="manual").double()
    hybrid = DistributedSpatialSelfAttention(E, H, attn_backend="manual", strategy="hybrid", ulysses_degree=2,
                                             healpix_field=False).double()
    hybrid.load_state_dict(single.state_dict())
    x = torch.randn(B, N, E, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a, b = shard_bounds(N, world)[rank]
    with torch.no_grad():
        made["hybrid layer"] = (hybrid, x[:, a:b], single(x)[:, a:b])
    return made


def _job(rank: int, world: int, store: str) -> dict:
    made = _models(rank, world)
    res = {}
    for when in ("before", "after"):
        if when == "after":
            dist.destroy_process_group()  # torch's own, not hpattn_dist.shutdown
            dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        for name, (model, x, ref) in made.items():
            try:
                with torch.no_grad():
                    out = model(x)
                res[name, when] = float((out - ref).abs().max() / ref.abs().max())
            except Exception as err:  # noqa: BLE001 - the error is the result
                res[name, when] = f"{type(err).__name__}: {err}"
    return res


@functools.lru_cache(maxsize=None)
def _results() -> list:
    with tempfile.TemporaryDirectory() as tmp:
        return run_ranks(_job, WORLD, f"{tmp}/store", timeout=120)


def test_models_built_on_the_default_group_follow_a_new_world():
    bad = [(rank, key, err) for rank, res in enumerate(_results()) for key, err in res.items()
           if not (isinstance(err, float) and err <= 1e-12)]
    assert not bad, bad
