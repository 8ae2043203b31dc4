"""Autograd-aware collectives along one tensor dim, over WORLD or any subgroup, uneven sizes.

They take the library's one group model (:func:`~hpattn_dist.comm.groups.resolve_group`: a
``ProcessGroup``, a ``GroupInfo``, or None for WORLD / a single uninitialised process, where they
copy), wait within the exchange timeout (:class:`~hpattn_dist.comm.waits.ExchangeError` on
failure) and communicate on the group's device (:func:`~hpattn_dist.comm.groups.comm_device_for`:
a CPU tensor over NCCL goes to the current CUDA device and comes back).

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
``"reduce_scatter"``, ``"all_reduce"``, and ``"all_gather.meta"`` for a size exchange.
"""

from __future__ import annotations

import numbers
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

from hpattn_dist.comm.counters import record
from hpattn_dist.comm.groups import GroupInfo, nbytes, resolve_group
from hpattn_dist.comm.meta import all_gather_ints
from hpattn_dist.comm.waits import run_collective
from hpattn_dist.shard_plan import even_split

__all__ = [
    "even_split",
    "gather_along_dim",
    "scatter_along_dim",
    "reduce_scatter_along_dim",
]

Group = Union[dist.ProcessGroup, GroupInfo, None]

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = (
    getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
)

# Backends found (at run time) to lack reduce-scatter; they use all-reduce + slice instead.
_NO_REDUCE_SCATTER: set[str] = set()


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def normalise_dim(x: Tensor, dim: int, name: str) -> int:
    """``dim`` as a non-negative index of ``x``; ValueError naming ``name`` when out of range."""
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


def _split_args(
    x: Tensor, group: Group, dim: int, sizes: Optional[Sequence[int]], name: str
) -> tuple[GroupInfo, int, list[int]]:
    """``(info, dim, sizes)`` for splitting ``x`` along ``dim`` over ``group``, checked."""
    dim = normalise_dim(x, dim, name)
    info = resolve_group(group)
    total = x.shape[dim]
    sizes = _check_sizes(even_split(total, info.world_size) if sizes is None else sizes, info.world_size, name)
    if sum(sizes) != total:
        raise ValueError(
            f"{name}: sizes {sizes} sum to {sum(sizes)} but x.shape[{dim}]={total} "
            f"(x of shape {tuple(x.shape)})"
        )
    return info, dim, sizes


# --------------------------------------------------------------------------------------------
# Raw (non-autograd) implementations, sharded dim at the front: [N_r, *] / [N, *]
# --------------------------------------------------------------------------------------------


def _all_gather_front(x_front: Tensor, sizes: list[int], info: GroupInfo) -> Tensor:
    """``[N_r, *]`` on every rank -> ``[N, *]`` in rank order (padded: Note [Uneven shards])."""
    world_size = len(sizes)
    block = max(sizes)
    rest = x_front.shape[1:]
    if block == 0:
        return x_front.new_empty((0, *rest))
    x_comm = x_front.to(info.comm_device(x_front.device))
    uneven = any(s != block for s in sizes)
    if uneven:
        padded = x_comm.new_zeros((block, *rest))
        padded[: x_comm.shape[0]] = x_comm
    else:
        padded = x_comm.contiguous()
    out = x_comm.new_empty((world_size * block, *rest))
    run_collective(info, "all_gather", "an all_gather", lambda: _all_gather_single(
        out, padded, group=info.group, async_op=True), out.device)
    record("all_gather", (world_size - 1) * nbytes(padded))
    out = out.to(x_front.device)
    if not uneven:
        return out
    blocks = out.view(world_size, block, *rest)
    return torch.cat([blocks[i, :s] for i, s in enumerate(sizes)], dim=0)


