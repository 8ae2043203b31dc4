"""The signature protocol: local checks and one cross-rank agreement, so that ranks fail together.

Note [fail together]
~~~~~~~~~~~~~~~~~~~~
A rank that raises on its own while its peers enter a collective leaves them blocked until the
process group's timeout (30 min by default): the worst failure of a distributed job. So every
entry point runs its LOCAL argument checks inside :func:`validated_signature`, whose single
``all_gather`` carries, besides the shape signature the ranks must agree on, a status code:

    row = [status, crc32(what, kind, names), n_shared, n_local, *shared values, *local values, 0 ...]

one fixed-width int64 row per rank (:data:`SIGNATURE_WIDTH` ints), so a rank whose checks failed
(and so never computed its signature) still sends a row of the right size. If any row says
"failed", the ranks exchange the error texts (a second, small ``all_gather_object``, on the error
path only) and EVERY rank raises the same error, naming each failed rank and its message. If the
rows disagree on a shared value, every rank raises the same ``ValueError`` with a table of each
rank's values. A rank that fails before it reaches its own ``validated_signature`` (in a layer
above the strategy) calls :func:`raise_on_every_rank`, which sends the same fixed-width row and so
pairs with its peers' signature ``all_gather``.

The signature ``all_gather`` is not an extra cost: the ranks need each other's shard lengths
anyway (uneven shards), so the checks travel in the collective that fetches them, once per call
(Note [one agreement per call] in ``strategies/plan.py``). The entry point or layer (``what``) and
the strategy (``kind``) are hashed with the names, so ranks on different code paths, or in
different layers (one rank skipped a layer its peer ran), raise "called with different
signatures", naming each rank's call, instead of pairing their collectives; and the data's
device TYPE is a shared value, so a rank holding meta or CPU tensors among CUDA ranks raises.
A layer runs its own local work before the agreement (input checks, projections) inside
:func:`fail_together`, so that an exception there reaches every rank too.

Note [agreement off the device]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The agreement runs on EVERY call (a rank that alone changed its shapes must raise, never pair
with its peers' cached plan), but it costs the device nothing: its row is host ints, and it
travels on the group's CPU backend whenever one is registered (a bare ``init_process_group()``,
"gloo", torchtitan's "cuda:nccl,cpu:gloo": Note [init styles] in ``comm/groups.py``), and for a
group without one (NCCL only) on a gloo side group over the same ranks, made once by the group's
members at its first collective (Note [CPU side group] there). Everything a steady-state call
(shapes and mask as before) puts in the row is known on the host without reading a device
tensor: shapes, dtypes, the scale, the device type, the dropout seed (drawn from the CPU
generator as a CPU tensor, Note [seed outside the op]), whether gradients are needed, the layer's
parameter fingerprint (cached per parameter storage and version; on a device, the previous
call's fingerprint, copied to pinned host memory without waiting, Note [fingerprint one call
late] in ``replicas.py``, also when FSDP2 or ZeRO-3 gather the parameters anew every call; in a
converted model one for the whole model at each call's start) and a key mask's layout (cached per
mask tensor and version, :func:`~hpattn_dist.masks.mask_layout`; a CPU mask is read on every call,
so that a write the version counter misses, through ``.data`` or numpy, is seen). Below the door nothing reads
the device either: the plan is host ints, the dropout hash mixes the seed on the host, the
windows keep their cells as host ints.

What still reads the device, by design:

* a layer's first call (its fingerprint, to refuse differing weights before they are used);
* a group with no CPU backend whose side group could not be made (Note [CPU side group]: the
  members hold different numbers of groups, or ``HPATTN_CPU_SIDE_GROUP=0``): one read per call;
* a ``key_mask`` that is a new tensor or was changed in place, and hybrid's gathered mask on every
  call. This is inherent in compaction (Note [masked key compaction]): which keys are masked in
  every batch element decides how many keys travel, a shape every rank must know. The rule for a
  user: a fixed mask (a land mask) passed as the same tensor every call is read once; a mask that
  changes every batch and lives on the device goes without a read as a key bias,
  ``key_bias = zeros(B, N_r).masked_fill(~mask, -inf)``: the same result (a query
  with no allowed key is zero, Note [non-finite inputs]), no key dropped, the biased kernel;
  windowed attention reads a new mask once too (whether any key is masked picks the kernel).

Note [gradients on every rank or none]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The backward of a sharded attention communicates (the ring's K/V and dK/dV trips, Ulysses'
all-to-alls, the halo's gradient rows), so it must run on every rank of the group or on none. A
rank whose call records no gradient (``torch.no_grad()``, ``inference_mode``, or no input that
requires grad) runs no backward, and a peer that does would wait for it until the exchange
timeout. So whether THIS call's output will be differentiated is part of every attention
agreement (:meth:`Signature.set`'s ``grads``, computed by :func:`records_gradients`): ranks that
differ raise on every rank, naming the ranks that record gradients and those that do not. Which
inputs need their gradient may differ between ranks (a key bias learned on one rank only): the
executors run the same exchanges on every rank whenever any rank needs them (Note [backward
exchanges on every rank] in ``comm/head_exchange.py``).
"""

