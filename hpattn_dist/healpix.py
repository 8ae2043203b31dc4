"""HEALPix in pure torch: resolution checks, NESTED <-> RING, the shard plan, scatter / gather.

Everything here runs on any device, vectorised, without healpy at runtime (healpy is only the
reference in the tests). Pixel indices are ``int64`` tensors and keep the device of their input.

Legend used in shapes and docstrings:

- ``nside``: HEALPix resolution parameter; ``N = npix = 12 * nside**2`` pixels.
- ``P``: size of the process group; ``r``: this process's rank inside that group.
- ``N_r``: pixels held by group rank ``r`` (``shard_sizes(N, P)[r]``).
- ``B``: batch, ``E``: embedding / channel dimension of a ``[B, N, E]`` field.

Note [HEALPix orderings]
~~~~~~~~~~~~~~~~~~~~~~~~
The sphere is split into 12 base faces (4 around the north pole, 4 on the equator, 4 around the
south pole), each an ``nside x nside`` grid of pixels addressed by ``(ix, iy)``, ``0 <= ix, iy <
nside``.

* NESTED: ``ipix = face * nside**2 + morton(ix, iy)`` where ``morton`` interleaves the bits of
  ``ix`` (even bit positions) and ``iy`` (odd bit positions). Requires ``nside`` a power of two.
* RING: pixels are numbered along iso-latitude rings from north to south, and along each ring
  eastwards. Ring ``i`` (1-based, ``1 <= i <= 4 * nside - 1``) has ``4 * i`` pixels in the north
  polar cap (``i < nside``), ``4 * nside`` in the equatorial belt and ``4 * (4 * nside - i)`` in
  the south polar cap (``i > 3 * nside``).

A face's pixel ``(ix, iy)`` lies on ring ``i = ring_offset[face] * nside - ix - iy - 1``
(``ring_offset`` = 2 for the northern faces, 3 for the equatorial ones, 4 for the southern ones),
and its position along the ring grows with ``ix - iy`` starting from the face's longitude
``phi_offset[face]`` (in units of half a pixel at the equator). Conversions go through
``(face, ix, iy)`` in both directions.

Note [Why contiguous NESTED ranges make good shards]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Inside a face, the NESTED index is a Morton (Z-order) code: the two top bits choose a quadrant,
the next two a sub-quadrant, and so on. A contiguous NESTED range ``[start, stop)`` therefore
decomposes into a handful of complete quadtree cells (at most about three per level of the tree
at each end of the range), i.e. a few square-ish patches on the sphere, so each rank's pixels
are compact and their boundary (pixels with a neighbour on another rank) is small. A contiguous
RING range, by contrast, is a latitude band that wraps all the way around the sphere. Measured at
nside 16 (pixels on a boundary, NESTED vs RING ranges): P=2: 252 vs 256, P=4: 580 vs 768,
P=12: 720 vs 2636, P=48: 1344 vs 3018 -- similar for two or three ranks, several times smaller
from about six. Global attention itself does not care (every rank sees every key, whatever the
layout); the compactness pays off for anything local on the shards (neighbourhood operators,
halo exchanges, windowed or masked attention, I/O of regional patches).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from hpattn_dist.comm.agreement import dtype_code, validated_signature
from hpattn_dist.comm.collectives import gather_along_dim, scatter_along_dim
from hpattn_dist.comm.groups import resolve_group
from hpattn_dist.shard_plan import shard_bounds, shard_sizes

__all__ = [
    "check_nside",
    "check_ordering",
    "nside2npix",
    "npix2nside",
    "nest2ring",
    "ring2nest",
    "reorder",
    "shard_sizes",
    "shard_bounds",
    "scatter",
    "gather",
]

_ORDERINGS = {"NESTED": "NESTED", "NEST": "NESTED", "RING": "RING"}


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------
# Resolution checks
# --------------------------------------------------------------------------------------------


def check_nside(nside: int, nest: bool = True) -> int:
    """Validate a HEALPix resolution and return it as a Python ``int``.

    Args:
        nside: resolution parameter.
        nest: when True (default), require what the NESTED scheme needs: a power of two.
            RING alone accepts any positive integer.

    Returns:
        ``int(nside)``.

    Raises:
        ValueError: ``nside`` is not a positive integer, or (``nest=True``) not a power of two.
    """
    if not _is_int(nside) or nside < 1:
        raise ValueError(f"nside must be a positive integer, got {nside!r}")
    nside = int(nside)
    if nest and nside & (nside - 1):
        raise ValueError(
            f"nside must be a power of two for the NESTED scheme, got nside={nside}"
        )
    return nside


def nside2npix(nside: int) -> int:
    """Number of pixels ``12 * nside**2`` of a grid of resolution ``nside`` (any positive int).

    Raises:
        ValueError: ``nside`` is not a positive integer.
    """
    return 12 * check_nside(nside, nest=False) ** 2


def npix2nside(npix: int) -> int:
    """Resolution ``nside`` of a grid of ``npix = 12 * nside**2`` pixels.

    Only the ``12 * nside**2`` form is checked here (RING grids allow any ``nside``); use
    :func:`check_nside` on the result when the NESTED scheme is needed.

    Raises:
        ValueError: ``npix`` is not a positive integer of the form ``12 * nside**2``.
    """
    if not _is_int(npix) or npix < 1:
        raise ValueError(f"npix must be a positive integer 12 * nside**2, got {npix!r}")
    npix = int(npix)
    quotient, remainder = divmod(npix, 12)
    nside = math.isqrt(quotient)
    if remainder or nside * nside != quotient:
        raise ValueError(
            f"npix={npix} is not a HEALPix pixel count 12 * nside**2 "
            f"(valid sizes include 12, 48, 192, 768, 3072, ...)"
        )
    return nside


# --------------------------------------------------------------------------------------------
# NESTED <-> RING
# --------------------------------------------------------------------------------------------

# Bit spreading of the low 32 bits of an int64 onto its even bit positions: at each step the bits
# move left by `shift` and the mask keeps the groups that are now in place. All masks < 2**63.
_SPREAD_STEPS = (
    (16, 0x0000FFFF0000FFFF),
    (8, 0x00FF00FF00FF00FF),
    (4, 0x0F0F0F0F0F0F0F0F),
    (2, 0x3333333333333333),
    (1, 0x5555555555555555),
)
# The same steps undone, smallest first: shift right, keep the merged groups.
_COMPRESS_STEPS = (
    (1, 0x3333333333333333),
    (2, 0x0F0F0F0F0F0F0F0F),
    (4, 0x00FF00FF00FF00FF),
    (8, 0x0000FFFF0000FFFF),
    (16, 0x00000000FFFFFFFF),
)


def _spread_bits(v: Tensor, nbits: int = 32) -> Tensor:
    """Move bit ``k`` of ``v`` (``0 <= v < 2**nbits``, ``nbits <= 32``) to bit ``2k``.

    Example: ``0b1011 -> 0b1000101``. Steps whose shift is ``>= nbits`` are no-ops and skipped.
    """
    for shift, mask in _SPREAD_STEPS:
        if shift < nbits:
            v = (v | (v << shift)) & _fit(mask, v)
    return v


def _compress_bits(v: Tensor, nbits: int = 32) -> Tensor:
    """Inverse of :func:`_spread_bits`: pack the even bits of ``v`` (the low ``2 * nbits`` bits)."""
    v = v & _fit(0x5555555555555555, v)
    for shift, mask in _COMPRESS_STEPS:
        if shift < nbits:
            v = (v | (v >> shift)) & _fit(mask, v)
    return v


def _fit(mask: int, v: Tensor) -> int:
    # int32 arithmetic (nside <= 2**13, Note [CPU chunks]) only needs the masks' low 31 bits.
    return mask if v.dtype == torch.int64 else mask & 0x7FFFFFFF


def _isqrt(v: Tensor) -> Tensor:
    """Exact integer square root of a positive integer tensor (float estimate, then fixed)."""
    # v * rsqrt(v) rather than sqrt(v): on the CPU, torch runs sqrt multi-threaded from a few
    # thousand elements, and per-chunk thread wake-ups dominate (Note [CPU chunks]).
    v_float = v.to(torch.float64)
    root = (v_float * torch.rsqrt(v_float)).to(v.dtype)
    root = torch.where(root * root > v, root - 1, root)
    root = torch.where((root + 1) * (root + 1) <= v, root + 1, root)
    return root


def _check_pixels(nside: int, ipix: Tensor) -> Tensor:
    if not isinstance(ipix, Tensor):
        raise ValueError(f"ipix must be a torch.Tensor of pixel indices, got {type(ipix).__name__}")
    if ipix.dtype.is_floating_point or ipix.dtype.is_complex or ipix.dtype == torch.bool:
        raise ValueError(f"ipix must be an integer tensor, got dtype {ipix.dtype}")
    ipix = ipix.to(torch.int64)
    npix = 12 * nside * nside
    if ipix.numel():
        lo, hi = (int(v) for v in torch.aminmax(ipix))
        if lo < 0 or hi >= npix:
            raise ValueError(
                f"ipix values must lie in [0, npix={npix}) for nside={nside}, "
                f"got range [{lo}, {hi}]"
            )
    return ipix


# Note [CPU chunks]
# ~~~~~~~~~~~~~~~~
# On the CPU, elementwise int64 arithmetic over millions of pixels is dominated by the memory
# traffic (and page faults) of its temporaries: working in cache-sized chunks is several times
# faster. The chunks stay below torch's parallel grain (32768 elements), and the per-chunk code
# avoids ops that go multi-threaded earlier (advanced indexing, sqrt): a parallel region per op
# and chunk makes the conversion up to 50x slower on a busy machine (threads spinning, waiting).
# Up to nside 2**13 every intermediate value is below 2 * npix < 2**31, so the arithmetic runs in
# int32, about 1.7x faster than int64 (on any device); the result is int64.
_CPU_CHUNK = 1 << 14
_INT32_MAX_ORDER = 13


def _map_pixels(fn, nside: int, ipix: Tensor) -> Tensor:
    """Apply the flat, elementwise ``fn(nside, order, ipix_flat)`` to ``ipix`` of any shape."""
    order = nside.bit_length() - 1  # nside = 2**order
    work_dtype = torch.int32 if order <= _INT32_MAX_ORDER else torch.int64
    flat = ipix.reshape(-1)
    if flat.device.type != "cpu" or flat.numel() <= _CPU_CHUNK:
        return fn(nside, order, flat.to(work_dtype)).to(torch.int64).view(ipix.shape)
    out = torch.empty(flat.shape, dtype=torch.int64, device=flat.device)
    for start in range(0, flat.numel(), _CPU_CHUNK):
        stop = start + _CPU_CHUNK
        out[start:stop] = fn(nside, order, flat[start:stop].to(work_dtype))  # copy_ casts
    return out.view(ipix.shape)


def _face_offsets(face: Tensor) -> tuple[Tensor, Tensor]:
    """Per base face (0..11), see Note [HEALPix orderings]: the ring offset (in units of nside)
    of the face's southern corner, counted from the north pole, i.e. 2, 2, 2, 2, 3, 3, 3, 3, 4,
    4, 4, 4; and the longitude offset of its centre in half-pixels at the equator, i.e. 1, 3, 5, 7,
    0, 2, 4, 6, 1, 3, 5, 7. Computed, not looked up (Note [CPU chunks])."""
    row = face >> 2  # 0 north, 1 equator, 2 south
    return row + 2, ((face & 3) << 1) + 1 - (row & 1)


def _nest2ring_flat(nside: int, order: int, ipix: Tensor) -> Tensor:
    npix = 12 * nside * nside
    ncap = 2 * nside * (nside - 1)  # pixels in the north polar cap (rings 1 .. nside-1)
    nl4 = 4 * nside

    # NESTED index -> (face, ix, iy): the face is the top part, the rest is a Morton code.
    face = ipix >> (2 * order)
    morton = ipix & (nside * nside - 1)
    ix = _compress_bits(morton, order)
    iy = _compress_bits(morton >> 1, order)

    ring_offset, phi_offset = _face_offsets(face)
    ring = ring_offset * nside - ix - iy - 1  # 1-based ring number, from the north pole

    # Per ring: nr = pixels per face-quarter of the ring (the ring number counted from the
    # nearer pole in the caps, nside in the belt), pixels before the ring, and the half-pixel
    # shift of the ring's first pixel (only equatorial rings alternate).
    north = ring < nside
    south = ring > 3 * nside
    cap = north | south
    nr = torch.where(north, ring, torch.where(south, nl4 - ring, nside))
    before = torch.where(
        cap,
        torch.where(north, 2 * nr * (nr - 1), npix - 2 * nr * (nr + 1)),
        ncap + (ring - nside) * nl4,
    )
    shift = torch.where(cap, 0, (ring - nside) & 1)

    # 1-based position along the ring. Cap positions already lie in [1, 4 nr]; belt positions
    # wrap around modulo 4 nside (a power of two, so the wrap is a mask, also for negatives).
    pos = (phi_offset * nr + ix - iy + 1 + shift) >> 1
    pos = ((pos - 1) & (nl4 - 1)) + 1
    return before + pos - 1


def nest2ring(nside: int, ipix: Tensor) -> Tensor:
    """Convert NESTED pixel indices to RING indices (same shape, int64, same device).

    See Note [HEALPix orderings] for the geometry.

    Args:
        nside: resolution, a power of two.
        ipix: integer tensor of NESTED indices in ``[0, 12 * nside**2)``, any shape.

    Returns:
        int64 tensor of RING indices, same shape and device as ``ipix``.

    Raises:
        ValueError: invalid ``nside``, non-integer ``ipix`` or indices out of range.
    """
    nside = check_nside(nside, nest=True)
    return _map_pixels(_nest2ring_flat, nside, _check_pixels(nside, ipix))


def _ring2nest_flat(nside: int, order: int, ipix: Tensor) -> Tensor:
    npix = 12 * nside * nside
    ncap = 2 * nside * (nside - 1)
    nl2, nl4 = 2 * nside, 4 * nside

    south = ipix >= npix - ncap
    cap = (ipix < ncap) | south

    # Caps. The south cap is the mirror image of the north cap: RING pixel p there mirrors
    # pixel npix - 1 - p of the north cap. North ring i holds pixels [2 i (i-1), 2 i (i+1)),
    # so i = (1 + isqrt(1 + 2 p)) // 2; mirrored rings are also reversed in longitude.
    mirrored = torch.where(south, npix - 1 - ipix, ipix)
    ring_cap = (1 + _isqrt(2 * mirrored + 1)) >> 1  # counted from the nearer pole
    pos_cap = mirrored + 1 - 2 * ring_cap * (ring_cap - 1)  # 1-based position along the ring
    pos_cap = torch.where(south, 4 * ring_cap + 1 - pos_cap, pos_cap)

    # Equatorial belt: 4 nside pixels per ring (garbage, and unused, for cap pixels).
    belt = ipix - ncap
    belt_ring = belt >> (order + 2)  # 0 .. 2 nside, ring index inside the belt
    pos_belt = belt - (belt_ring << (order + 2)) + 1

    ring = torch.where(cap, torch.where(south, nl4 - ring_cap, ring_cap), belt_ring + nside)
    pos = torch.where(cap, pos_cap, pos_belt)
    nr = torch.where(cap, ring_cap, nside)
    shift = torch.where(cap, 0, belt_ring & 1)

    # Face. In a cap, each quarter of a ring lies in one face. In the belt, the pixel lies in
    # one ascending and one descending diagonal strip of faces; equal strip numbers mean an
    # equatorial face, otherwise the smaller one names a northern face (or larger + 8 a southern).
    face_cap = (pos - 1) // nr
    face_cap = torch.where(south, face_cap + 8, face_cap)
    ascending = (pos_belt - ((belt_ring + 1) >> 1) + nside - 1) >> order
    descending = (pos_belt - ((nl2 + 1 - belt_ring) >> 1) + nside - 1) >> order
    face_belt = torch.where(
        ascending == descending,
        descending | 4,
        torch.where(descending < ascending, descending, ascending + 8),
    )
    face = torch.where(cap, face_cap, face_belt)

    # In-face coordinates from the ring and the doubled longitude relative to the face corner.
    ring_offset, phi_offset = _face_offsets(face)
    ring_rel = ring - ring_offset * nside + 1  # = -(ix + iy)
    phi_rel = 2 * pos - phi_offset * nr - shift - 1  # = ix - iy, modulo 8 nside
    phi_rel = torch.where(phi_rel >= nl2, phi_rel - 2 * nl4, phi_rel)
    ix = (phi_rel - ring_rel) >> 1
    iy = (-phi_rel - ring_rel) >> 1
    return (face << (2 * order)) | _spread_bits(ix, order) | (_spread_bits(iy, order) << 1)


def ring2nest(nside: int, ipix: Tensor) -> Tensor:
    """Convert RING pixel indices to NESTED indices (same shape, int64, same device).

    See Note [HEALPix orderings] for the geometry.

    Args:
        nside: resolution, a power of two (NESTED needs it).
        ipix: integer tensor of RING indices in ``[0, 12 * nside**2)``, any shape.

    Returns:
        int64 tensor of NESTED indices, same shape and device as ``ipix``.

    Raises:
        ValueError: invalid ``nside``, non-integer ``ipix`` or indices out of range.
    """
    nside = check_nside(nside, nest=True)
    return _map_pixels(_ring2nest_flat, nside, _check_pixels(nside, ipix))


def _field_npix(x: Tensor, dim: int) -> int:
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for x of shape {tuple(x.shape)}")
    return x.shape[dim]


def check_ordering(value: str, name: str = "ordering") -> str:
    """The canonical name ``"NESTED"`` or ``"RING"`` of a HEALPix ordering (``"NEST"`` and any
    case accepted).

    Raises:
        ValueError: anything else, naming ``name``.
    """
    key = value.upper() if isinstance(value, str) else None
    if key not in _ORDERINGS:
        raise ValueError(f"{name} must be 'NESTED' (or 'NEST') or 'RING', got {value!r}")
    return _ORDERINGS[key]


def reorder(
    x: Tensor,
    *,
    src: Optional[str] = None,
    dst: Optional[str] = None,
    dim: int = 1,
    inp: Optional[str] = None,
    out: Optional[str] = None,
) -> Tensor:
    """Reorder a HEALPix field along ``dim`` from ordering ``src`` to ordering ``dst``.

    Both orderings are required and keyword-only: ``reorder(x_ring, src="RING", dst="NESTED")``
    is what a RING field needs before :func:`scatter` (the layers expect NESTED order: each
    rank's contiguous range is then a few compact patches, Note [Why contiguous NESTED ranges
    make good shards]). ``inp`` / ``out`` are the older names of ``src`` / ``dst``, still accepted.
    ``nside`` is inferred from ``x.shape[dim]``. Works on any dtype and device, and is
    differentiable (it is an ``index_select``). ``src == dst`` returns ``x`` unchanged.

    Args:
        x: field, e.g. ``[B, N, E]``, with the ``N`` pixels along ``dim``.
        src: ordering of ``x``: ``"NESTED"`` (alias ``"NEST"``) or ``"RING"``, case-insensitive.
        dst: ordering of the result, same choices.
        dim: pixel dimension (negative values count from the end). Default: 1.

    Returns:
        Tensor of the same shape as ``x`` in ordering ``dst``.

    Raises:
        ValueError: a missing or unknown ordering (or both a name and its older alias), ``dim``
            out of range, ``x.shape[dim]`` not ``12 * nside**2`` with ``nside`` a power of two.
    """
    src = _alias(src, inp, "src", "inp")
    dst = _alias(dst, out, "dst", "out")
    if src is None or dst is None:
        raise ValueError(
            "reorder needs both orderings, e.g. reorder(x, src='RING', dst='NESTED') for a RING "
            f"field the layers will shard (got src={src!r}, dst={dst!r})"
        )
    src, dst = check_ordering(src, "src"), check_ordering(dst, "dst")
    npix = _field_npix(x, dim)
    try:
        nside = check_nside(npix2nside(npix), nest=True)
    except ValueError as err:
        raise ValueError(
            f"x.shape[{dim}]={npix} (x of shape {tuple(x.shape)}) is not a NESTED-compatible "
            f"HEALPix size: {err}"
        ) from None
    if src == dst:
        return x
    ipix = torch.arange(npix, dtype=torch.int64, device=x.device)
    # out[j] = x[source[j]]: for a RING result, pixel j (RING) is NESTED pixel ring2nest(j).
    source = ring2nest(nside, ipix) if dst == "RING" else nest2ring(nside, ipix)
    return x.index_select(dim, source)


def _alias(value: Optional[str], old: Optional[str], name: str, old_name: str) -> Optional[str]:
    if value is not None and old is not None:
        raise ValueError(f"reorder: pass {name}= or its older name {old_name}=, not both")
    return old if value is None else value


# --------------------------------------------------------------------------------------------
# Scatter / gather of full fields
# --------------------------------------------------------------------------------------------


def scatter(x: Tensor, group: Optional[dist.ProcessGroup] = None, dim: int = 1) -> Tensor:
    """Take this rank's shard of a full HEALPix field present on every rank of ``group``.

    The shard is the plan's range ``shard_bounds(N, P)[r]`` along ``dim``. The ranks first agree
    on the field's shape and dtype (one small all-gather, so a rank whose field is malformed or
    differs makes every rank raise; Note [fail together]). Autograd-aware: the gradient of ``x``
    on every rank is the concatenation of all ranks' shard gradients (one all-gather in
    backward), see :func:`hpattn_dist.comm.collectives.scatter_along_dim`.

    Args:
        x: full field ``[B, N, E]`` (any shape, pixels along ``dim``), identical on every rank,
            normally in NESTED order (Note [Why contiguous NESTED ranges make good shards]).
        group: process group (``None``: the default group, or a single process when
            ``torch.distributed`` is not initialised, where the shard is the whole field).
        dim: pixel dimension.

    Returns:
        ``[B, N_r, E]``: a new tensor (not a view of ``x``).

    Raises:
        ValueError: ``dim`` out of range, or ``x.shape[dim]`` is not ``12 * nside**2``; ranks
            whose fields differ in shape or dtype (on every rank).
        ExchangeError: a peer died or did not call within the exchange timeout.
    """
    info = resolve_group(group)
    with validated_signature(info, "scatter") as sig:
        npix = _field_npix(x, dim)
        try:
            npix2nside(npix)
        except ValueError as err:
            raise ValueError(
                f"scatter: x.shape[{dim}]={npix} (x of shape {tuple(x.shape)}) is not a HEALPix "
                f"pixel count: {err}"
            ) from None
        sig.set({"ndim": x.dim(), "dim": dim % x.dim(), "npix": npix, "numel": x.numel(),
                 "dtype": dtype_code(x.dtype)}, 0, x.device, kind="scatter")
    return scatter_along_dim(x, group=info, dim=dim, sizes=shard_sizes(npix, info.world_size))


def gather(
    x: Tensor,
    group: Optional[dist.ProcessGroup] = None,
    dim: int = 1,
    npix: Optional[int] = None,
) -> Tensor:
    """Assemble the full HEALPix field on every rank of ``group`` from the shards of the plan.

    The ranks first agree on the shards' sizes, shape and dtype (one small all-gather, so every
    rank sees the same sizes and a mismatch raises the same error on all ranks instead of
    hanging some; Note [fail together]). Autograd-aware: the gradient of the shard is the sum
    over ranks of their gradient slices (reduce-scatter), see
    :func:`hpattn_dist.comm.collectives.gather_along_dim`.

    Args:
        x: this rank's shard ``[B, N_r, E]`` (pixels along ``dim``; other dims equal on all ranks).
        group: process group (``None``: the default group, or a single process when
            ``torch.distributed`` is not initialised).
        dim: pixel dimension.
        npix: expected total ``N``; when ``None`` it is the sum of the shard sizes.

    Returns:
        ``[B, N, E]``, identical on every rank.

    Raises:
        ValueError: ``dim`` out of range; the shard sizes of the ranks differ from
            ``shard_sizes(N, P)``; their sum differs from ``npix``; or it is not ``12 * nside**2``.
        ExchangeError: a peer died or did not call within the exchange timeout.
    """
    info = resolve_group(group)
    with validated_signature(info, "gather") as sig:
        _field_npix(x, dim)
        d = dim % x.dim()
        rest = math.prod(n for i, n in enumerate(x.shape) if i != d)
        sig.set({"ndim": x.dim(), "dim": d, "rest": rest, "dtype": dtype_code(x.dtype),
                 "npix": -1 if npix is None else npix}, x.shape[d], x.device, kind="gather")
    sizes, rank, world_size = sig.per_rank, info.rank, info.world_size
    total = sum(sizes)
    if npix is not None and total != npix:
        raise ValueError(
            f"gather: shard sizes {sizes} along dim {dim} sum to {total}, expected npix={npix}"
        )
    expected = shard_sizes(total, world_size)
    if sizes != expected:
        raise ValueError(
            f"gather: shard sizes {sizes} along dim {dim} (this is group rank {rank}, local "
            f"shape {tuple(x.shape)}) do not match the shard plan shard_sizes({total}, "
            f"{world_size}) = {expected}"
        )
    try:
        npix2nside(total)
    except ValueError as err:
        raise ValueError(f"gather: the gathered field is not a HEALPix field: {err}") from None
    return gather_along_dim(x, group=info, dim=dim, sizes=sizes)
