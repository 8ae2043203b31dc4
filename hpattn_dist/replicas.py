"""What a layer adds to the one agreement of its call: replicated parameters and the field size.

Legend: P ranks of the group sharding the pixels, N_r pixels on group rank r, N = sum_r N_r.

Note [replicated parameter check]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A sequence-parallel layer's parameters are replicated: every rank must hold the same weights, or
each rank computes its shard with different projections and the result is silently wrong (no
shape differs, nothing hangs). Typical causes: ranks that built the model without a common seed,
or loaded different checkpoints. So every layer call carries a fingerprint of its parameters in
the signature ``all_gather`` it makes anyway (Note [one agreement per call] in
``strategies/plan.py``; ``healpix_local_attention``'s one agreement for the local layer): no
extra collective, a few ints per rank.

The fingerprint is a CRC-32 of the parameters' names, shapes and dtypes (compared exactly, as a
shared value) and four float64 sums over all of them: ``sum(p)``, ``sum(|p|)``, ``sum(p**2)`` and
the position-weighted ``sum(w_i * p_i)`` (compared within a relative ``1e-9``: the same weights
reduced by kernels with a different thread count may round differently; different random
initialisations differ at order 1). ``i`` counts the elements of all the layer's parameters in
order (row-major in each) and ``w_i = frac(i * phi)``, ``phi`` the golden ratio's conjugate: a
Weyl sequence, so no two positions share a weight and moving a value moves the sum (a
transposed ``out_proj.weight``, the q and k blocks of ``qkv_proj`` swapped, two same-shape
parameters exchanged). The first three sums do not see permutations; any one changed weight
changes ``sum(|p|)`` or ``sum(p**2)`` unless the change is a sign flip of a zero or below
rounding. The weights are made in chunks of :data:`_CHUNK` elements, so the extra memory is
bounded whatever the layer's size.

The sums are cached per parameter version (``Tensor._version``, bumped by every in-place change:
an optimizer step, ``copy_``, ``load_state_dict``), storage and object (a new parameter that the
allocator puts at a freed one's address, with the same version count, is read anew), so a call
reads the parameters again only after they changed: once per training step, the cost of one
elementwise pass over the layer's weights. A write through ``p.data`` bypasses the version counter (that is what ``.data``
is for) and is only seen at the next change of the parameter itself. Every call still compares, so weights that drift apart later (an optimizer step
after gradients that were not reduced, a rank that loaded another checkpoint) raise on the next
call.

A converted idx-flow model checks ALL its parameters (gather layers, norms and its own included)
at the start of each call, one fingerprint for the whole model in the call's row (Note [one
agreement per model call]); when they differ, one more exchange on that error path names the
parameters (:func:`check_model_rows`). Its attention layers then skip their own fingerprint while
their parameters are unchanged since the call's start.
"""

from __future__ import annotations

import weakref
import zlib
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn

from hpattn_dist.comm.agreement import bits_float, float_bits
from hpattn_dist.comm.groups import GroupInfo

__all__ = ["N_SUMS", "LayerFacts", "LayerRef", "ParameterFingerprint", "check_layer_rows", "check_model_rows",
           "facts_of", "fingerprintable", "layer_label", "resolve_layer"]

_RTOL = 1e-9


def layer_label(layer: object) -> str:
    """A distributed layer as errors name it: its class, then its ``name`` when it has one."""
    name = getattr(layer, "name", "")
    return type(layer).__name__ + (f" {name!r}" if name else "")
_PHI = (5**0.5 - 1) / 2  # the Weyl sequence frac(i * phi) of Note [replicated parameter check]
_CHUNK = 1 << 22  # elements per chunk of position weights (32 MiB of float64)
N_SUMS = 4
"""The float64 sums of a fingerprint: sum(p), sum(|p|), sum(p**2), sum(w_i p_i)."""


def _weighted_sum(flat: torch.Tensor, start: int) -> torch.Tensor:
    """``sum_i frac((start + i) * phi) * flat[i]`` in float64 (Note [replicated parameter check])."""
    f64 = torch.float64
    total = torch.zeros((), dtype=f64, device=flat.device)
    for a in range(0, flat.numel(), _CHUNK):
        part = flat[a:a + _CHUNK]
        weights = torch.arange(start + a, start + a + part.numel(), dtype=f64, device=flat.device)
        total += torch.dot(part.to(f64), weights.mul_(_PHI).frac_())
    return total


