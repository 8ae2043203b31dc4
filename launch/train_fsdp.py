"""FSDP2 or DDP x sequence parallelism on a 2-D DeviceMesh (data parallel x sequence parallel).

Recipe (torchtitan style)::

    mesh = make_mesh(dp, sp)                       # DeviceMesh ("dp", "sp"), dp * sp = world
    model = MyModel(...)                           # DistributedSpatialSelfAttention layers built with
                                                   # process_group=mesh["sp"].get_group()
    model = build_fsdp_model(model, mesh)          # fully_shard over the flattened dp x sp ranks,
    # or  = build_ddp_model(model, mesh)           # or DDP over them; gradients: SUM over sp, MEAN over dp
    for x, target in loader:                       # x: this dp replica's batch, this sp rank's pixels
        loss = sp_loss(model(x), target, npix)     # local SUM / GLOBAL pixel count, batch mean
        loss.backward(); opt.step(); opt.zero_grad()

FSDP2 shards the parameters over all dp x sp ranks (each holds 1 / (dp * sp) of them); its
reduce-scatter sums over those ranks and divides by ``dp`` only
(:func:`hpattn_dist.grad_sync.fsdp_sequence_parallel`). DDP replicates them; its all-reduce does
the same through a comm hook (:func:`hpattn_dist.grad_sync.ddp_sequence_parallel`). Note
[sequence-parallel gradients] says why.

Run: ``torchrun --nproc-per-node 4 launch/train_fsdp.py --dp 2 --sp 2 [--wrap ddp]`` (gloo on CPU,
NCCL on GPU).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from hpattn_dist.grad_sync import ddp_sequence_parallel, fsdp_sequence_parallel, sharded_mean
from hpattn_dist.shutdown import ending_process_group


def make_mesh(dp: int, sp: int) -> DeviceMesh:
    """The ``("dp", "sp")`` mesh over the default group (sp ranks adjacent: fastest links)."""
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device, (dp, sp), mesh_dim_names=("dp", "sp"))


def dp_sp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D mesh of all dp x sp ranks (the gradient reduction runs over it)."""
    return mesh["dp", "sp"]._flatten("dp_sp")


def build_fsdp_model(model: nn.Module, mesh: DeviceMesh, scaling: str = "library") -> nn.Module:
    """``fully_shard`` every child of ``model`` and the root over the flattened dp x sp mesh.

    ``scaling``: ``"library"`` (correct, :func:`fsdp_sequence_parallel`); ``"none"`` and
    ``"root_only"`` exist to show what goes wrong without it.
    """
    from torch.distributed.fsdp import fully_shard

    flat = dp_sp_mesh(mesh)
    for child in model.children():
        if any(p.requires_grad for p in child.parameters()):
            fully_shard(child, mesh=flat)
    fully_shard(model, mesh=flat)
    sp = mesh["sp"].size()
    if scaling == "library":
        fsdp_sequence_parallel(model, flat, sp)
    elif scaling == "root_only":
        model.set_gradient_divide_factor(float(flat.size() // sp))
    elif scaling != "none":
        raise ValueError(f"scaling must be 'library', 'none' or 'root_only', got {scaling!r}")
    return model


def build_ddp_model(model: nn.Module, mesh: DeviceMesh, scaling: str = "library") -> nn.Module:
    """``DistributedDataParallel`` over the flattened dp x sp ranks.

    ``scaling``: ``"library"`` (correct, :func:`ddp_sequence_parallel`); ``"none"`` (DDP's own
    average, P_sp too small) exists to show what goes wrong without it.
    """
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model, process_group=dp_sp_mesh(mesh).get_group())
    if scaling == "library":
        ddp_sequence_parallel(ddp, mesh["sp"].size())
    elif scaling != "none":
        raise ValueError(f"scaling must be 'library' or 'none', got {scaling!r}")
    return ddp


def sp_loss(y: torch.Tensor, target: torch.Tensor, npix: int) -> torch.Tensor:
    """Mean squared error of this rank's pixels as its share of the global mean ``[B, N_r, C]``."""
    return sharded_mean((y - target) ** 2, npix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--sp", type=int, default=2)
    parser.add_argument("--npix", type=int, default=768)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--wrap", choices=("fsdp", "ddp"), default="fsdp")
    args = parser.parse_args()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    with ending_process_group():  # Note [clean exit] in hpattn_dist/shutdown.py
        from hpattn_dist import DistributedSpatialSelfAttention

        mesh = make_mesh(args.dp, args.sp)
        torch.manual_seed(0)
        embed, heads = 32, 4
        model = nn.Sequential(nn.LayerNorm(embed),
                              DistributedSpatialSelfAttention(embed, heads, process_group=mesh["sp"].get_group()),
                              nn.Linear(embed, embed))
        model = (build_fsdp_model if args.wrap == "fsdp" else build_ddp_model)(model, mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sp, sp_rank = args.sp, mesh["sp"].get_local_rank()
        n_local = args.npix // sp + (1 if sp_rank < args.npix % sp else 0)
        for step in range(args.steps):
            g = torch.Generator().manual_seed(1000 * step + mesh["dp"].get_local_rank())
            x = torch.randn(2, n_local, embed, generator=g)
            loss = sp_loss(model(x), torch.zeros_like(x), args.npix)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if dist.get_rank() == 0:
                print(f"step {step}: local loss {loss.item():.6f}")


if __name__ == "__main__":
    main()