from __future__ import annotations

import contextlib
import struct
import threading
import zlib
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.distributed as dist

from hpattn_dist.comm.groups import GroupInfo
from hpattn_dist.comm.meta import all_gather_ints
from hpattn_dist.comm.waits import cause_text

__all__ = ["SIGNATURE_WIDTH", "Signature", "agree_on_shapes", "agreeing_group", "bits_float", "device_code",
           "dtype_code",
           "fail_together", "float_bits", "raise_on_every_rank", "records_gradients", "validated_signature"]

_DTYPE_CODES = {
    torch.float64: 1, torch.float32: 2, torch.float16: 3, torch.bfloat16: 4,
}
_DTYPE_NAMES = {code: str(dtype).replace("torch.", "") for dtype, code in _DTYPE_CODES.items()}


def float_bits(value: float) -> int:
    """A float64 as the int64 with the same bits (signature rows carry ints)."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def bits_float(bits: int) -> float:
    """The inverse of :func:`float_bits`."""
    return struct.unpack("<d", struct.pack("<q", int(bits)))[0]


_DEVICE_TYPES = ("cpu", "cuda", "meta")


def device_code(device: torch.device) -> int:
    """A small integer naming a device TYPE (``cuda:0`` and ``cuda:1`` agree), 0 = other."""
    return _DEVICE_TYPES.index(device.type) + 1 if device.type in _DEVICE_TYPES else 0


def dtype_code(dtype: torch.dtype) -> int:
    """A small integer naming a floating dtype, for cross-rank comparison (0 = other)."""
    return _DTYPE_CODES.get(dtype, 0)


def records_gradients(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a call on ``tensors`` (None skipped) will be differentiated: grad mode is on and
    one of them requires grad (Note [gradients on every rank or none])."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_GRADS = "grads"
"""The shared value :meth:`Signature.set` declares for its ``grads`` argument."""

SIGNATURE_WIDTH = 40
"""Ints per rank in the signature ``all_gather``: 4 header + up to 36 values (320 bytes)."""

_OK, _FAILED = 0, 1


class Signature:
    """What one rank declares inside :func:`validated_signature`; read ``per_rank`` after it."""

    def __init__(self, info: GroupInfo, what: str) -> None:
        self.info, self.what = info, what
        self._shared: Optional[dict[str, int]] = None
        self._floats: set[str] = set()
        self._local: tuple[int, ...] = ()
        self._scalar_local = True
        self._kind = ""
        self._device: Optional[torch.device] = None
        self._per_rank: Optional[list] = None

    def set(self, shared: dict[str, Union[int, float]], local: Union[int, Sequence[int]],
            device: Optional[torch.device] = None, *, kind: str = "", grads: Optional[bool] = None) -> None:
        """Declare this rank's signature.

        Args:
            shared: names -> values every rank must agree on exactly (B, H, D, dtype code, the
                score scale ...): ints, or floats (compared bit for bit, shown as floats).
            local: this rank's own int (its shard length) or tuple of ints; may differ by rank.
            device: the data's device (NCCL needs the all_gather buffer on it); its type is a
                shared value (``"device"``).
            kind: the code path (e.g. the strategy); ranks with different kinds, or in different
                entry points or layers (the ``what`` of :func:`validated_signature`), raise
                "called with different signatures", naming each rank's call.
            grads: whether this call's output will be differentiated (:func:`records_gradients`),
                for a call whose backward communicates: a shared value whose disagreement raises
                naming the ranks on each side (Note [gradients on every rank or none]).
        """
        self._floats = {str(k) for k, v in shared.items() if isinstance(v, float)}
        self._shared = {str(k): float_bits(v) if isinstance(v, float) else int(v) for k, v in shared.items()}
        if device is not None:  # the device kind: a meta or CPU rank among CUDA ranks raises
            self._shared["device"] = device_code(torch.device(device))
        if grads is not None:
            self._shared[_GRADS] = int(grads)
        self._scalar_local = isinstance(local, int)
        self._local = (int(local),) if self._scalar_local else tuple(int(v) for v in local)
        self._kind, self._device = kind, device
        if 4 + len(self._shared) + len(self._local) > SIGNATURE_WIDTH:
            raise ValueError(
                f"{self.what}: a signature holds at most {SIGNATURE_WIDTH - 4} values, got "
                f"{len(self._shared)} shared and {len(self._local)} local"
            )

    @property
    def declared(self) -> bool:
        """Whether :meth:`set` was called."""
        return self._shared is not None

    @property
    def per_rank(self) -> list:
        """Every rank's ``local``, in group-rank order: ints, or tuples if ``local`` was a tuple."""
        if self._per_rank is None:
            raise RuntimeError(f"{self.what}: Signature.per_rank is only known after the with-block")
        return self._per_rank

    def row(self, status: int = _OK) -> list[int]:
        """This rank's fixed-width row of host ints: what :meth:`exchange` sends. A function of the
        declaration alone, so a cache of agreed rows can key on it (a per-model-call agreement
        that skips repeated per-layer rows)."""
        row = [status, 0, 0, 0]
        if self._shared is not None:
            names = ",".join([self.what, self._kind, *self._shared]).encode()
            row[1:4] = [zlib.crc32(names), len(self._shared), len(self._local)]
            row += [*self._shared.values(), *self._local]
        return row + [0] * (SIGNATURE_WIDTH - len(row))

    def exchange(self, status: int) -> list[tuple[int, ...]]:
        """Send this rank's fixed-width row (Note [fail together]); every rank's row."""
        return all_gather_ints(self.row(status), self.info, self._meta_device())

    def _meta_device(self) -> torch.device:
        return self.info.meta_device(self._device if self._device is not None else torch.device("cpu"))

    def read(self, rows: list[tuple[int, ...]]) -> None:
        """Check the OK rows against each other and keep every rank's local values."""
        info, what = self.info, self.what
        names = list(self._shared or {})
        n_shared, n_local = len(names), len(self._local)
        header = rows[0][1:4]
        if any(row[1:4] != header for row in rows):
            # Every rank sees the same rows, so every rank is here: name each rank's call.
            calls: list[Any] = [None] * info.world_size
            dist.all_gather_object(calls, (what, self._kind, names), group=info.group)
            raise ValueError(
                "the ranks of the process group called with different signatures (different "
                "layers or entry points, strategies, or library versions; a rank that skipped a "
                "collective call, e.g. a layer in eval mode on one rank only, meets its peers in "
                "the next one): "
                + "; ".join(f"{info.describe_rank(r)}: {c[0]}" + (f" ({c[1]})" if c[1] else "")
                            + f" with {', '.join(c[2])}" for r, c in enumerate(calls))
            )
        values = [row[4:4 + n_shared] for row in rows]
        if any(v != values[0] for v in values):
            differ = [n for i, n in enumerate(names) if any(v[i] != values[0][i] for v in values)]
            if _GRADS in differ:
                self._refuse_grads([v[names.index(_GRADS)] for v in values], [n for n in differ if n != _GRADS])

            def show(name: str, value: int) -> str:
                if name in self._floats:
                    return f"{name}={bits_float(value)!r}"
                if name == "device":
                    return f"device={_DEVICE_TYPES[value - 1] if value else 'other'}"
                return f"{name}={_DTYPE_NAMES.get(value, value)}" if name == "dtype" else f"{name}={value}"

            table = "; ".join(
                f"{info.describe_rank(r)}: " + ", ".join(show(n, x) for n, x in zip(names, v))
                for r, v in enumerate(values)
            )
            raise ValueError(
                f"{what}: ranks of the process group disagree on {', '.join(differ)} (they must agree "
                f"on {', '.join(names)}): {table}"
            )
        tails = [row[4 + n_shared:4 + n_shared + n_local] for row in rows]
        self._per_rank = [t[0] for t in tails] if self._scalar_local else [tuple(t) for t in tails]

    def _refuse_grads(self, grads: list[int], also: list[str]) -> None:
        """Raise Note [gradients on every rank or none]'s error (the same on every rank)."""
        on = [r for r, g in enumerate(grads) if g]
        off = [r for r, g in enumerate(grads) if not g]
        raise ValueError(
            f"{self.what}: {_ranks_text(self.info, on)} record{'s' if len(on) == 1 else ''} gradients for "
            f"this call and {_ranks_text(self.info, off)} do{'es' if len(off) == 1 else ''} not (torch.no_grad() "
            "or inference_mode, or no input that requires grad: frozen parameters, a detached input); its "
            "backward exchanges data with every rank, so every rank must record gradients or none"
            + (f" (the ranks also disagree on {', '.join(also)})" if also else "")
        )