class ParameterFingerprint:
    """Cached fingerprint of a module's parameters (Note [replicated parameter check])."""

    def __init__(self) -> None:
        self._key: tuple = ()
        self._refs: list = []  # the parameters the cached value was read from
        self._value: tuple[int, tuple[int, ...]] = (0, (0,) * N_SUMS)

    def __call__(self, named: Iterable[tuple[str, nn.Parameter]]) -> tuple[int, tuple[int, ...]]:
        """``(layout CRC-32, the N_SUMS float64 sums as int64 bits)`` of ``named``."""
        named = list(named)
        key = tuple((name, p._version, p.data_ptr(), tuple(p.shape), p.dtype) for name, p in named)
        same = key == self._key and all(ref() is p for ref, (_, p) in zip(self._refs, named))
        if not same:
            layout = zlib.crc32(repr([(name, tuple(p.shape), str(p.dtype)) for name, p in named]).encode())
            parts = []
            start = 0
            with torch.no_grad():
                for _, p in named:
                    flat = p.detach().reshape(-1)  # summed in float64, no float64 copy
                    f64 = torch.float64
                    parts.append(torch.stack([flat.sum(dtype=f64), flat.abs().sum(dtype=f64),
                                              flat.square().sum(dtype=f64), _weighted_sum(flat, start)]))
                    start += flat.numel()
            sums = torch.stack([t.to(parts[0].device) for t in parts]).sum(0).tolist() if parts else [0.0] * N_SUMS
            self._value = (layout, tuple(float_bits(v) for v in sums))
            self._key, self._refs = key, [weakref.ref(p) for _, p in named]
        return self._value


@dataclass(frozen=True)
class LayerFacts:
    """A layer's part of its call's signature.

    Attributes:
        name: the layer in errors, e.g. ``"DistributedSpatialSelfAttention 'blocks.0.attn'"``.
        layout: CRC-32 of the parameters' names, shapes and dtypes (must be equal on every rank).
        sums: the :data:`N_SUMS` float64 parameter sums as int64 bits (equal within a relative 1e-9).
        healpix_field: the ranks' shards together must form a HEALPix field, ``N = 12 nside**2``.
        point_sets: the layer can be built for arbitrary point sets (``healpix_field=False``);
            False for local attention, whose windows are cells of the HEALPix hierarchy.
    """

    name: str
    layout: int
    sums: tuple[int, ...]
    healpix_field: bool
    point_sets: bool = True


@dataclass(frozen=True)
class LayerRef:
    """What a layer hands its attention call so that its facts can be taken where the call runs
    (inside the registered op, opaque to ``torch.compile``): its name in errors, its parameters in
    a fixed order, and the ``healpix_field`` flag."""

    name: str
    params: tuple
    healpix_field: bool
    point_sets: bool = True


# Fingerprints of the parameters seen through a LayerRef, per layer name and parameter storage
# (the cache of each is per parameter version, Note [replicated parameter check]).
_FINGERPRINTS: dict[tuple, ParameterFingerprint] = {}


def facts_of(name: str, params: Sequence[torch.Tensor], healpix_field: bool,
             point_sets: bool = True) -> LayerFacts:
    """The :class:`LayerFacts` of a layer's call from its parameters (cached per parameter version)."""
    key = (name, tuple(p.data_ptr() for p in params))
    fingerprint = _FINGERPRINTS.get(key)
    if fingerprint is None:
        if len(_FINGERPRINTS) >= 4096:
            _FINGERPRINTS.clear()
        fingerprint = _FINGERPRINTS[key] = ParameterFingerprint()
    layout, sums = fingerprint((str(i), p) for i, p in enumerate(params))
    return LayerFacts(name=name, layout=layout, sums=sums, healpix_field=healpix_field, point_sets=point_sets)


def resolve_layer(layer: "LayerFacts | LayerRef | None") -> Optional[LayerFacts]:
    """A call's :class:`LayerFacts`, read from a :class:`LayerRef` where the call runs. Called
    INSIDE the call's agreement: reading parameters can fail on one rank (meta parameters, a
    sharded one), and that failure must reach every rank (Note [fail together])."""
    if isinstance(layer, LayerRef):
        return facts_of(layer.name, layer.params, layer.healpix_field, layer.point_sets)
    return layer


def fingerprintable(p: torch.Tensor) -> bool:
    """Whether ``p`` holds its whole replicated value here: not a DTensor shard (FSDP2), not a
    ZeRO-3 partition (``ds_id``), not an FSDP flat parameter's freed storage, not on meta."""
    return (type(p.data) is torch.Tensor and not hasattr(p, "ds_id") and p.device.type != "meta"
            and (p.numel() == 0 or p.data_ptr() != 0))


