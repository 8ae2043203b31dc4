"""FSDP2 (``fully_shard``) and DDP over a 2 x 2 DeviceMesh (data parallel x sequence parallel) on
gloo: three SGD steps equal three float64 single-device steps on the full batch and field, with the
gradient scaling of :func:`hpattn_dist.grad_sync.fsdp_sequence_parallel` /
:func:`~hpattn_dist.grad_sync.ddp_sequence_parallel`; without it (or, for FSDP2, on the root only)
the step is wrong, and misuse the helpers can see raises.

Legend: B batch per DP replica, N global pixels, E embed dim; world 4 = DP 2 x SP 2.
"""

from __future__ import annotations

import functools

import pytest
import torch

from hpattn_dist.grad_sync import ddp_sequence_parallel, fsdp_sequence_parallel
from launch.train_fsdp import build_ddp_model, build_fsdp_model, dp_sp_mesh, make_mesh, sp_loss
from tests.harness import run_ranks
from tests.training_model import B, bounds, field, make_block

N, DP, SP, STEPS, LR = 11, 2, 2, 3, 0.5


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full batch ``[DP * B, N, E]`` input and target of one step."""
    xs, ts = zip(*(field(N, seed=100 * step + i) for i in range(DP)))
    return torch.cat(xs), torch.cat(ts)


def _reference() -> dict:
    block = make_block(False)
    opt = torch.optim.SGD(block.parameters(), lr=LR)
    for step in range(STEPS):
        x, t = _data(step)
        ((block(x) - t) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in block.named_parameters()}


def _train(model, mesh, dtype: torch.dtype) -> None:
    """Three SGD steps; this rank feeds its dp replica's batch and its sp shard's pixels."""
    dp_rank, sp_rank = mesh["dp"].get_local_rank(), mesh["sp"].get_local_rank()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    local = bounds(N, SP, sp_rank)
    for step in range(STEPS):
        x, t = _data(step)
        rows = slice(dp_rank * B, (dp_rank + 1) * B)
        loss = sp_loss(model(x[rows, local].to(dtype)), t[rows, local].to(dtype), N)
        loss.backward()
        opt.step()
        opt.zero_grad()


def _error(fn, *args) -> str:
    try:
        fn(*args)
    except ValueError as e:
        return str(e)
    return "no error"


def _fsdp_misuse(mesh) -> list:
    """What fsdp_sequence_parallel says to a wrong mesh, a root left unsharded, a layer on WORLD."""
    from torch.distributed.fsdp import fully_shard

    flat = dp_sp_mesh(mesh)
    sharded = build_fsdp_model(make_block(True, process_group=mesh["sp"].get_group()), mesh, "none")
    children_only = make_block(True, process_group=mesh["sp"].get_group())
    for child in (children_only.attn, children_only.mlp):
        fully_shard(child, mesh=flat)
    on_world = build_fsdp_model(make_block(True), mesh, "none")
    plain = fully_shard(torch.nn.Linear(2, 2), mesh=flat)  # no hpattn_dist layer to check
    return [_error(fsdp_sequence_parallel, sharded, mesh["dp"], SP),
            _error(fsdp_sequence_parallel, plain, mesh["dp"], SP),
            _error(fsdp_sequence_parallel, children_only, flat, SP),
            _error(fsdp_sequence_parallel, on_world, flat, SP),
            _error(fsdp_sequence_parallel, sharded, flat, 3)]


def _job(rank: int, world: int, scaling: str, dtype: torch.dtype = torch.float64) -> dict:
    mesh = make_mesh(DP, SP)
    block = make_block(True, strategy="ring", process_group=mesh["sp"].get_group()).to(dtype)
    model = build_fsdp_model(block, mesh, scaling=scaling)
    _train(model, mesh, dtype)
    out = {n: p.full_tensor().detach().double() for n, p in model.named_parameters()}
    if scaling == "library" and dtype == torch.float64:
        out["misuse"] = _fsdp_misuse(mesh)
    return out


def _ddp_job(rank: int, world: int) -> dict:
    """All DDP cases in one spawn (world-4 starts are the slow part): library, none, misuse."""
    mesh = make_mesh(DP, SP)
    out = {}
    for scaling in ("library", "none"):
        model = build_ddp_model(make_block(True, strategy="ring", process_group=mesh["sp"].get_group()),
                                mesh, scaling)
        _train(model, mesh, torch.float64)
        out[scaling] = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    fresh = build_ddp_model(make_block(True, process_group=mesh["sp"].get_group()), mesh, "none")
    on_world = build_ddp_model(make_block(True), mesh, "none")
    out["misuse"] = [_error(ddp_sequence_parallel, fresh.module, SP),
                     _error(ddp_sequence_parallel, fresh, 3),
                     _error(ddp_sequence_parallel, on_world, SP)]
    return out


@functools.lru_cache(maxsize=None)
def _results(scaling: str, dtype: torch.dtype = torch.float64) -> list:
    return run_ranks(_job, DP * SP, scaling, dtype, timeout=180)


def _max_rel(got: dict, ref: dict) -> float:
    return max(((got[n] - r).abs().max() / r.abs().max()).item() for n, r in ref.items())


def test_fsdp2_dp_x_sp_training_equals_float64_single_device():
    ref = _reference()
    for rank, got in enumerate(_results("library")):
        assert _max_rel(got, ref) <= 1e-12, rank


def test_fsdp2_float32_on_gloo_sums_then_divides():
    """Was: "Cannot use ReduceOp.PREMUL_SUM with Gloo" (a divide factor in fp32 on gloo)."""
    ref = _reference()
    for rank, got in enumerate(_results("library", torch.float32)):
        assert _max_rel(got, ref) <= 1e-5, rank


@pytest.mark.parametrize("scaling", ["none", "root_only"])
def test_fsdp2_without_every_module_scaled_is_wrong(scaling):
    """The test can fail: FSDP's own averaging (or the factor on the root only) is off."""
    ref = _reference()
    assert _max_rel(_results(scaling)[0], ref) > 1e-3


def test_fsdp2_misuse_raises():
    misuse = _results("library")[0]["misuse"]
    # mesh["dp"] instead of the mesh given to fully_shard: seen through the layer, or the parameters
    assert "ranks [0, 1], which is not a group of sp_size=2 ranks inside the gradient reduction " \
        "group (global ranks [0, 2])" in misuse[0]
    assert "lives on a mesh of global ranks [0, 1, 2, 3], not on the ranks [0, 2]" in misuse[1]
    assert "is not sharded by FSDP" in misuse[2]  # root not fully_shard-ed
    assert "shards its pixels over global ranks [0, 1, 2, 3]" in misuse[3]  # layer on WORLD
    assert "sp_size=3 does not divide the size 4" in misuse[4]


@functools.lru_cache(maxsize=None)
def _ddp_results() -> list:
    return run_ranks(_ddp_job, DP * SP, timeout=180)


def test_ddp_dp_x_sp_training_equals_float64_single_device():
    ref = _reference()
    for rank, got in enumerate(_ddp_results()):
        assert _max_rel(got["library"], ref) <= 1e-12, rank


def test_ddp_without_the_hook_is_wrong():
    """The test can fail: DDP's own average over dp x sp is P_sp too small."""
    assert _max_rel(_ddp_results()[0]["none"], _reference()) > 1e-3


def test_ddp_misuse_raises():
    misuse = _ddp_results()[0]["misuse"]
    assert "expected a DistributedDataParallel model" in misuse[0]
    assert "sp_size=3 does not divide the size 4" in misuse[1]
    assert "shards its pixels over global ranks [0, 1, 2, 3]" in misuse[2]
