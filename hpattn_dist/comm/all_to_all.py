"""Autograd-aware all-to-all over any process group (WORLD, a subgroup, a mesh axis), uneven sizes.

Legend: P group size, r this process's rank in the group, ``sd`` the scatter dim (split into P
pieces, piece j goes to rank j), ``gd`` the gather dim (the pieces received from every rank are
concatenated along it, in group-rank order). ``S_j`` = ``scatter_sizes[j]`` (length along ``sd`` of
the piece for rank j, ``sum_j S_j = x.shape[sd]``), ``G_j`` = ``gather_sizes[j]`` (length along
``gd`` of rank j's input, ``x.shape[gd] = G_r`` here).

Example, Ulysses (heads -> pixels), ``sd = 1`` (heads, ``S_j = H / P``), ``gd = 2`` (pixels,
``G_j = N_j``)::

    x [B, H, N_r, D]  --all_to_all-->  y [B, H/P, N, D]      (N = sum_j N_j)

Note [all-to-all adjoint]
    The forward sends piece ``x[sd: S-block j]`` to rank j and concatenates what arrives along
    ``gd``. It is a permutation of elements across ranks, so its adjoint is its inverse: the SAME
    all-to-all with the two dims and the two size lists swapped (``sd <-> gd``,
    ``S <-> G``). The backward therefore calls the same Function, so double backward works too.
    Our own Function holds the group it was given; ``torch.distributed.nn``'s collectives, whose
    backward misbehaves on gloo subgroups, are not used.

Note [all-to-all transport]
    Gloo's list form ``dist.all_to_all`` requires equal tensor sizes, but ``all_to_all_single``
    takes per-peer split sizes on gloo (CPU) and NCCL alike, zero included. Each piece is therefore
    flattened into ONE send buffer with ``in_splits[j] = numel(piece j)``; the receive buffer is
    split by ``out_splits[i] = numel(piece from rank i)`` (known locally from ``S_r`` and ``G_i``)
    and each part is viewed back to its shape before the concatenation. Nothing is padded.

Counting: :func:`hpattn_dist.comm.counters.record` gets the bytes this process sends to OTHER
ranks (its own piece stays local): ``(x.numel() - numel(piece r)) * itemsize``, under ``label``
forward and ``label + ".grad"`` for the backward all-to-all. Nothing is recorded when P == 1.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

from hpattn_dist.comm.counters import record
from hpattn_dist.comm.groups import GroupInfo, resolve_group
from hpattn_dist.comm.meta import all_gather_ints
from hpattn_dist.comm.waits import run_collective

__all__ = ["all_to_all", "all_to_all_flat"]


def _piece_shape(shape: Sequence[int], sd: int, gd: int, s_len: int, g_len: int) -> list[int]:
    out = list(shape)
    out[sd], out[gd] = s_len, g_len
    return out


def all_to_all_flat(send: Tensor, in_splits: list[int], out_splits: list[int], info: GroupInfo,
                    label: str) -> Tensor:
    """Send ``in_splits[j]`` consecutive elements of the 1-D ``send`` to rank j; return the 1-D
    concatenation, in source-rank order, of the ``out_splits[i]`` elements from each rank i.

    Not differentiable: the transport under :func:`all_to_all` and
    :mod:`hpattn_dist.comm.head_exchange`. Records the bytes sent to OTHER ranks under ``label``.
    """
    recv = send.new_empty(sum(out_splits))
    run_collective(info, label, "an all_to_all", lambda: dist.all_to_all_single(
        recv, send, out_splits, in_splits, group=info.group, async_op=True), send.device)
    record(label, (send.numel() - in_splits[info.rank]) * send.element_size())
    return recv


def _all_to_all_raw(
    x: Tensor,
    info: GroupInfo,
    sd: int,
    gd: int,
    scatter_sizes: list[int],
    gather_sizes: list[int],
    label: str,
) -> Tensor:
    """One ``all_to_all_single`` per Note [all-to-all transport]; ``x`` as in :func:`all_to_all`."""
    r = info.rank
    if info.world_size == 1:
        return x.clone(memory_format=torch.contiguous_format)
    pieces = x.split(scatter_sizes, dim=sd)
    in_splits = [piece.numel() for piece in pieces]
    send = x.new_empty(x.numel())
    for piece, chunk in zip(pieces, send.split(in_splits)):
        chunk.view(piece.shape).copy_(piece)  # one copy per element, piece by piece
    shapes = [_piece_shape(x.shape, sd, gd, scatter_sizes[r], g) for g in gather_sizes]
    out_splits = [math.prod(s) for s in shapes]
    recv = all_to_all_flat(send, in_splits, out_splits, info, label)
    parts = [part.view(s) for part, s in zip(recv.split(out_splits), shapes)]
    return torch.cat(parts, dim=gd)


class _AllToAll(torch.autograd.Function):
    """All-to-all: scatter ``sd``, gather ``gd`` (shard table for this rank r).

    ============  ==========================================  ===================================
    tensor        local shape                                 formula
    ============  ==========================================  ===================================
    x (input)     ``[.., sd: sum_j S_j, .., gd: G_r, ..]``    this rank's tensor
    y (output)    ``[.., sd: S_r, .., gd: sum_i G_i, ..]``    ``cat_i(x_i[S-block r], dim=gd)``
    dx            shape of x                                  same all-to-all, sd <-> gd, S <-> G
    ============  ==========================================  ===================================
    """

    @staticmethod
    def forward(ctx, x: Tensor, info: GroupInfo, sd: int, gd: int, scatter_sizes: list[int],
                gather_sizes: list[int], label: str) -> Tensor:
        ctx.args = (info, gd, sd, gather_sizes, scatter_sizes, label + ".grad")
        return _all_to_all_raw(x, info, sd, gd, scatter_sizes, gather_sizes, label)

    @staticmethod
    def backward(ctx, dy: Tensor):
        return (_AllToAll.apply(dy.contiguous(), *ctx.args), None, None, None, None, None, None)


def _check_dims(x: Tensor, scatter_dim: int, gather_dim: int) -> tuple[int, int]:
    if not isinstance(x, Tensor):
        raise ValueError(f"all_to_all: x must be a torch.Tensor, got {type(x).__name__}")
    dims = []
    for name, d in (("scatter_dim", scatter_dim), ("gather_dim", gather_dim)):
        if not isinstance(d, int) or isinstance(d, bool) or not -x.dim() <= d < x.dim():
            raise ValueError(f"all_to_all: {name}={d!r} is out of range for x of shape {tuple(x.shape)}")
        dims.append(d % x.dim())
    if dims[0] == dims[1]:
        raise ValueError(f"all_to_all: scatter_dim and gather_dim must differ, both are {dims[0]}")
    return dims[0], dims[1]


def _check_sizes(name: str, sizes: Sequence[int], world_size: int, total: Optional[int]) -> list[int]:
    sizes = [int(s) for s in sizes]
    if len(sizes) != world_size or any(s < 0 for s in sizes):
        raise ValueError(f"all_to_all: {name} must hold {world_size} non-negative ints, got {sizes}")
    if total is not None and sum(sizes) != total:
        raise ValueError(f"all_to_all: {name} {sizes} sums to {sum(sizes)}, but x has {total} there")
    return sizes


def all_to_all(
    x: Tensor,
    group: Union[dist.ProcessGroup, GroupInfo, None] = None,
    *,
    scatter_dim: int,
    gather_dim: int,
    scatter_sizes: Optional[Sequence[int]] = None,
    gather_sizes: Optional[Sequence[int]] = None,
    label: str = "all_to_all",
) -> Tensor:
    """Differentiable all-to-all: split ``x`` along ``scatter_dim`` into P pieces, send piece j to
    rank j, and concatenate the pieces received from every rank along ``gather_dim``.

    Args:
        x: this rank's tensor; its length along ``gather_dim`` may differ between ranks.
        group: the process group (None = WORLD, or a single process when torch.distributed is not
            initialised), or an already resolved :class:`~hpattn_dist.comm.groups.GroupInfo`.
        scatter_dim, gather_dim: two different dims of ``x``.
        scatter_sizes: length of each rank's piece along ``scatter_dim`` (sum = ``x.shape[sd]``;
            identical on every rank). Default: equal pieces (``x.shape[sd]`` divisible by P).
        gather_sizes: every rank's length along ``gather_dim``, in group-rank order. Default:
            exchanged with one small all-gather.
        label: counter label (Note [all-to-all transport]; the backward uses ``label + ".grad"``).

    Returns:
        ``x.shape`` with ``S_r`` along ``scatter_dim`` and ``sum(gather_sizes)`` along
        ``gather_dim``; contiguous; differentiable (Note [all-to-all adjoint]).

    Raises:
        ValueError: bad dims, size lists that do not match ``x`` or the group, an uneven default
            split, or a group this process is not in.
    """
    info = group if isinstance(group, GroupInfo) else resolve_group(group)
    sd, gd = _check_dims(x, scatter_dim, gather_dim)
    p, r = info.world_size, info.rank
    if scatter_sizes is None:
        if x.shape[sd] % p != 0:
            raise ValueError(
                f"all_to_all: x.shape[{sd}] = {x.shape[sd]} is not divisible by the group size "
                f"{p}; pass scatter_sizes"
            )
        scatter_sizes = [x.shape[sd] // p] * p
    scatter_sizes = _check_sizes("scatter_sizes", scatter_sizes, p, x.shape[sd])
    if gather_sizes is None:
        gather_sizes = [row[0] for row in all_gather_ints([x.shape[gd]], info, x.device)]
    gather_sizes = _check_sizes("gather_sizes", gather_sizes, p, None)
    if gather_sizes[r] != x.shape[gd]:
        raise ValueError(
            f"all_to_all: gather_sizes[{r}] = {gather_sizes[r]} but x has {x.shape[gd]} along "
            f"gather_dim {gd} on rank {r}"
        )
    return _AllToAll.apply(x, info, sd, gd, scatter_sizes, gather_sizes, label)