_AGREEING = threading.local()


def agreeing_group() -> Optional[dist.ProcessGroup]:
    """The group of the :func:`validated_signature` block running on this thread, or None."""
    groups = _AGREEING.__dict__.get("groups")
    return groups[-1] if groups else None


_ON_FAILURE: list[Callable[[Optional[dist.ProcessGroup]], None]] = []


def on_agreement_failure(callback: Callable[[Optional[dist.ProcessGroup]], None]) -> None:
    """Run ``callback(group)`` on every rank of a group whose agreement failed, before the error
    is raised there (a module above this floor registers what it must forget then)."""
    _ON_FAILURE.append(callback)


def _raise_failures(info: GroupInfo, what: str, rows: list[tuple[int, ...]],
                    local_err: Optional[BaseException]) -> None:
    """Exchange the failed ranks' errors and raise the same exception on every rank.

    The message depends only on the failed ranks' ``what`` and errors (not on this rank's), so it
    is identical everywhere, also when the failure happened in another entry point (a layer).
    Every rank of the group runs the :func:`on_agreement_failure` callbacks first: there
    ``replicas.py`` forgets the deferred parameter fingerprints of its layers over the group, as
    a rank that failed before reading its layer's would otherwise carry an older one than its
    peers at the next call (Note [fingerprint one call late] in ``replicas.py``).
    """
    for forget in _ON_FAILURE:
        forget(info.group)
    mine = None if local_err is None else (what, type(local_err).__name__, cause_text(local_err))
    texts: list[Any] = [None] * info.world_size
    dist.all_gather_object(texts, mine, group=info.group)
    failed = [r for r, row in enumerate(rows) if row[0] != _OK]
    reports = [texts[r] or ("?", "RuntimeError", "(no message)") for r in failed]
    whats = list(dict.fromkeys(rep[0] for rep in reports))
    by_error: dict[tuple[str, str], list[int]] = {}  # one entry per distinct error, not per rank
    for r, (_, kind, text) in zip(failed, reports):
        by_error.setdefault((kind, text), []).append(r)
    detail = "; ".join(f"{_ranks_text(info, ranks)}: {kind}: {text}"
                       for (kind, text), ranks in by_error.items())
    message = (f"{'/'.join(whats)}: invalid input on {len(failed)} of {info.world_size} ranks; "
               f"{detail}")
    kinds = {rep[1] for rep in reports}
    cls = {"ValueError": ValueError, "TypeError": TypeError}.get(next(iter(kinds))) if len(kinds) == 1 else None
    if cls is None:
        cls = ValueError if kinds <= {"ValueError", "TypeError"} else RuntimeError
    raise cls(message) from local_err