def _reduce_scatter_front(full_front: Tensor, sizes: list[int], info: GroupInfo) -> Tensor:
    """``[N, *]`` on every rank -> ``[N_r, *]``: this rank's slice of the sum over ranks."""
    world_size, rank = len(sizes), info.rank
    block = max(sizes)
    rest = full_front.shape[1:]
    if block == 0:
        return full_front.new_empty((0, *rest))
    home = full_front.device
    full_comm = full_front.to(info.comm_device(home))
    backend = str(info.backend_for(home))
    if backend not in _NO_REDUCE_SCATTER:
        if any(s != block for s in sizes):
            padded = full_comm.new_zeros((world_size, block, *rest))
            for i, piece in enumerate(torch.split(full_comm, sizes, dim=0)):
                padded[i, : sizes[i]] = piece
            padded = padded.view(world_size * block, *rest)
        else:
            padded = full_comm.contiguous()
        out = full_comm.new_empty((block, *rest))
        try:
            work = _reduce_scatter_single(out, padded, group=info.group, async_op=True)
        except (RuntimeError, NotImplementedError) as err:
            # Raised locally by the backend before any communication, identically on every rank.
            if "support" not in str(err).lower():
                raise
            _NO_REDUCE_SCATTER.add(backend)
        else:
            run_collective(info, "reduce_scatter", "a reduce_scatter", lambda: work, out.device)
            record("reduce_scatter", (world_size - 1) * nbytes(out))
            return out[: sizes[rank]].to(home)
    # Fallback: all-reduce the full tensor (about 2x the bytes of a reduce-scatter), then slice.
    summed = full_comm.clone(memory_format=torch.contiguous_format)
    run_collective(info, "all_reduce", "an all_reduce", lambda: dist.all_reduce(
        summed, op=dist.ReduceOp.SUM, group=info.group, async_op=True), summed.device)
    record("all_reduce", (2 * (world_size - 1) * nbytes(summed)) // world_size)
    start = sum(sizes[:rank])
    return summed[start : start + sizes[rank]].to(home, copy=True)


# --------------------------------------------------------------------------------------------
# Autograd Functions
# --------------------------------------------------------------------------------------------


def _gather(x: Tensor, info: GroupInfo, dim: int, sizes: list[int]) -> Tensor:
    if len(sizes) == 1:
        return x.clone()
    return _all_gather_front(x.movedim(dim, 0), sizes, info).movedim(0, dim).contiguous()


def _reduce_scatter(x: Tensor, info: GroupInfo, dim: int, sizes: list[int]) -> Tensor:
    if len(sizes) == 1:
        return x.clone()
    return _reduce_scatter_front(x.movedim(dim, 0), sizes, info).movedim(0, dim).contiguous()


def _scatter(x: Tensor, info: GroupInfo, dim: int, sizes: list[int]) -> Tensor:
    start = sum(sizes[:info.rank])
    return x.narrow(dim, start, sizes[info.rank]).clone(memory_format=torch.contiguous_format)


#: Each movement along a sharded dim: ``(forward, the movement its backward is)``.
_MOVES: dict[str, tuple[Callable[..., Tensor], str]] = {
    "gather": (_gather, "reduce_scatter"),
    "reduce_scatter": (_reduce_scatter, "gather"),
    "scatter": (_scatter, "gather"),
}


class _AlongDim(torch.autograd.Function):
    """A movement of shards along ``dim`` (``move``), whose backward is its adjoint movement.

    ================  ==============  ==============  ============================================
    move              x (input)       y (output)      formulas
    ================  ==============  ==============  ============================================
    gather            ``[*, N_r, *]`` ``[*, N, *]``   ``y = cat(x_0, ..., x_{P-1})``, same on all
                                                      ranks; ``dx = (sum_q dy_q)[slice r]``
                                                      (reduce-scatter)
    reduce_scatter    ``[*, N, *]``   ``[*, N_r, *]`` ``y = (sum_q x_q)[slice r]``;
                                                      ``dx = cat(dy_0, ..., dy_{P-1})`` (gather)
    scatter           ``[*, N, *]``   ``[*, N_r, *]`` ``y = x[slice r]`` of an x identical on every
                                                      rank; ``dx = cat(dy_0, ..., dy_{P-1})``
    ================  ==============  ==============  ============================================
    """

    @staticmethod
    def forward(ctx, x: Tensor, info: GroupInfo, dim: int, sizes: list[int], move: str) -> Tensor:
        ctx.info, ctx.dim, ctx.sizes, ctx.adjoint = info, dim, sizes, _MOVES[move][1]
        return _MOVES[move][0](x, info, dim, sizes)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        grad_x = _AlongDim.apply(grad_y, ctx.info, ctx.dim, ctx.sizes, ctx.adjoint)
        return grad_x, None, None, None, None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def gather_along_dim(
    x: Tensor,
    group: Group = None,
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
        group: process group (``None``: the default group, or a single process when
            torch.distributed is not initialised); WORLD or any subgroup, or a ``GroupInfo``.
        dim: the sharded dim (negative counts from the end).
        sizes: ``[N_0, ..., N_{P-1}]`` if known on every rank; ``None`` all-gathers them first
            (one extra small collective, label ``all_gather.meta``).

    Returns:
        ``[*, N, *]`` with ``N = sum(sizes)``, identical on every rank; a new tensor.

    Raises:
        ValueError: ``dim`` out of range, ``sizes`` of the wrong length or with negative
            entries, or ``x.shape[dim] != sizes[r]``.
        ExchangeError: the collective failed or timed out (Note [exchange timeout]).
    """
    name = "gather_along_dim"
    dim = normalise_dim(x, dim, name)
    info = resolve_group(group)
    if sizes is None:
        sizes = [row[0] for row in all_gather_ints([x.shape[dim]], info, x.device)]
    sizes = _check_sizes(sizes, info.world_size, name)
    if x.shape[dim] != sizes[info.rank]:
        raise ValueError(
            f"{name}: x.shape[{dim}]={x.shape[dim]} (x of shape {tuple(x.shape)}) but "
            f"sizes[{info.rank}]={sizes[info.rank]} for this group rank (sizes={sizes})"
        )
    return _AlongDim.apply(x, info, dim, sizes, "gather")


def scatter_along_dim(
    x: Tensor,
    group: Group = None,
    dim: int = 1,
    sizes: Optional[Sequence[int]] = None,
) -> Tensor:
    """This rank's slice along ``dim`` of a tensor present (identically) on every rank.

    Forward: a local slice, no communication. Backward: the slices' gradients are all-gathered,
    so every rank gets the full-tensor gradient ``cat(dy_0, ..., dy_{P-1})`` (the convention for
    replicated tensors: equal gradients on every rank, not summed over them).

    Args:
        x: full tensor ``[*, N, *]``, identical on every rank.
        group: process group (``None``: the default group, or a single process when
            torch.distributed is not initialised); WORLD or any subgroup, or a ``GroupInfo``.
        dim: the dim to split (negative counts from the end).
        sizes: ``[N_0, ..., N_{P-1}]`` summing to ``N``; ``None``: ``N // P`` each and the first
            ``N % P`` ranks one more (:func:`even_split`, the shard plan's rule).

    Returns:
        ``[*, N_r, *]``: a new contiguous tensor (not a view of ``x``).

    Raises:
        ValueError: ``dim`` out of range, ``sizes`` of the wrong length, with negative entries,
            or not summing to ``x.shape[dim]``.
        ExchangeError: the collective failed or timed out (Note [exchange timeout]).
    """
    info, dim, sizes = _split_args(x, group, dim, sizes, "scatter_along_dim")
    return _AlongDim.apply(x, info, dim, sizes, "scatter")


def reduce_scatter_along_dim(
    x: Tensor,
    group: Group = None,
    dim: int = 1,
    sizes: Optional[Sequence[int]] = None,
) -> Tensor:
    """This rank's slice along ``dim`` of the sum over ranks of ``x`` (the adjoint of gather).

    Forward: one reduce-scatter of ``P`` zero-padded blocks of ``M`` rows, ``(P - 1) * M`` rows
    sent per rank; where the backend lacks reduce-scatter, an all-reduce of the full tensor
    (``2 (P - 1) / P * N`` rows sent per rank) and a slice. Backward: all-gather.

    Args:
        x: ``[*, N, *]`` on every rank (different values allowed), same shape everywhere.
        group: as for :func:`gather_along_dim`.
        dim: the dim to split (negative counts from the end).
        sizes: ``[N_0, ..., N_{P-1}]`` summing to ``N``; ``None``: the balanced split as in
            :func:`scatter_along_dim`.

    Returns:
        ``[*, N_r, *]``, a new tensor.

    Raises:
        ValueError: as :func:`scatter_along_dim`.
        ExchangeError: the collective failed or timed out (Note [exchange timeout]).
    """
    info, dim, sizes = _split_args(x, group, dim, sizes, "reduce_scatter_along_dim")
    return _AlongDim.apply(x, info, dim, sizes, "reduce_scatter")
