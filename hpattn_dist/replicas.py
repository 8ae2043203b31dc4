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
an optimizer step, ``copy_``, ``load_state_dict``), storage object (kept by a weak reference: it
survives the ``detach()`` of the registered ops' callers, and a new parameter that the allocator
puts at a freed one's address, with the same version count, is read anew), address and place in
the storage, so a call reads the parameters again only after they changed: once per training
step, the cost of one elementwise pass over the layer's weights. A write through ``p.data`` bypasses the version counter (that is what ``.data``
is for) and is only seen at the next change of the parameter itself. Every call still compares, so weights that drift apart later (an optimizer step
after gradients that were not reduced, a rank that loaded another checkpoint) raise on the next
call.

A converted idx-flow model checks ALL its parameters (gather layers, norms and its own included)
at the start of each call, one fingerprint for the whole model in the call's row (Note [one
agreement per model call]); when they differ, one more exchange on that error path names the
parameters (:func:`check_model_rows`). Its attention layers then skip their own fingerprint while
their parameters are unchanged since the call's start.

Note [fingerprint one call late]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
On a device the sums are computed where the parameters are, and reading them would stop the host
until the device has caught up (issue 24: no device-to-host read in a steady-state call). Under
FSDP2 and ZeRO-3, whose forward gathers the parameters anew, that would be every call. So for
parameters off the CPU the row of a call carries the fingerprint of the parameters of the
PREVIOUS call with the same layer name and parameter shapes (:meth:`ParameterFingerprint.deferred`),
while this call's sums travel to the host: copied with ``non_blocking=True`` into a pinned buffer,
an event recorded behind the copy, read at the next call after waiting on the event (long passed
by then; nothing reads device memory). The first call of a layer reads its sums at once (no
previous call), so weights that differ from the start still raise before anything is computed
with them. Every rank carries the fingerprint of the same call (the ranks make the same calls in
the same order), so the comparison is made from the agreed rows and raises on EVERY rank, naming
the layer and the ranks, as before. After that error every rank forgets what the layers carried
(:func:`_forget`), so that a call after ``broadcast_parameters`` starts afresh; so does every rank
after any failed agreement over the layer's group (:func:`forget_group`: a rank that failed
before reading its layer's fingerprint would otherwise carry an older one than its peers).