def _ranks_text(info: GroupInfo, ranks: list[int]) -> str:
    """``"rank 1"`` / ``"ranks 0-3, 5"`` (group ranks, ranges compressed)."""
    if len(ranks) == 1:
        return info.describe_rank(ranks[0])
    spans: list[list[int]] = []
    for r in ranks:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)
    same = all(info.global_rank(r) == r for r in ranks)
    return f"{'ranks' if same else 'group ranks'} {text}"


@contextlib.contextmanager
def validated_signature(info: GroupInfo, what: str) -> Iterator[Signature]:
    """Run local checks and the cross-rank agreement so that ranks fail TOGETHER.

    Put every local check of an entry point inside the block and declare the signature with
    :meth:`Signature.set` at its end; after the block, ``sig.per_rank`` holds every rank's local
    values. Exactly one ``all_gather`` per call (none with one rank). See Note [fail together].

    Example::

        with validated_signature(info, "ring_attention") as sig:
            check_qkv(q, k, v, scale)
            sig.set({"B": b, "H": h, "D": d, "dtype": dtype_code(q.dtype)}, n_local, q.device)
        sizes = sig.per_rank

    Raises (on EVERY rank, with the same message):
        ValueError / TypeError: a rank's local check raised it (the message names every failed
            rank and its error, ranks with the same error once, e.g. ``ranks 0-63: ...``; the failed rank's original exception is chained). With mixed or
            other exception types: ValueError if all are ValueError/TypeError, else RuntimeError.
            With one rank the local exception propagates unchanged.
        ValueError: ranks disagree on a shared value (a table of every rank's values).
        ExchangeError: the all_gather itself failed (a rank died or is stuck).
    """
    sig = Signature(info, what)
    groups = _AGREEING.__dict__.setdefault("groups", [])
    groups.append(info.group)
    try:
        yield sig
    except Exception as err:  # noqa: BLE001 - any local failure must reach the other ranks
        if info.world_size == 1:
            raise
        _raise_failures(info, what, sig.exchange(_FAILED), err)
    finally:
        groups.pop()
    if not sig.declared:
        raise RuntimeError(f"{what}: validated_signature block ended without Signature.set()")
    rows = sig.exchange(_OK)
    if any(row[0] != _OK for row in rows):
        _raise_failures(info, what, rows, None)
    sig.read(rows)


