"""Process groups for the 2D (Ulysses x ring) layout of :func:`~hpattn_dist.hybrid_attention`.

Legend: P ranks in the parent group, U the Ulysses degree (ranks that split heads), R = P / U the
ring degree, ``g_0 .. g_{P-1}`` the parent's ranks in group-rank order (global ranks).

Note [hybrid layout]
    Position ``p = i * U + u`` of the parent group has ring index ``i`` and Ulysses index ``u``:

    * Ulysses group ``i`` = ``{g_{i*U + u} : u = 0..U-1}`` (consecutive positions: they split heads);
    * ring group ``u``    = ``{g_{i*U + u} : i = 0..R-1}`` (stride U: same head slice, pixels of
      the R Ulysses groups).

    E.g. P = 4, U = 2: Ulysses groups {0, 1} and {2, 3}; ring groups {0, 2} and {1, 3}.
    Pixel shards are laid out in parent-group-rank order (shard p on position p), which is
    ring-index-major, Ulysses-index-minor. After the Ulysses all-to-all, ring member i holds the
    pixels of positions ``i*U .. i*U+U-1``, a contiguous range, and the ring visits these ranges
    in global order; so global pixel indices (and with them the position-keyed dropout mask) are
    those of the ring over the whole parent group. A ``DeviceMesh`` with dims ``("ring",
    "ulysses")`` (row-major, Ulysses innermost) has exactly this layout. With any other grid of
    groups (e.g. a mesh ordered ``("ulysses", "ring")``) the process with ring rank i and Ulysses
    rank u must hold global shard ``i * U + u`` for the dropout mask to be the ring's; without
    dropout the result is exact for any assignment (attention does not depend on key order).

Creating groups is collective: like :func:`torch.distributed.new_group`, every process of the
default group must call :func:`build_hybrid_groups` with the same arguments, in the same order
(subgroup parents are exchanged first, so that every process creates every subgroup).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

__all__ = ["HybridGroups", "build_hybrid_groups", "forget_groups", "hybrid_groups_for", "hybrid_parent"]


class HybridGroups(NamedTuple):
    """This process's two groups of the 2D layout (Note [hybrid layout])."""

    ulysses_group: dist.ProcessGroup
    ring_group: dist.ProcessGroup


def _check_degree(ulysses_degree: object, size: int, parent: str) -> int:
    if not isinstance(ulysses_degree, int) or isinstance(ulysses_degree, bool) or ulysses_degree < 1:
        raise ValueError(f"ulysses_degree must be a positive int, got {ulysses_degree!r}")
    if size % ulysses_degree != 0:
        raise ValueError(
            f"ulysses_degree={ulysses_degree} does not divide the size of {parent} ({size})"
        )
    return ulysses_degree


def _layout(ranks: tuple[int, ...], ulysses_degree: int) -> tuple[list[list[int]], list[list[int]]]:
    """Ulysses groups and ring groups (lists of global ranks) of one parent, Note [hybrid layout]."""
    u_deg = ulysses_degree
    r_deg = len(ranks) // u_deg
    ulysses = [[ranks[i * u_deg + u] for u in range(u_deg)] for i in range(r_deg)]
    ring = [[ranks[i * u_deg + u] for i in range(r_deg)] for u in range(u_deg)]
    return ulysses, ring