What a user gets: a rank whose weights differ raises at most one call late, on every rank. The
check is pulled forward to before the optimizer step where one is in between:
:func:`~hpattn_dist.grad_sync.sync_gradients` adds :func:`flush_row` (the flushed fingerprints of
every layer's latest call, summed) to the agreement it makes anyway, waits for those copies (the
backward is done by then) and raises on every rank, naming the layers (one more exchange on that
error path only). Without ``sync_gradients`` (FSDP2 and DDP reduce themselves) the next forward
raises, after one step of the optimizer on the differing weights. (A flush at the end of each
model call would cost one more collective per call; the next call's agreement is free.)

Layers that share a name and shapes (unnamed layers of one class) share a fingerprint record: the
row of such a layer carries the fingerprint of the previous layer of that name, whose copy the
host waits for, so the CPU runs at most one such layer ahead of the device; ``name=`` keeps them
apart (a whole step ahead). On the CPU nothing is deferred: each call carries its own parameters'
fingerprint. A converted idx-flow model's one fingerprint per call follows the same rule.
"""

from __future__ import annotations

import itertools
import weakref
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor

from hpattn_dist.comm.agreement import agreeing_group, bits_float, float_bits, on_agreement_failure
from hpattn_dist.comm.groups import GroupInfo

__all__ = ["N_SUMS", "LayerFacts", "LayerRef", "ParameterFingerprint", "check_flushed_rows",
           "check_layer_rows", "check_model_rows", "facts_of", "fingerprintable", "flush_fingerprints", "flush_row",
           "forget_group", "layer_label", "layer_of_op_args", "layer_op_args", "resolve_layer"]

_RTOL = 1e-9
_PHI = (5**0.5 - 1) / 2  # the Weyl sequence frac(i * phi) of Note [replicated parameter check]
_CHUNK = 1 << 22  # elements per chunk of position weights (32 MiB of float64)
N_SUMS = 4
"""The float64 sums of a fingerprint: sum(p), sum(|p|), sum(p**2), sum(w_i p_i)."""


def layer_label(layer: object) -> str:
    """A distributed layer as errors name it: its class, then its ``name`` when it has one."""
    name = getattr(layer, "name", "")
    return type(layer).__name__ + (f" {name!r}" if name else "")


def _weighted_sum(flat: torch.Tensor, start: int) -> torch.Tensor:
    """``sum_i frac((start + i) * phi) * flat[i]`` in float64 (Note [replicated parameter check])."""
    f64 = torch.float64
    total = torch.zeros((), dtype=f64, device=flat.device)
    for a in range(0, flat.numel(), _CHUNK):
        part = flat.narrow(0, a, min(_CHUNK, flat.numel() - a))
        weights = torch.arange(start + a, start + a + part.numel(), dtype=f64, device=flat.device)
        total += torch.dot(part.to(f64), weights.mul_(_PHI).frac_())
    return total


def _device_sums(named: Sequence[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """The :data:`N_SUMS` float64 sums of ``named`` ``[N_SUMS]``, on the first parameter's device
    (computed there; nothing is read)."""
    f64 = torch.float64
    parts = []
    start = 0
    with torch.no_grad():
        for _, p in named:
            flat = p.detach().reshape(-1)  # summed in float64, no float64 copy
            parts.append(torch.stack([flat.sum(dtype=f64), flat.abs().sum(dtype=f64),
                                      flat.square().sum(dtype=f64), _weighted_sum(flat, start)]))
            start += flat.numel()
    if not parts:
        return torch.zeros(N_SUMS, dtype=f64)
    return torch.stack([t.to(parts[0].device) for t in parts]).sum(0)


def _deferred(p: torch.Tensor) -> bool:
    """Whether ``p``'s fingerprint is read one call late: it is off the CPU (Note [fingerprint one
    call late]; the multi-process tests, which have no device, make every parameter count)."""
    return p.device.type != "cpu"


def _landed(host: torch.Tensor) -> list[float]:
    """The values of a host buffer whose copy has completed (a seam the host-read tests stand in for)."""
    return host.tolist()


class _Landing:
    """A fingerprint on its way to the host (Note [fingerprint one call late]): the device sums
    copied into a pinned host buffer with ``non_blocking=True`` and an event recorded behind the
    copy. :meth:`value` waits on the event (long passed when read a call later) and reads the
    buffer; nothing reads device memory."""

    def __init__(self, layout: int, sums: torch.Tensor) -> None:
        self.layout = layout
        cuda = sums.device.type == "cuda"
        live = cuda and torch.cuda.is_available()  # a fake CUDA tensor (tests) has no stream
        self.host = torch.empty(N_SUMS, dtype=torch.float64, pin_memory=live)
        self.host.copy_(sums, non_blocking=cuda)  # other devices: a blocking copy, read now
        self.event = None
        if live:
            self.event = torch.cuda.Event()
            self.event.record()
        self._value: Optional[tuple[int, tuple[int, ...]]] = None

    def value(self) -> tuple[int, tuple[int, ...]]:
        if self._value is None:
            if self.event is not None:
                self.event.synchronize()
            self._value = (self.layout, tuple(float_bits(v) for v in _landed(self.host)))
            self.host = self.event = None
        return self._value


def _value(entry: "tuple | _Landing") -> tuple[int, tuple[int, ...]]:
    return entry.value() if isinstance(entry, _Landing) else entry


def _identity(named: Sequence[tuple[str, torch.Tensor]]) -> tuple[tuple, list]:
    """``(key, storages)``: what must be unchanged for a fingerprint of ``named`` to hold. The
    storage is compared by object (it survives ``detach()``, which the registered ops' callers
    apply, and FSDP2's resizing), its address too (a storage that the allocator gave new memory),
    with the parameter's place in it and ``Tensor._version``."""
    key, storages = [], []
    for name, p in named:
        try:
            storage = p.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a tensor subclass without one: never cached
            key.append((name, next(_UNCACHED)))
            storages.append(None)
            continue
        address = None if isinstance(p, FakeTensor) else p.data_ptr()  # a fake tensor has none
        key.append((name, id(storage), address, p.storage_offset(), tuple(p.shape), tuple(p.stride()),
                    p.dtype, p.device, p._version))
        storages.append(storage)
    return tuple(key), storages


_UNCACHED = itertools.count()


def _ref(storage: Optional[torch.UntypedStorage]) -> "Callable[[], Optional[torch.UntypedStorage]]":
    return (lambda: None) if storage is None else weakref.ref(storage)


_KNOWN = 64
"""Fingerprints kept per :class:`ParameterFingerprint` (layers that share a name and shapes share
one, Note [fingerprint one call late])."""

# The ParameterFingerprints that hold a fingerprint on its way to the host, in the order of their
# first deferred use (the same on every rank), for flush_fingerprints.
_DEFERRED: "list[weakref.ref[ParameterFingerprint]]" = []


class ParameterFingerprint:
    """Cached fingerprint of a module's parameters (Note [replicated parameter check]).

    Calling it gives the fingerprint of the parameters now (for device parameters that changed,
    a device read); :meth:`deferred` gives what a layer's row carries (Note [fingerprint one call
    late]).
    """

    def __init__(self, name: str = "") -> None:
        self.name = name
        self._known: "OrderedDict[tuple, tuple[list, tuple | _Landing]]" = OrderedDict()
        self._last: "Optional[tuple | _Landing]" = None
        self._last_storages: list = []
        self._group: Optional[object] = None  # the group of the agreement of the latest deferred call
        self._registered = False

    def _lookup(self, key: tuple, storages: list) -> "Optional[tuple | _Landing]":
        hit = self._known.get(key)
        if hit is None or any(ref() is not s for ref, s in zip(hit[0], storages)):
            return None  # a new storage at a freed one's id: read anew
        self._known.move_to_end(key)
        return hit[1]

    def _start(self, named: list, key: tuple, storages: list) -> _Landing:
        layout = zlib.crc32(repr([(name, tuple(p.shape), str(p.dtype)) for name, p in named]).encode())
        landing = _Landing(layout, _device_sums(named))
        self._known[key] = ([_ref(s) for s in storages], landing)
        while len(self._known) > _KNOWN:
            self._known.popitem(last=False)
        return landing

    def __call__(self, named: Iterable[tuple[str, nn.Parameter]]) -> tuple[int, tuple[int, ...]]:
        """``(layout CRC-32, the N_SUMS float64 sums as int64 bits)`` of ``named`` as they are now."""
        named = list(named)
        key, storages = _identity(named)
        entry = self._lookup(key, storages)
        return _value(entry if entry is not None else self._start(named, key, storages))

    def deferred(self, named: Iterable[tuple[str, nn.Parameter]]) -> tuple[int, tuple[int, ...]]:
        """What a call's row carries (Note [fingerprint one call late]): for parameters on the
        CPU, the fingerprint now; on a device, the fingerprint of the parameters this object was
        given at its previous call (at its first call, now), while the fingerprint of these
        parameters travels to the host for the next call."""
        named = list(named)
        if not any(_deferred(p) for _, p in named):
            return self(named)
        if not self._registered:
            _DEFERRED.append(weakref.ref(self))
            self._registered = True
        key, storages = _identity(named)
        entry = self._lookup(key, storages)
        if entry is None:
            entry = self._start(named, key, storages)
        carried = _value(entry if self._last is None else self._last)
        self._last, self._last_storages = entry, [_ref(s) for s in storages]
        self._group = agreeing_group()
        return carried

    def forget(self) -> None:
        """Carry nothing from earlier calls: the next :meth:`deferred` call reads its parameters
        now, as a first call does."""
        self._last, self._last_storages = None, []

    def flush(self, storages: set[int]) -> Optional[tuple[int, tuple[int, ...]]]:
        """The fingerprint of the parameters of the latest :meth:`deferred` call (waiting for its
        copy), if they are all among ``storages`` (ids of live storages) and still there; else None."""
        if self._last is None:
            return None
        held = [ref() for ref in self._last_storages]
        if any(s is None or id(s) not in storages for s in held):
            return None
        return _value(self._last)


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
        late: the parameters are on a device, so ``sums`` may be those of the layer's previous
            call (Note [fingerprint one call late]); said in the error.
    """

    name: str
    layout: int
    sums: tuple[int, ...]
    healpix_field: bool
    point_sets: bool = True
    late: bool = False


@dataclass(frozen=True)
class LayerRef:
    """What a layer hands its attention call so that its facts can be taken where the call runs
    (inside the registered op, opaque to ``torch.compile``): its name in errors, its parameters in
    a fixed order, and the ``healpix_field`` flag."""

    name: str
    params: tuple
    healpix_field: bool
    point_sets: bool = True


# Fingerprints of the parameters seen through a LayerRef, per layer name and parameter shapes (the
# cache of each is per parameter storage and version, Note [replicated parameter check]; the key
# holds no address, so that parameters gathered anew every call keep their one-call-late
# fingerprint, Note [fingerprint one call late]).
_FINGERPRINTS: dict[tuple, ParameterFingerprint] = {}


def facts_of(name: str, params: Sequence[torch.Tensor], healpix_field: bool,
             point_sets: bool = True) -> LayerFacts:
    """The :class:`LayerFacts` of a layer's call from its parameters (cached per parameter
    version; on a device, the fingerprint of the previous call with this name and shapes, Note
    [fingerprint one call late])."""
    key = (name, tuple((tuple(p.shape), p.dtype) for p in params))
    fingerprint = _FINGERPRINTS.get(key)
    if fingerprint is None:
        if len(_FINGERPRINTS) >= 4096:
            _FINGERPRINTS.clear()
        fingerprint = _FINGERPRINTS[key] = ParameterFingerprint(name)
    layout, sums = fingerprint.deferred([(str(i), p) for i, p in enumerate(params)])
    return LayerFacts(name=name, layout=layout, sums=sums, healpix_field=healpix_field, point_sets=point_sets,
                      late=any(_deferred(p) for p in params))


def layer_op_args(layer: "LayerFacts | LayerRef | None") -> tuple[list[torch.Tensor], str, bool,
                                                                   Optional[torch.Tensor]]:
    """``(layer_params, layer_name, layer_healpix, layer_facts)``: a call's layer as the arguments of
    a registered op (:func:`layer_of_op_args` reads them back there); facts as int64 ``[layout,
    point_sets, late, *sums]``."""
    if isinstance(layer, LayerFacts):
        facts = torch.tensor([layer.layout, int(layer.point_sets), int(layer.late), *layer.sums], dtype=torch.int64)
        return [], layer.name, layer.healpix_field, facts
    if layer is None:
        return [], "", True, None
    # Detached: the op reads the parameters' sums only, and must not join their autograd graph
    # (ZeRO-3 re-partitions them between forward and backward).
    return [p.detach() for p in layer.params], layer.name, layer.healpix_field, None


def layer_of_op_args(name: str, params: list[torch.Tensor], healpix: bool, facts: Optional[torch.Tensor],
                     point_sets: bool = True) -> "LayerFacts | LayerRef | None":
    """The layer of a call from :func:`layer_op_args`' arguments: its parameters (read inside the
    agreement) or the fingerprint its caller gave. ``point_sets=False``: an op whose layers cannot
    be built for arbitrary point sets (local attention's), whatever the caller said."""
    if not name:
        return None
    if facts is not None:
        layout, facts_point_sets, late, *sums = (int(x) for x in facts.tolist())
        return LayerFacts(name, layout, tuple(sums), healpix, point_sets=point_sets and bool(facts_point_sets),
                          late=bool(late))
    return LayerRef(name, tuple(params), healpix, point_sets=point_sets)


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
        _forget(facts.name)
        shown = [0, *differ[:7]]  # rank 0 and the first ranks that differ
        table = "; ".join(f"{info.describe_rank(r)}: sum={values[r][0]:.12g}, sum|p|={values[r][1]:.12g}, "
                          f"sum p^2={values[r][2]:.12g}, sum w*p={values[r][3]:.12g}" for r in shown)
        table += "; ..." if len(differ) > 7 else ""
        raise ValueError(
            f"{facts.name}: the ranks of the process group hold different parameters (they must "
            f"be replicated; {len(differ)} of {info.world_size} ranks differ from group rank 0): "
            f"{table}"
            + (" (on a GPU these may be the parameters of this layer's previous call, Note [fingerprint "
               "one call late])" if facts.late else "")
            + ". Seed every rank identically before building the model "
            "(torch.manual_seed) or copy rank 0's weights to every rank with "
            "hpattn_dist.broadcast_parameters(model, group) before the first forward"
        )


def _forget(name: str) -> None:
    """Drop the deferred fingerprints of the layers named ``name`` after a mismatch was raised on
    every rank: their next call reads its own parameters again, as a first call does, instead of
    carrying the differing ones (a user who mends the weights with ``broadcast_parameters`` and
    calls again must not see the old error). Every rank raised the same error, so every rank
    forgets alike (Note [fingerprint one call late])."""
    for key in [k for k in _FINGERPRINTS if k[0] == name]:
        del _FINGERPRINTS[key]


def forget_group(group: object) -> None:
    """Forget what the layers whose latest call agreed over ``group`` carry (an agreement over it
    failed on every rank: Note [fingerprint one call late])."""
    for ref in _DEFERRED:
        fingerprint = ref()
        if fingerprint is not None and fingerprint._group is group:
            fingerprint.forget()


on_agreement_failure(forget_group)

Flushed = Sequence[tuple["ParameterFingerprint", tuple[int, tuple[int, ...]]]]


def flush_fingerprints(params: Iterable[torch.Tensor]) -> Flushed:
    """``(fingerprint, (layout, sums))`` of every deferred fingerprint whose layer's latest call on a
    device took its parameters from ``params`` (waiting for their copies), in the order of their
    first deferred use (the same on every rank that ran the same layers). Note [fingerprint one
    call late]."""
    storages = {id(p.untyped_storage()) for p in params if type(p.data) is torch.Tensor}
    alive, out = [], []
    for ref in _DEFERRED:
        fingerprint = ref()
        if fingerprint is not None:
            alive.append(ref)
            value = fingerprint.flush(storages)
            if value is not None:
                out.append((fingerprint, value))
    _DEFERRED[:] = alive
    return out


def flush_row(flushed: Flushed) -> tuple[int, ...]:
    """``(CRC of the names and layouts, the N_SUMS sums added over the flushed fingerprints, as
    int64 bits)``: what a flush puts in an agreement's row."""
    crc = zlib.crc32(repr([(fp.name, layout) for fp, (layout, _) in flushed]).encode())
    totals = [sum(bits_float(sums[i]) for _, (_, sums) in flushed) for i in range(N_SUMS)]
    return (crc, *(float_bits(t) for t in totals))


def check_flushed_rows(info: GroupInfo, what: str, flushed: Flushed, rows: Sequence[Sequence[int]]) -> None:
    """Check every rank's :func:`flush_row` (agreed rows: the same decision on every rank). Ranks
    that flushed other layers than group rank 0 (a different history) are not compared; the
    layers' next calls check them. When sums differ, one more exchange on that error path
    names the layers.

    Raises:
        ValueError: on every rank, naming the layers whose parameters differ and the ranks.
    """
    same = [r for r, row in enumerate(rows) if row[0] == rows[0][0]]
    if len(same) < 2 or not _differing_ranks([rows[r][1:] for r in same])[1]:
        return
    import torch.distributed as dist

    every: list = [None] * info.world_size
    dist.all_gather_object(every, [(fp.name, sums) for fp, (_, sums) in flushed], group=info.group)
    bad = []
    for i, (name, _) in enumerate(every[0]):
        ranks = _differing_ranks([every[r][i][1] for r in same])[1]
        if ranks:
            bad.append(f"{name} ({', '.join(info.describe_rank(same[r]) for r in ranks[:4])}"
                       f"{', ...' if len(ranks) > 4 else ''})")
    for fingerprint, _ in flushed:  # every rank raises: start afresh
        fingerprint.forget()
    raise ValueError(
        f"{what}: the ranks of the process group hold different parameters (they must be replicated): "
        f"{', '.join(bad[:8]) + (', ...' if len(bad) > 8 else '') or 'some layer'} differ from group rank "
        "0's, in the parameters of the layers' latest calls (Note [fingerprint one call late]). Seed every "
        "rank identically before building the model (torch.manual_seed) or copy rank 0's weights to every "
        "rank with hpattn_dist.broadcast_parameters(model, group) before the first forward"
    )
