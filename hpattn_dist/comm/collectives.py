"""Autograd-aware collectives along one tensor dim, over WORLD or any subgroup, uneven sizes.

These are our own ``torch.autograd.Function``s rather than ``torch.distributed.nn.functional``
(whose ``all_gather`` fails in backward on gloo subgroups). They form the usual adjoint pairs:

=========================  ==============================  =================================
function                   forward                         backward
=========================  ==============================  =================================
:func:`gather_along_dim`   all-gather shards -> full        reduce-scatter (sum, then slice)
:func:`scatter_along_dim`  full (replicated) -> own slice   all-gather of the slice gradients
:func:`reduce_scatter_along_dim`  sum of fulls -> own slice  all-gather
=========================  ==============================  =================================

Backward passes call the same Functions, so double backward works too. As with every collective
in autograd, either every rank of the group runs the backward through a given call or none does
(a rank whose loss does not depend on the output still has to backpropagate through it, e.g. with
a zero loss term); otherwise the ranks that do wait forever for the others.

Legend: P group size, r this process's rank in the group, N the full length along ``dim``,
N_r = ``sizes[r]`` the length of rank r's shard (``sum(sizes) == N``), M = ``max(sizes)``,
``*`` any other dims (identical on all ranks). Shapes are written with the sharded dim in the
middle, ``[*, N_r, *]``.

Note [Uneven shards]
~~~~~~~~~~~~~~~~~~~~
Gloo's all-gather requires equal sizes on every rank ("invalid tensor size at index ..."), so an
uneven gather pads every shard with zeros to M along ``dim``, all-gathers ``P`` equal blocks into
one ``[P * M, *]`` buffer (sharded dim moved to the front) and trims each block back to its N_r.
Reduce-scatter is the mirror image: the full tensor is split by ``sizes``, each piece zero-padded
to M, and the ``[P * M, *]`` buffer reduce-scattered. When every size is equal nothing is padded.
Where a backend lacks reduce-scatter (older gloo) it falls back to all-reduce of the full tensor
followed by the slice; that sends about twice the bytes (see :func:`reduce_scatter_along_dim`).

Note [Counting]
~~~~~~~~~~~~~~~
Every collective reports to :func:`hpattn_dist.comm.counters.record` the payload this process
*sends* under the ring algorithm (the usual "bus bandwidth" convention): all-gather
``(P - 1) * block`` bytes, reduce-scatter ``(P - 1) * block`` bytes, all-reduce
``2 * (P - 1) / P * full`` bytes, where ``block`` is one (padded) ``[M, *]`` block. Nothing is
recorded when ``P == 1`` (no communication happens). Labels: ``"all_gather"``,
``"reduce_scatter"``, ``"all_reduce"`` and ``"all_gather_sizes"`` for the size exchange.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from hpattn_dist.comm.counters import record

__all__ = [
    "group_rank_and_size",
    "all_gather_sizes",
    "gather_along_dim",
    "scatter_along_dim",
    "reduce_scatter_along_dim",
]

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = (
    getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
)

# Backends found (at run time) to lack reduce-scatter; they use all-reduce + slice instead.
_NO_REDUCE_SCATTER: set[str] = set()


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def group_rank_and_size(group: Optional[dist.ProcessGroup] = None) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size ``P`` (``None``: default group).

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised (this library never does it).
        ValueError: this process is not a member of ``group``.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group "
            "(or launch with torchrun) before using hpattn_dist collectives"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of the given group"
        )
    return rank, dist.get_world_size(group)


def _normalise_dim(x: Tensor, dim: int, name: str) -> int:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(dim, numbers.Integral) or isinstance(dim, bool):
        raise ValueError(f"{name}: dim must be an int, got {dim!r}")
    if x.dim() == 0 or not -x.dim() <= dim < x.dim():
        raise ValueError(f"{name}: dim={dim} is out of range for x of shape {tuple(x.shape)}")
    return int(dim) % x.dim()


def _check_sizes(sizes: Sequence[int], world_size: int, name: str) -> list[int]:
    try:
        sizes = list(sizes)
    except TypeError:
        raise ValueError(f"{name}: sizes must be a sequence of ints, got {sizes!r}") from None
    if len(sizes) != world_size:
        raise ValueError(
            f"{name}: sizes has {len(sizes)} entries {sizes} but the group has {world_size} ranks"
        )
    for size in sizes:
        if not isinstance(size, numbers.Integral) or isinstance(size, bool) or size < 0:
            raise ValueError(f"{name}: sizes must be non-negative ints, got {sizes}")
    return [int(s) for s in sizes]


def _balanced_sizes(total: int, world_size: int) -> list[int]:
    # Same rule as hpattn_dist.healpix.shard_sizes (that module sits above this one).
    base, extra = divmod(total, world_size)
    return [base + 1 if rank < extra else base for rank in range(world_size)]


def _split_args(
    x: Tensor, group: Optional[dist.ProcessGroup], dim: int, sizes: Optional[Sequence[int]], name: str
) -> tuple[int, int, list[int]]:
    """``(rank, dim, sizes)`` for splitting ``x`` along ``dim`` over ``group``, checked."""
    dim = _normalise_dim(x, dim, name)
    rank, world_size = group_rank_and_size(group)
    total = x.shape[dim]
    sizes = _check_sizes(_balanced_sizes(total, world_size) if sizes is None else sizes, world_size, name)
    if sum(sizes) != total:
        raise ValueError(
            f"{name}: sizes {sizes} sum to {sum(sizes)} but x.shape[{dim}]={total} "
            f"(x of shape {tuple(x.shape)})"
        )
    return rank, dim, sizes


def _default_device(group: Optional[dist.ProcessGroup]) -> torch.device:
    backend = dist.get_backend(group)
    if "nccl" in str(backend).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------


def all_gather_sizes(
    n_local: int,
    group: Optional[dist.ProcessGroup] = None,
    *,
    device: Optional[torch.device | str] = None,
) -> list[int]:
    """Every rank's local length, in group-rank order (one small all-gather of an int64).

    Args:
        n_local: this rank's length N_r (a non-negative int).
        group: process group (``None``: the default group).
        device: where the int64 buffer lives. NCCL needs the current CUDA device; ``None`` picks
            it for an NCCL group and the CPU otherwise. Pass the data tensor's device when in
            doubt.

    Returns:
        ``[N_0, ..., N_{P-1}]`` as Python ints, identical on every rank.

    Raises:
        ValueError: ``n_local`` is not a non-negative int; this process is not in ``group``.
        RuntimeError: ``torch.distributed`` is not initialised.
    """
    if not isinstance(n_local, numbers.Integral) or isinstance(n_local, bool) or n_local < 0:
        raise ValueError(f"all_gather_sizes: n_local must be a non-negative int, got {n_local!r}")
    _, world_size = group_rank_and_size(group)
    if world_size == 1:
        return [int(n_local)]
    device = _default_device(group) if device is None else torch.device(device)
    local = torch.tensor([int(n_local)], dtype=torch.int64, device=device)
    out = torch.empty(world_size, dtype=torch.int64, device=device)
    _all_gather_single(out, local, group=group)
    record("all_gather_sizes", (world_size - 1) * _nbytes(local))
    return [int(v) for v in out.tolist()]


# --------------------------------------------------------------------------------------------
# Raw (non-autograd) implementations, sharded dim at the front: [N_r, *] / [N, *]
# --------------------------------------------------------------------------------------------


def _all_gather_front(x_front: Tensor, sizes: list[int], group) -> Tensor:
    """``[N_r, *]`` on every rank -> ``[N, *]`` in rank order (padded: Note [Uneven shards])."""
    world_size = len(sizes)
    block = max(sizes)
    rest = x_front.shape[1:]
    if block == 0:
        return x_front.new_empty((0, *rest))
    uneven = any(s != block for s in sizes)
    if uneven:
        padded = x_front.new_zeros((block, *rest))
        padded[: x_front.shape[0]] = x_front
    else:
        padded = x_front.contiguous()
    out = x_front.new_empty((world_size * block, *rest))
    _all_gather_single(out, padded, group=group)
    record("all_gather", (world_size - 1) * _nbytes(padded))
    if not uneven:
        return out
    blocks = out.view(world_size, block, *rest)
    return torch.cat([blocks[i, :s] for i, s in enumerate(sizes)], dim=0)


def _reduce_scatter_front(full_front: Tensor, sizes: list[int], rank: int, group) -> Tensor:
    """``[N, *]`` on every rank -> ``[N_r, *]``: this rank's slice of the sum over ranks."""
    world_size = len(sizes)
    block = max(sizes)
    rest = full_front.shape[1:]
    if block == 0:
        return full_front.new_empty((0, *rest))
    backend = str(dist.get_backend(group))
    if backend not in _NO_REDUCE_SCATTER:
        if any(s != block for s in sizes):
            padded = full_front.new_zeros((world_size, block, *rest))
            for i, piece in enumerate(torch.split(full_front, sizes, dim=0)):
                padded[i, : sizes[i]] = piece
            padded = padded.view(world_size * block, *rest)
        else:
            padded = full_front.contiguous()
        out = full_front.new_empty((block, *rest))
        try:
            _reduce_scatter_single(out, padded, group=group)
        except (RuntimeError, NotImplementedError) as err:
            # Raised locally by the backend before any communication, identically on every rank.
            if "support" not in str(err).lower():
                raise
            _NO_REDUCE_SCATTER.add(backend)
        else:
            record("reduce_scatter", (world_size - 1) * _nbytes(out))
            return out[: sizes[rank]]
    # Fallback: all-reduce the full tensor (about 2x the bytes of a reduce-scatter), then slice.
    summed = full_front.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
    record("all_reduce", (2 * (world_size - 1) * _nbytes(summed)) // world_size)
    start = sum(sizes[:rank])
    return summed[start : start + sizes[rank]].clone()


# --------------------------------------------------------------------------------------------
# Autograd Functions
# --------------------------------------------------------------------------------------------


class _GatherAlongDim(torch.autograd.Function):
    """All-gather of shards along ``dim``.

    ============  ==============  ==============================================
    tensor        local shape     formula
    ============  ==============  ==============================================
    x (input)     ``[*, N_r, *]`` this rank's shard
    y (output)    ``[*, N, *]``   ``y = cat(x_0, ..., x_{P-1})``, same on all ranks
    dx            ``[*, N_r, *]`` ``dx = (sum_q dy_q)[slice r]`` (reduce-scatter)
    ============  ==============  ==============================================
    """

    @staticmethod
    def forward(ctx, x: Tensor, group, dim: int, sizes: list[int], rank: int) -> Tensor:
        ctx.group, ctx.dim, ctx.sizes, ctx.rank = group, dim, sizes, rank
        if len(sizes) == 1:
            return x.clone()
        return _all_gather_front(x.movedim(dim, 0), sizes, group).movedim(0, dim).contiguous()

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        grad_x = _ReduceScatterAlongDim.apply(grad_y, ctx.group, ctx.dim, ctx.sizes, ctx.rank)
        return grad_x, None, None, None, None


class _ReduceScatterAlongDim(torch.autograd.Function):
    """Sum over ranks, then this rank's slice along ``dim``.

    ============  ==============  ==============================================
    tensor        local shape     formula
    ============  ==============  ==============================================
    x (input)     ``[*, N, *]``   one full tensor per rank
    y (output)    ``[*, N_r, *]`` ``y = (sum_q x_q)[slice r]``
    dx            ``[*, N, *]``   ``dx = cat(dy_0, ..., dy_{P-1})`` (all-gather)
    ============  ==============  ==============================================
    """

    @staticmethod
    def forward(ctx, x: Tensor, group, dim: int, sizes: list[int], rank: int) -> Tensor:
        ctx.group, ctx.dim, ctx.sizes, ctx.rank = group, dim, sizes, rank
        if len(sizes) == 1:
            return x.clone()
        y = _reduce_scatter_front(x.movedim(dim, 0), sizes, rank, group)
        return y.movedim(0, dim).contiguous()

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        grad_x = _GatherAlongDim.apply(grad_y, ctx.group, ctx.dim, ctx.sizes, ctx.rank)
        return grad_x, None, None, None, None


class _ScatterAlongDim(torch.autograd.Function):
    """This rank's slice of a tensor replicated on every rank (no communication forward).

    ============  ==============  ==============================================
    tensor        local shape     formula
    ============  ==============  ==============================================
    x (input)     ``[*, N, *]``   identical on every rank
    y (output)    ``[*, N_r, *]`` ``y = x[slice r]``
    dx            ``[*, N, *]``   ``dx = cat(dy_0, ..., dy_{P-1})`` (all-gather)
    ============  ==============  ==============================================
    """

    @staticmethod
    def forward(ctx, x: Tensor, group, dim: int, sizes: list[int], rank: int) -> Tensor:
        ctx.group, ctx.dim, ctx.sizes, ctx.rank = group, dim, sizes, rank
        start = sum(sizes[:rank])
        return x.narrow(dim, start, sizes[rank]).clone(memory_format=torch.contiguous_format)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        grad_x = _GatherAlongDim.apply(grad_y, ctx.group, ctx.dim, ctx.sizes, ctx.rank)
        return grad_x, None, None, None, None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def gather_along_dim(
    x: Tensor,
    group: Optional[dist.ProcessGroup] = None,
    dim: int = 1,
    sizes: Optional[Sequence[int]] = None,
) -> Tensor:
    """Concatenate every rank's shard along ``dim`` in group-rank order, on every rank.

    Forward: one all-gather of ``P`` blocks of ``M`` rows (Note [Uneven shards]).
    Backward: each rank used the whole gathered tensor, so the gradient of the shard is the
    gradient of the full tensor summed over ranks, then this rank's slice: one reduce-scatter
    (or all-reduce + slice where the backend lacks reduce-scatter).

    Args:
        x: shard ``[*, N_r, *]``; all dims but ``dim`` equal on every rank, same dtype.
        group: process group (``None``: the default group); WORLD or any subgroup.
        dim: the sharded dim (negative counts from the end).
        sizes: ``[N_0, ..., N_{P-1}]`` if known on every rank; ``None`` all-gathers them first
            (one extra small collective, see :func:`all_gather_sizes`).

    Returns:
        ``[*, N, *]`` with ``N = sum(sizes)``, identical on every rank; a new tensor.

    Raises:
        ValueError: ``dim`` out of range, ``sizes`` of the wrong length or with negative
            entries, or ``x.shape[dim] != sizes[r]``.
        RuntimeError: ``torch.distributed`` not initialised.
    """
    name = "gather_along_dim"
    dim = _normalise_dim(x, dim, name)
    rank, world_size = group_rank_and_size(group)
    if sizes is None:
        sizes = all_gather_sizes(x.shape[dim], group, device=x.device)
    sizes = _check_sizes(sizes, world_size, name)
    if x.shape[dim] != sizes[rank]:
        raise ValueError(
            f"{name}: x.shape[{dim}]={x.shape[dim]} (x of shape {tuple(x.shape)}) but "
            f"sizes[{rank}]={sizes[rank]} for this group rank (sizes={sizes})"
        )
    return _GatherAlongDim.apply(x, group, dim, sizes, rank)


def scatter_along_dim(
    x: Tensor,
    group: Optional[dist.ProcessGroup] = None,
    dim: int = 1,
    sizes: Optional[Sequence[int]] = None,
) -> Tensor:
    """This rank's slice along ``dim`` of a tensor present (identically) on every rank.

    Forward: a local slice, no communication. Backward: the slices' gradients are all-gathered,
    so every rank gets the full-tensor gradient ``cat(dy_0, ..., dy_{P-1})`` (the convention for
    replicated tensors: equal gradients on every rank, not summed over them).

    Args:
        x: full tensor ``[*, N, *]``, identical on every rank.
        group: process group (``None``: the default group); WORLD or any subgroup.
        dim: the dim to split (negative counts from the end).
        sizes: ``[N_0, ..., N_{P-1}]`` summing to ``N``; ``None``: ``N // P`` each and the first
            ``N % P`` ranks one more (the rule of :func:`hpattn_dist.healpix.shard_sizes`).

    Returns:
        ``[*, N_r, *]``: a new contiguous tensor (not a view of ``x``).

    Raises:
        ValueError: ``dim`` out of range, ``sizes`` of the wrong length, with negative entries,
            or not summing to ``x.shape[dim]``.
        RuntimeError: ``torch.distributed`` not initialised.
    """
    rank, dim, sizes = _split_args(x, group, dim, sizes, "scatter_along_dim")
    return _ScatterAlongDim.apply(x, group, dim, sizes, rank)


def reduce_scatter_along_dim(
    x: Tensor,
    group: Optional[dist.ProcessGroup] = None,
    dim: int = 1,
    sizes: Optional[Sequence[int]] = None,
) -> Tensor:
    """This rank's slice along ``dim`` of the sum over ranks of ``x`` (the adjoint of gather).

    Forward: one reduce-scatter of ``P`` zero-padded blocks of ``M`` rows, ``(P - 1) * M`` rows
    sent per rank; where the backend lacks reduce-scatter, an all-reduce of the full tensor
    (``2 (P - 1) / P * N`` rows sent per rank) and a slice. Backward: all-gather.

    Args:
        x: ``[*, N, *]`` on every rank (different values allowed), same shape everywhere.
        group: process group (``None``: the default group).
        dim: the dim to split (negative counts from the end).
        sizes: ``[N_0, ..., N_{P-1}]`` summing to ``N``; ``None``: the balanced split as in
            :func:`scatter_along_dim`.

    Returns:
        ``[*, N_r, *]``, a new tensor.

    Raises:
        ValueError: as :func:`scatter_along_dim`.
        RuntimeError: ``torch.distributed`` not initialised.
    """
    rank, dim, sizes = _split_args(x, group, dim, sizes, "reduce_scatter_along_dim")
    return _ReduceScatterAlongDim.apply(x, group, dim, sizes, rank)