def _from_mesh(mesh: DeviceMesh, ulysses_degree: Optional[int], ulysses_dim: str,
               ring_dim: str) -> HybridGroups:
    names = tuple(mesh.mesh_dim_names or ())
    for dim in (ulysses_dim, ring_dim):
        if dim not in names:
            raise ValueError(f"build_hybrid_groups: the DeviceMesh has no dim named {dim!r} "
                             f"(its dims: {names}); pass ulysses_dim= / ring_dim=")
    size = mesh.size(names.index(ulysses_dim))
    if ulysses_degree is not None and ulysses_degree != size:
        raise ValueError(f"build_hybrid_groups: ulysses_degree={ulysses_degree} but the mesh dim "
                         f"{ulysses_dim!r} has size {size}")
    groups = HybridGroups(mesh.get_group(ulysses_dim), mesh.get_group(ring_dim))
    if len(names) > 2:
        # Other dims (data parallel, ...): one parent per slice, created by every process alike.
        dims = [names.index(d) for d in names if d not in (ring_dim, ulysses_dim)]
        dims += [names.index(ring_dim), names.index(ulysses_dim)]
        grid_size = mesh.size(names.index(ring_dim)) * size
        for ranks in mesh.mesh.permute(*dims).reshape(-1, grid_size).tolist():
            parent = dist.new_group(ranks)
            if dist.get_rank() in ranks:
                _PARENTS[groups] = parent
    return groups


# (ulysses_group, ring_group) -> the group of their U * R ranks, for every pair built here.
_PARENTS: dict[tuple[dist.ProcessGroup, dist.ProcessGroup], Optional[dist.ProcessGroup]] = {}


def hybrid_parent(ulysses_group: dist.ProcessGroup, ring_group: dist.ProcessGroup,
                  size: int) -> Optional[dist.ProcessGroup]:
    """The group holding exactly the ``size`` ranks of the grid of ``ulysses_group`` x
    ``ring_group``: the one they were built from (:func:`build_hybrid_groups`), or WORLD when
    the grid covers every process. The hybrid strategy agrees over it (Note [one agreement per
    call] in ``strategies/plan.py``).

    Raises:
        ValueError: a pair not built by :func:`build_hybrid_groups` that covers fewer processes
            than WORLD (no group of exactly its ranks is known).
    """
    if (ulysses_group, ring_group) in _PARENTS:
        return _PARENTS[(ulysses_group, ring_group)]
    if not dist.is_initialized() or size == dist.get_world_size():
        return None
    raise ValueError(
        "hybrid_attention: ulysses_group and ring_group cover fewer processes than WORLD and were "
        "not built by hpattn_dist.mesh.build_hybrid_groups, so no group of exactly their ranks is "
        "known to agree over; build them with build_hybrid_groups(parent_group, ulysses_degree)"
    )


def _parent_ranks(group: Optional[dist.ProcessGroup]) -> tuple[int, ...]:
    if group is None or group is dist.group.WORLD:
        return tuple(range(dist.get_world_size()))
    if dist.get_rank(group) < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the "
                         "group passed in")
    return tuple(dist.get_process_group_ranks(group))


def build_hybrid_groups(
    source: Union[int, dist.ProcessGroup, DeviceMesh, None] = None,
    ulysses_degree: Optional[int] = None,
    *,
    ulysses_dim: str = "ulysses",
    ring_dim: str = "ring",
) -> HybridGroups:
    """Create (or read from a mesh) this process's Ulysses group and ring group.

    Args:
        source: what to split, in Note [hybrid layout] order:
            ``None`` or an int world size (checked): the default group (WORLD);
            a ``ProcessGroup``: that group (processes may pass different, disjoint groups, e.g.
            one per data-parallel replica);
            a ``DeviceMesh``: its dims named ``ulysses_dim`` and ``ring_dim`` are used as they are
            (with further dims, one group per slice of those two is created as the pair's parent).
        ulysses_degree: U, the size of each Ulysses group (divides P). Required unless ``source``
            is a mesh, where it is checked against the mesh if given.
        ulysses_dim, ring_dim: mesh dim names.

    Returns:
        :class:`HybridGroups` ``(ulysses_group, ring_group)`` of this process.

    Raises:
        ValueError: a bad or non-dividing ``ulysses_degree``, a mesh without the named dims, a
            world size that is not the default group's, a group this process is not in, or
            processes whose groups overlap without being equal.
        RuntimeError: torch.distributed is not initialised.
    """
    if isinstance(source, DeviceMesh):
        return _from_mesh(source, ulysses_degree, ulysses_dim, ring_dim)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("build_hybrid_groups: torch.distributed is not initialised")
    if isinstance(source, int) and not isinstance(source, bool):
        if source != dist.get_world_size():
            raise ValueError(f"build_hybrid_groups: world size {source} given, but the default "
                             f"group has {dist.get_world_size()} processes")
        source = None
    mine = _parent_ranks(source)
    if ulysses_degree is None:
        raise ValueError("build_hybrid_groups: ulysses_degree is required unless a DeviceMesh is given")
    degree = _check_degree(ulysses_degree, len(mine), f"the group {list(mine)}")
    if source is None or source is dist.group.WORLD:
        parents = [(mine, degree)]
    else:
        table: list = [None] * dist.get_world_size()
        dist.all_gather_object(table, (mine, degree))
        parents = _distinct_parents(table)
    me = dist.get_rank()
    found: dict[str, dist.ProcessGroup] = {}
    # Every process creates every group, all Ulysses groups first, in one global order.
    layouts = [_layout(ranks, deg) for ranks, deg in parents]
    for kind, index in (("ulysses", 0), ("ring", 1)):
        for layout in layouts:
            for ranks in layout[index]:
                group = dist.new_group(ranks)
                if me in ranks:
                    found[kind] = group
    groups = HybridGroups(found["ulysses"], found["ring"])
    _PARENTS[groups] = None if source is None or source is dist.group.WORLD else source
    return groups


