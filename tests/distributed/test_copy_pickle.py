"""A layer built with a process group under ``copy.deepcopy`` and pickling (Note [copying a layer
bound to a group] in :mod:`hpattn_dist.modules`): deepcopy shares the group and computes the
same; pickling drops it, the unpickled layer raises on use, and once re-bound equals the
original. Reference: the float64 single-device block.
"""

from __future__ import annotations

import copy
import functools
import io
import pickle

import torch
import torch.distributed as dist

from tests.harness import run_ranks
from tests.training_model import bounds, field, make_block

N, WORLD = 9, 2


def _job(rank: int, world: int) -> dict:
    group = dist.new_group([0, 1])
    x, _ = field(N)
    x = x[:, bounds(N, world, rank)]
    block = make_block(True, strategy="ring", process_group=group)
    out = block(x).detach()
    twin = copy.deepcopy(block)
    res = {"out": out, "deepcopy_shares": twin.attn.process_group is group,
           "deepcopy_out": twin(x).detach(),
           "deepcopy_params_distinct": twin.attn.qkv_proj.weight is not block.attn.qkv_proj.weight}
    buf = io.BytesIO()
    torch.save(block, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    try:
        loaded(x)
        res["unbound_error"] = None
    except RuntimeError as err:
        res["unbound_error"] = str(err)
    loaded.attn.process_group = group
    res["rebound_out"] = loaded(x).detach()
    res["pickle_roundtrip"] = pickle.loads(pickle.dumps(block)).attn.process_group
    none_block = make_block(True, strategy="ring")
    res["none_kept"] = pickle.loads(pickle.dumps(none_block)).attn.process_group is None
    return res


@functools.lru_cache(maxsize=None)
def _results() -> list:
    return run_ranks(_job, WORLD, timeout=90)


def test_deepcopy_shares_the_group_and_computes_the_same():
    x, _ = field(N)
    ref = make_block(False)(x).detach()
    got = torch.cat([r["deepcopy_out"] for r in _results()], 1)
    assert (got - ref).abs().max() <= 1e-12 * ref.abs().max()
    for r in _results():
        assert r["deepcopy_shares"] and r["deepcopy_params_distinct"]
        assert torch.equal(r["deepcopy_out"], r["out"])


def test_pickling_drops_the_group_and_use_names_the_fix():
    for r in _results():
        assert r["unbound_error"] is not None and "layer.process_group" in r["unbound_error"]
        assert torch.equal(r["rebound_out"], r["out"])
        assert not isinstance(r["pickle_roundtrip"], dist.ProcessGroup)  # the marker
        assert r["none_kept"]