def _differing_ranks(sums: Sequence[Sequence[int]]) -> tuple[list[list[float]], list[int]]:
    """The sums as floats and the ranks whose sums differ from group rank 0's (Note [replicated
    parameter check]: within a relative 1e-9)."""
    values = [[bits_float(b) for b in row] for row in sums]
    scale = [max(abs(row[i]) for row in values) for i in range(N_SUMS)]
    # sum(p) and sum(w p) may cancel: compare them at the scale of sum(|p|), which bounds both.
    scale[0] = scale[3] = max(scale[0], scale[1], scale[3])
    differ = [r for r, row in enumerate(values)
              if any(abs(row[i] - values[0][i]) > _RTOL * scale[i] for i in range(N_SUMS))]
    return values, differ


def check_model_rows(info: GroupInfo, what: str, named: Sequence[tuple[str, torch.Tensor]],
                     sums: Sequence[Sequence[int]]) -> None:
    """Check a model call's agreed parameter sums (every rank's fingerprint of ``named``); when
    they differ, name the parameters that do, in one more exchange on that error path only (every
    rank is there: they all hold the same rows).

    Raises:
        ValueError: on every rank, naming the parameters that differ and the ranks holding them.
    """
    _, differ = _differing_ranks(sums)
    if not differ:
        return
    import torch.distributed as dist

    mine = [(name, ParameterFingerprint()([(name, p)])[1]) for name, p in named]
    every: list = [None] * info.world_size
    dist.all_gather_object(every, mine, group=info.group)
    names = [name for name, _ in every[0]]
    bad = []
    for i, name in enumerate(names):
        rows = [ranks[i][1] if i < len(ranks) and ranks[i][0] == name else (0,) * N_SUMS for ranks in every]
        ranks = _differing_ranks(rows)[1]
        if ranks:
            bad.append(f"{name} ({', '.join(info.describe_rank(r) for r in ranks[:4])}"
                       f"{', ...' if len(ranks) > 4 else ''})")
    raise ValueError(
        f"{what}: the ranks of the process group hold different parameters (they must be replicated; "
        f"{len(differ)} of {info.world_size} ranks differ from group rank 0): "
        f"{', '.join(bad[:8]) + (', ...' if len(bad) > 8 else '') or 'the whole model'} differ from "
        "group rank 0's. Seed every rank identically before building the model (torch.manual_seed) "
        "or copy rank 0's weights to every rank with hpattn_dist.broadcast_parameters(model, group) "
        "before the first forward"
    )


def check_layer_rows(info: GroupInfo, facts: LayerFacts, sizes: Sequence[int],
                     sums: Sequence[Sequence[int]]) -> None:
    """Check the agreed rows of a layer's call; the same ValueError on every rank (every rank
    holds the same rows, so no further communication is needed).

    Args:
        sizes: every rank's N_r, in group-rank order.
        sums: every rank's ``facts.sums``, in group-rank order.
    """
    if facts.healpix_field:
        total = sum(sizes)
        quotient, remainder = divmod(total, 12)
        if total < 1 or remainder or round(quotient**0.5) ** 2 != quotient:
            shards = ", ".join(f"{info.describe_rank(r)}: N_r={n}" for r, n in enumerate(sizes))
            raise ValueError(
                f"{facts.name}: the ranks' shards add up to N = {total} pixels ({shards}), not a "
                "HEALPix field of 12 * nside**2 pixels. Each rank passes ITS OWN contiguous range "
                "of the field (hpattn_dist.healpix.scatter(x_full)), not the full field"
                + ("; for attention over an arbitrary point set, build the layer with "
                   "healpix_field=False" if facts.point_sets else
                   "; local attention needs one (its windows are cells of a coarser HEALPix grid)")
            )
    values, differ = _differing_ranks(sums)
    if differ:
        shown = [0, *differ[:7]]  # rank 0 and the first ranks that differ
        table = "; ".join(f"{info.describe_rank(r)}: sum={values[r][0]:.12g}, sum|p|={values[r][1]:.12g}, "
                          f"sum p^2={values[r][2]:.12g}, sum w*p={values[r][3]:.12g}" for r in shown)
        table += "; ..." if len(differ) > 7 else ""
        raise ValueError(
            f"{facts.name}: the ranks of the process group hold different parameters (they must "
            f"be replicated; {len(differ)} of {info.world_size} ranks differ from group rank 0): "
            f"{table}. Seed every rank identically before building the model "
            "(torch.manual_seed) or copy rank 0's weights to every rank with "
            "hpattn_dist.broadcast_parameters(model, group) before the first forward"
        )
