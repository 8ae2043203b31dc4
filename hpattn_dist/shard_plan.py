"""The shard plan: ``N`` pixels (or points) over ``P`` ranks as contiguous ranges in rank order.

Pure Python, below everything that splits a pixel dimension: the collectives' default split
(:mod:`hpattn_dist.comm.collectives`), the halo plans (:mod:`hpattn_dist.comm.halo`) and the
HEALPix scatter / gather (:mod:`hpattn_dist.healpix`, which exports :func:`shard_sizes` and
:func:`shard_bounds` as part of its API). Why contiguous NESTED ranges: Note [Why contiguous
NESTED ranges make good shards] in :mod:`hpattn_dist.healpix`.
"""

from __future__ import annotations

import numbers

__all__ = ["even_split", "shard_bounds", "shard_sizes"]


def even_split(total: int, parts: int) -> list[int]:
    """``total // parts`` each, the first ``total % parts`` one more: the shard plan's rule
    (:func:`shard_sizes`, which checks its arguments) and the collectives' default split."""
    base, extra = divmod(total, parts)
    return [base + 1 if rank < extra else base for rank in range(parts)]


def _check_plan_args(npix: int, world_size: int) -> tuple[int, int]:
    if not isinstance(npix, numbers.Integral) or isinstance(npix, bool) or npix < 0:
        raise ValueError(f"npix must be a non-negative integer, got {npix!r}")
    if not isinstance(world_size, numbers.Integral) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    return int(npix), int(world_size)


def shard_sizes(npix: int, world_size: int) -> list[int]:
    """Pixels per rank of the shard plan: ``N // P`` each, the first ``N % P`` ranks one more.

    See :func:`shard_bounds` for the plan; this is ``[stop - start for start, stop in bounds]``.

    Raises:
        ValueError: ``npix`` negative or not an integer, ``world_size`` not a positive integer.
    """
    return even_split(*_check_plan_args(npix, world_size))


def shard_bounds(npix: int, world_size: int) -> list[tuple[int, int]]:
    """Split ``N = npix`` pixels into ``P = world_size`` contiguous NESTED ranges.

    Rank ``r`` owns ``[start_r, stop_r)``; the ranges are in rank order and cover ``[0, N)``
    exactly once. Sizes differ by at most one pixel: every rank gets ``N // P`` pixels and the
    first ``N % P`` ranks one more, so any ``P`` works with no padding and no truncation.

    When ``P > N`` the last ``P - N`` ranks get *empty* ranges ``(N, N)``; this is allowed (not an
    error) so that a plan exists for every group, and the collectives in this package handle
    empty shards. Whether a layer accepts ranks without pixels is for that layer to decide.

    Contiguous NESTED ranges are spatially compact, because a NESTED index is ``face * nside**2``
    plus a Morton (Z-order) code inside the face's quadtree: a contiguous range is a union of a few
    quadtree cells, i.e. a few compact patches with a small boundary. Contiguous RING ranges would
    be latitude bands around the whole sphere, whose boundary is several times larger once ``P``
    exceeds a few ranks. See Note [Why contiguous NESTED ranges make good shards] in
    :mod:`hpattn_dist.healpix`.

    The plan does not require ``npix`` to be a HEALPix size (any ``N >= 0`` works); the NESTED
    compactness argument applies when it is one and the field is in NESTED order.

    Args:
        npix: number of pixels ``N >= 0``.
        world_size: number of ranks ``P >= 1``.

    Returns:
        ``[(start_0, stop_0), ..., (start_{P-1}, stop_{P-1})]`` with ``start_0 = 0``,
        ``stop_r = start_{r+1}`` and ``stop_{P-1} = N``.

    Raises:
        ValueError: ``npix`` negative or not an integer, ``world_size`` not a positive integer.

    Example::

        >>> shard_bounds(48, 5)
        [(0, 10), (10, 20), (20, 30), (30, 39), (39, 48)]
    """
    bounds = []
    start = 0
    for size in shard_sizes(npix, world_size):
        bounds.append((start, start + size))
        start += size
    return bounds