def raise_on_every_rank(info: GroupInfo, what: str, err: BaseException) -> None:
    """Raise ``err`` (as in :func:`validated_signature`) on this rank and on every peer.

    For a rank that fails BEFORE its peers' next collective: it sends a "failed" signature row,
    which pairs with the peers' :func:`validated_signature` all_gather, and every rank raises the
    same error. With one rank, ``err`` itself is raised.
    """
    if info.world_size == 1:
        raise err
    _raise_failures(info, what, Signature(info, what).exchange(_FAILED), err)


@contextlib.contextmanager
def fail_together(info: GroupInfo, what: str) -> Iterator[None]:
    """Run a rank's local work that precedes its peers' next agreement (a layer's input checks and
    projections) so that ANY exception in it reaches every rank: :func:`raise_on_every_rank`. A
    projection that raises on one rank only (an input dtype that is not the weights') would
    otherwise leave the peers blocked in the agreement that the op or strategy opens next."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - any local failure must reach the other ranks
        raise_on_every_rank(info, what, err)


def agree_on_shapes(
    info: GroupInfo,
    device: torch.device,
    shared: dict[str, int],
    local_len: Union[int, Sequence[int]],
    what: str,
) -> list:
    """Check that every rank passed the same ``shared`` values; return every rank's ``local_len``.

    ``shared`` maps names (e.g. ``"B"``, ``"H"``, ``"D"``, ``"dtype"``) to this rank's values;
    ``local_len`` is this rank's shard length (which may differ), or a tuple of such per-rank
    values, in which case a list of tuples is returned. One ``all_gather`` per call: a
    :func:`validated_signature` block holding only :meth:`Signature.set`, so it also pairs with a
    peer's failure row (Note [fail together]).

    Raises:
        ValueError: on EVERY rank, when ranks disagree on any shared value (the message lists each
            rank's values so the odd one out is obvious) or a peer's local checks failed.
    """
    with validated_signature(info, what) as sig:
        sig.set(shared, local_len, device)
    return sig.per_rank
