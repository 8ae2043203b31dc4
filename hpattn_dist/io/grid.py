"""Which HEALPix grid a zarr store holds: resolution and ordering from its attributes.

Note [store conventions]
~~~~~~~~~~~~~~~~~~~~~~~~
The HEALPix stores users have say what they hold in one of two ways (both are written by
:func:`hpattn_dist.io.write_shard`):

* xdggs: a cell-id coordinate (``cell_ids`` by default) on the cell dimension whose attributes
  are ``grid_name = "healpix"``, ``level`` (``nside = 2**level``) and ``indexing_scheme``
  (``"nested"`` or ``"ring"``; the ``"zuniq"`` / ``"nuniq"`` schemes index partial skies, which
  no contiguous shard plan covers, and are refused);
* easygems (and the CF HEALPix grid mapping it follows): a scalar grid-mapping variable (``crs``,
  or whatever a variable's ``grid_mapping`` attribute names) with ``grid_mapping_name =
  "healpix"``, ``healpix_nside`` and ``healpix_order`` (``"nest"`` / ``"nested"`` or
  ``"ring"``); the CF spelling ``refinement_level`` / ``indexing_scheme`` is read too.

When both are present they must agree. Arguments (``nside=``, ``ordering=``) fill in what a store
does not say and must agree with what it does. A store that names no ordering and is given none
is refused: reading a RING field as NESTED would feed every rank the wrong pixels, silently. The
cell count itself is checked against ``12 * nside**2`` by the reader; a cell-id coordinate, when
present, must hold ``0 .. N - 1`` in storage order (:mod:`hpattn_dist.io.read` checks the
positions each rank reads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from hpattn_dist.healpix import check_nside, check_ordering

__all__ = ["StoreGrid", "find_grid", "grid_attributes"]

CELL_DIM = "cell"
CELL_IDS = "cell_ids"
CRS = "crs"

_SCHEMES = {"nested": "NESTED", "nest": "NESTED", "ring": "RING"}


@dataclass(frozen=True)
class StoreGrid:
    """The HEALPix grid of a store's variable.

    Attributes:
        nside: resolution (a power of two: the shards are NESTED ranges).
        ordering: ``"NESTED"`` or ``"RING"``, the order of the cells in the store.
        cell_ids: name of the cell-id coordinate to check, or None.
        source: where the grid came from, for messages.
    """

    nside: int
    ordering: str
    cell_ids: Optional[str]
    source: str

    @property
    def npix(self) -> int:
        return 12 * self.nside**2


def _scheme(value: Any, where: str) -> str:
    key = value.lower() if isinstance(value, str) else None
    if key not in _SCHEMES:
        raise ValueError(f"{where}: HEALPix ordering {value!r} is not one of 'nested' / 'nest' / 'ring' "
                         "(uniq schemes index partial skies and are not read as fields)")
    return _SCHEMES[key]


def _int_attr(value: Any, where: str) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected an integer, got {value!r}") from None
    if out != value:
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    return out


def _candidates(group, names: list[str], is_grid, what: str) -> list[str]:
    """The first of ``names`` that is a grid array of the group; else the group's only one (none:
    ``[]``; several that the variable does not choose between: an error)."""
    for name in names:
        if name in group and is_grid(group[name].attrs):
            return [name]
    found = [name for name, array in group.arrays() if is_grid(array.attrs)]
    if len(found) > 1:
        raise ValueError(f"the store has several {what} variables ({', '.join(map(repr, found))}) and the "
                         "variable names none of them (attributes 'coordinates' / 'grid_mapping')")
    return found


def _xdggs(group, variable) -> Optional[tuple[int, str, str, str]]:
    """``(nside, ordering, cell-id name, source)`` from an xdggs cell-id coordinate, or None."""
    names = [n for n in str(variable.attrs.get("coordinates", "")).split() if n in group] + [CELL_IDS]
    for name in _candidates(group, names, lambda attrs: attrs.get("grid_name") == "healpix", "xdggs cell-id"):
        attrs = group[name].attrs
        where = f"xdggs attributes of {name!r}"
        ordering = _scheme(attrs.get("indexing_scheme", "nested"), where)
        if "level" in attrs:
            nside = 2 ** _int_attr(attrs["level"], f"{where}, level")
        elif "nside" in attrs:
            nside = _int_attr(attrs["nside"], f"{where}, nside")
        else:
            raise ValueError(f"{where}: grid_name 'healpix' without a 'level'")
        return nside, ordering, name, where
    return None


def _grid_mapping(group, variable) -> Optional[tuple[int, str, str]]:
    """``(nside, ordering, source)`` from an easygems / CF grid-mapping variable, or None."""
    named = variable.attrs.get("grid_mapping")
    if isinstance(named, str) and named in group:
        if group[named].attrs.get("grid_mapping_name") != "healpix":
            raise ValueError(f"the variable's grid_mapping {named!r} is not a HEALPix grid mapping "
                             f"(grid_mapping_name={group[named].attrs.get('grid_mapping_name')!r})")
        names = [named]
    else:
        names = [CRS]
    for name in _candidates(group, names, lambda attrs: attrs.get("grid_mapping_name") == "healpix",
                            "HEALPix grid-mapping"):
        attrs = group[name].attrs
        where = f"grid-mapping attributes of {name!r}"
        if "healpix_nside" in attrs:
            nside = _int_attr(attrs["healpix_nside"], f"{where}, healpix_nside")
        elif "refinement_level" in attrs:
            nside = 2 ** _int_attr(attrs["refinement_level"], f"{where}, refinement_level")
        else:
            raise ValueError(f"{where}: no healpix_nside (easygems) or refinement_level (CF)")
        order = attrs.get("healpix_order", attrs.get("indexing_scheme"))
        if order is None:
            raise ValueError(f"{where}: no healpix_order (easygems) or indexing_scheme (CF)")
        return nside, _scheme(order, where), where
    return None


def find_grid(group, variable, *, nside: Optional[int] = None, ordering: Optional[str] = None) -> StoreGrid:
    """The grid of ``variable`` (a zarr array of ``group``), Note [store conventions].

    Args:
        group: the zarr group holding the variable and its coordinates.
        variable: the zarr array whose last dimension is the cells.
        nside, ordering: what the caller knows; they must agree with the store's attributes.

    Raises:
        ValueError: attributes that contradict each other or the arguments, an unknown or partial
            -sky ordering, no ordering anywhere, an nside that is no power of two.
    """
    xdggs = _xdggs(group, variable)
    mapping = _grid_mapping(group, variable)
    found: list[tuple[int, str, str]] = []
    if xdggs is not None:
        found.append((xdggs[0], xdggs[1], xdggs[3]))
    if mapping is not None:
        found.append(mapping)
    if nside is not None or ordering is not None:
        given = (None if nside is None else check_nside(nside, nest=True),
                 None if ordering is None else check_ordering(ordering))
        for store_nside, store_order, where in found:
            if given[0] not in (None, store_nside) or given[1] not in (None, store_order):
                raise ValueError(f"the arguments nside={nside!r}, ordering={ordering!r} contradict the "
                                 f"store's {where}: nside {store_nside}, {store_order}")
    if len(found) == 2 and found[0][:2] != found[1][:2]:
        raise ValueError(f"the store's {found[0][2]} (nside {found[0][0]}, {found[0][1]}) and its "
                         f"{found[1][2]} (nside {found[1][0]}, {found[1][1]}) disagree")
    cell_ids = xdggs[2] if xdggs is not None else None
    if found:
        store_nside, store_order, where = found[0]
        try:
            check_nside(store_nside, nest=True)
        except ValueError as err:
            raise ValueError(f"the store's {where}: {err}") from None
        return StoreGrid(store_nside, store_order, cell_ids, where)
    if ordering is None:
        raise ValueError("the store names no HEALPix ordering (no xdggs 'cell_ids' coordinate with "
                         "grid_name='healpix', no easygems/CF 'crs' grid mapping): pass ordering='NESTED' "
                         "or 'RING' (and nside=) for what it holds")
    last = variable.shape[-1] if variable.shape else 0
    if nside is None:
        from hpattn_dist.healpix import npix2nside

        nside = npix2nside(last)
    return StoreGrid(check_nside(nside, nest=True), check_ordering(ordering), None, "the arguments")


def grid_attributes(nside: int, ordering: str) -> tuple[dict, dict]:
    """``(cell-id attributes, grid-mapping attributes)`` of a store holding a field of ``nside`` in
    ``ordering``, in both conventions of Note [store conventions]."""
    order = check_ordering(ordering)
    level = check_nside(nside, nest=True).bit_length() - 1
    xdggs = {"grid_name": "healpix", "level": level, "indexing_scheme": order.lower()}
    easygems = {"grid_mapping_name": "healpix", "healpix_nside": nside,
                "healpix_order": "nest" if order == "NESTED" else "ring"}
    return xdggs, easygems