def _distinct_parents(table: list) -> list[tuple[tuple[int, ...], int]]:
    """Distinct ``(parent ranks, degree)`` entries, checked for consistency, in a global order."""
    owner: dict[int, tuple[tuple[int, ...], int]] = {}
    for rank, entry in enumerate(table):
        ranks, degree = tuple(entry[0]), entry[1]
        for member in ranks:
            if member in owner and owner[member] != (ranks, degree):
                raise ValueError(
                    f"build_hybrid_groups: processes disagree about the group of rank {member}: "
                    f"{owner[member]} vs {(ranks, degree)} (as (group ranks, ulysses_degree))"
                )
            owner[member] = (ranks, degree)
        if rank not in ranks:
            raise ValueError(f"build_hybrid_groups: rank {rank} passed a group {list(ranks)} it is not in")
    return sorted(set(owner.values()))


# (parent ranks, ulysses_degree) -> (the parent group object they were built from, the groups)
_CACHE: dict[tuple[tuple[int, ...], int], tuple[dist.ProcessGroup, HybridGroups]] = {}


def hybrid_groups_for(group: Optional[dist.ProcessGroup], ulysses_degree: int) -> HybridGroups:
    """:func:`build_hybrid_groups` ``(group, ulysses_degree)``, created once per process and reused.

    For the layers, which call the strategy on every forward. Collective on the first call for a
    given ``(group members, ulysses_degree)``: every process must make that first call together.
    The cache holds them for the parent group OBJECT they were split from: after
    ``destroy_process_group()`` and a new ``init_process_group``, ``group=None`` is a new WORLD,
    whose first call builds new sub-groups (Note [groups resolved per call] in ``comm/groups.py``).
    """
    key = (_parent_ranks(group), ulysses_degree)
    parent = dist.group.WORLD if group is None else group
    cached = _CACHE.get(key)
    if cached is None or cached[0] is not parent:
        if cached is not None:  # sub-groups of a destroyed parent: forget them
            _PARENTS.pop(cached[1], None)
        _CACHE[key] = (parent, build_hybrid_groups(group, ulysses_degree))
    return _CACHE[key][1]


def forget_groups() -> None:
    """Drop every group this module remembers (:func:`hybrid_groups_for`, the parents of
    :func:`build_hybrid_groups`), after ``destroy_process_group``: the groups' threads end when
    nothing holds them (Note [clean exit] in ``hpattn_dist/shutdown.py``), and a process group
    initialised again gets new groups, not destroyed ones."""
    _CACHE.clear()
    _PARENTS.clear()
