"""One agreement per call of a converted model, and the split every converted model takes.

Legend: B batch, N pixels of a grid, N_r pixels on group rank r, P group size, C channels.

Note [one agreement per model call]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Every index-gather layer needs its peers' input lengths before it can plan its halo, every
attention layer its peers' shard sizes and grid places (Note [one agreement per call] in
``strategies/plan.py``), the norms and dropouts their peers' pixel counts; each used to fetch them
in a metadata ``all_gather`` of its own on every call. Inside a converted model those facts follow
from the model's input: the layers are deterministic functions of it, so the ranks' shapes at the
k-th call of a layer are the same every time the model is called with the same inputs on every
rank. So ``convert_model`` puts :class:`ModelCallAgreement` on the model's root (when it holds a
gather layer, ``Unsqueeze`` or a pixel tensor, or more than one layer that agrees), a forward
pre-hook that runs ONE :func:`~hpattn_dist.comm.agreement.validated_signature` per call of the
model. Its row carries:

- shared: a CRC of the tensor arguments' dims, dtypes, ``requires_grad`` and sizes other than dim
  1, a CRC of the other arguments (numbers, strings, flags such as a rollout length), whether
  autograd records, autocast, a CRC of every module's training flag, a CRC of the connection tables
  of the model's gather layers, the layout (names, shapes, dtypes) and ``requires_grad`` of its
  parameters, whether they were fingerprinted, whether a layer drops;
- local: the fingerprint of every replicated parameter of the model (Note [replicated parameter
  check] in ``replicas.py``: four float64 sums, cached per parameter version, so read again only
  after an optimizer step; on a device those of the previous call, Note [fingerprint one call late]; a pixel tensor that its hook already narrowed to the rank's rows, one
  the root owns, is fingerprinted whole), one call seed (Note [seeds in a model call] in ``comm/model_call.py``),
  a CRC of the converted layers' settings (``_hp_call_config``: the attention's scale, dropout,
  strategy, backend, ...; a dropout's probability), and dim 1 (the pixels) of each tensor argument.

The agreed rows, less the sums and the seed, make the *call key*, identical on every rank. A
layer called inside the model (:func:`~hpattn_dist.comm.model_call.current_call`) looks up
``(call key, the layer, how many times it was called before in this call)`` in the model's store
(:func:`~hpattn_dist.comm.model_call.agreed`): the first time it runs its own agreement and stores
what was agreed; later calls with the same key use it with no communication, after checking
locally that its own facts (input shape, dtype, ...) are what they were then. The gather layers
store their peers' input lengths, the statistics layers and dropouts of :mod:`.reductions` their
peers' pixel counts, the attention layers their plan's rows (Note [attention plans in a model
call] in ``strategies/plan.py``); the dropouts take their seeds from the call's. Whether a layer
communicates is therefore decided from agreed values only, the same way on every rank. Steady
state: ONE metadata collective per model call, all layers together.

What a layer would have checked in its own agreement is checked at the call's start instead, on
every rank together and before any data moves: parameters that differ (the message names them,
from one more exchange on that error path), a layer's setting that differs (its name and the
setting), a mode, grad mode or table that differs; and a field whose pixels are not split as the
model needs (:func:`check_split`). What cannot be known at the call's start makes the layer agree
on its own, as outside a model: a key mask (its kept keys are data), parameters that could not be
fingerprinted at the start (FSDP2 / ZeRO-3 hold shards there; no peers), a layer's parameters
changed since the start (a forward pre-hook that rewrites them in place), a replicated tensor a
dropout must compare, windowed attention (its own halo plan). Layers called outside the model's
forward (a submodule called directly, a ``torch.utils.checkpoint`` recomputation in the backward)
find no current call and agree on their own, as before.

What this needs from the model: the shapes inside a call, and the order in which its layers are
called, are determined by the arguments (their shapes and the other values) and the modes. A
model whose shapes or control flow depend on the data (a data-dependent number of pixels, a branch
on a rank's values) breaks that; a rank whose input then differs from the agreed one raises (an
unforeseen failure on one rank inside a call, out of memory say, likewise), and its peers stop at
the exchange timeout (Note [exchange timeout]).

Note [converted models take shard_bounds]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Every grid of ``N`` pixels inside a converted model is split as ``healpix.shard_bounds(N, P)``:
the gather layers, ``Unsqueeze`` and the pixel tensors (``SpatialViT.pos_embed``, the
``pixel_tensors`` of ``convert_model``) emit or read that split, and a residual ``x + f(x)``
needs both operands split alike. So the model's inputs must be split that way too, and a gather
layer's input always is. A field split otherwise (a "skewed" split) is refused on every rank,
at the model's call (a tensor argument whose dim 1 differs between ranks, adds up to the size of
one of the model's grids and is not its ``shard_bounds`` split) and in each gather layer.
"""

from __future__ import annotations

import zlib
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torch.utils._pytree import tree_flatten

from hpattn_dist.comm.agreement import validated_signature
from hpattn_dist.comm.binding import GroupBound
from hpattn_dist.comm.groups import GroupInfo, resolve_group
from hpattn_dist.comm.model_call import CallState, agreed, current_call, pop_call, push_call
from hpattn_dist.healpix import shard_bounds
from hpattn_dist.kernels import draw_seed
from hpattn_dist.replicas import N_SUMS, ParameterFingerprint, check_model_rows, fingerprintable
from hpattn_dist.tracing import not_traced

__all__ = ["CallState", "ModelCallAgreement", "agreed", "attach_call_agreement", "check_split",
           "current_call"]

_MAX_FIELDS = 16
"""Tensor arguments whose pixel counts travel in the model call's row (the others are in its CRC)."""


def check_split(sizes: Sequence[int], what: str, which: str = "input") -> None:
    """Refuse a field whose ranks' pixel counts are not ``shard_bounds(sum(sizes), P)``.

    Called with counts agreed by every rank, so every rank raises the same error
    (Note [converted models take shard_bounds]).

    Raises:
        ValueError: the split is another contiguous split.
    """
    total, world = sum(sizes), len(sizes)
    expected = [b - a for a, b in shard_bounds(total, world)]
    if list(sizes) != expected:
        raise ValueError(
            f"{what}: the {which} is split {list(sizes)} over the {world} ranks, not as "
            f"healpix.shard_bounds({total}, {world}) = {expected}: a converted model takes each "
            f"grid split by shard_bounds (rank r feeds x[:, a:b] with a, b = "
            f"shard_bounds(N, P)[r]; README, 'idx-flow models')"
        )


def _crc(values: Any) -> int:
    return zlib.crc32(repr(values).encode())


def _config(module: nn.Module) -> Optional[tuple]:
    """A converted layer's settings that its agreement would carry (``_hp_call_config``: the
    attention's scale, dropout, strategy, ...; a dropout's probability), or None."""
    names = getattr(type(module), "_hp_call_config", None)
    if not names:
        return None
    return tuple(getattr(module, name, None) for name in names)


def _drops(module: nn.Module) -> bool:
    """Whether ``module`` asks the call for a dropout seed (in training, with a probability > 0)."""
    attr = getattr(type(module), "_hp_drop_attr", None)
    return bool(attr and module.training and float(getattr(module, attr, 0.0) or 0.0) > 0.0)


def _replicated_parameters(root: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The model's parameters by name; a pixel tensor that its owner's hook narrowed to this
    rank's rows (Note [pixel tensors], the owner may be the root itself) counts as its full
    parameter."""
    named = []
    for name, p in root.named_parameters():
        full = p if isinstance(p, nn.Parameter) else p._base
        if isinstance(full, nn.Parameter):
            named.append((name, full))
    return named


class ModelCallAgreement(GroupBound):
    """The root hooks of a converted model: one agreement per call (Note [one agreement per
    model call]). Registered by ``convert_model``; picklable (the group is dropped, Note
    [copying a layer bound to a group])."""

    _hp_transient = ("_facts_by_key", "_fingerprint")
    _MAX_KEYS = 8
    _N_HEAD = N_SUMS + 2
    """Local values before the fields' pixel counts: the parameter sums, the seed, the layers' CRC."""

    def __init__(self, process_group: Optional[dist.ProcessGroup], what: str,
                 grids: frozenset = frozenset()) -> None:
        self.process_group = process_group
        self.what = what
        self.grids = frozenset(grids)
        self._depth = 0
        self._facts_by_key: dict[tuple, dict] = {}
        self._fingerprint = ParameterFingerprint(what)

    def _facts(self, root: nn.Module, args: tuple, kwargs: dict, peers: bool) -> tuple[dict, tuple, dict]:
        """``(shared, local, extra)``: the call's row, and what it checked (``extra``: the
        parameters' record or None, the seed drawn or None, the layers' settings)."""
        leaves = tree_flatten((args, kwargs))[0]
        tensors = [t for t in leaves if isinstance(t, Tensor)]
        options = [v if isinstance(v, (bool, int, float, str, type(None))) else type(v).__qualname__
                   for v in leaves if not isinstance(v, Tensor)]
        fields = [t for t in tensors if t.dim() >= 2]  # [B, N_r, ...]: dim 1 may differ by rank
        shapes = [(str(t.dtype), t.requires_grad,
                   tuple(t.shape[:1]) + tuple(t.shape[2:]) if t.dim() >= 2 else tuple(t.shape))
                  for t in tensors]
        modes, tables, configs = [], [], []
        drops = False
        for module in root.modules():
            modes.append(module.training)
            table_crc = getattr(type(module), "_hp_table_crc", None)  # a converted gather layer's table
            if table_crc is not None:
                tables.append(table_crc(module))
            config = _config(module)
            if config is not None:
                configs.append((type(module).__name__, config))
                drops = drops or _drops(module)
        named = _replicated_parameters(root)
        checked = peers and all(fingerprintable(p) for _, p in named)
        layout, sums = self._fingerprint.deferred(named) if checked else (0, (0,) * N_SUMS)
        seed = draw_seed() if drops else None
        shared = {
            "tensor_args": len(tensors),
            "field_shapes_crc32": _crc(shapes),
            "other_args_crc32": _crc(options),
            "grad_enabled": int(torch.is_grad_enabled()),
            "autocast_crc32": _crc([torch.is_autocast_enabled(d) for d in ("cpu", "cuda")]),
            "training_modes_crc32": _crc(modes),
            "tables_crc32": _crc(tables),
            "params_checked": int(checked),
            "params_layout_crc32": layout,
            "requires_grad_crc32": _crc([p.requires_grad for _, p in named]),
            "drops": int(drops),
        }
        local = (*sums, seed or 0, _crc(configs), *(int(t.shape[1]) for t in fields[:_MAX_FIELDS]))
        record = {(p.data_ptr(), p.numel()): p._version for _, p in named} if checked else None
        return shared, local, {"named": named, "params": record, "seed": seed}

    @not_traced  # host work and one collective: never traced (Note [seeds in a model call])
    def enter(self, root: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook: agree on this call, check the split, the parameters and the layers'
        settings, open the call's state."""
        info = resolve_group(self.process_group, "process_group")
        if "_fingerprint" not in self.__dict__:
            self._fingerprint = ParameterFingerprint(self.what)
        if info.world_size == 1:  # nothing to agree on; the seeds are derived alike (Note [seeds in a model call])
            if any(_drops(m) for m in root.modules() if _config(m) is not None):
                push_call(CallState(info.group, (), {}, seed=draw_seed()))
                self._depth += 1
            return None
        device = next((t.device for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)),
                      torch.device("cpu"))
        with validated_signature(info, self.what) as sig:
            shared, local, extra = self._facts(root, args, kwargs, peers=True)
            sig.set(shared, local, device)
        rows = [tuple(r) for r in sig.per_rank]
        head = self._N_HEAD
        if len({row[head - 1] for row in rows}) > 1:
            self._raise_configs(info, root)
        if extra["params"] is not None:
            try:
                check_model_rows(info, self.what, extra["named"], [row[:N_SUMS] for row in rows])
            except ValueError:  # raised on every rank: start afresh (Note [fingerprint one call late])
                self._fingerprint.forget()
                raise
        for j in range(head, len(rows[0])):
            sizes = [row[j] for row in rows]
            if len(set(sizes)) > 1 and sum(sizes) in self.grids:
                check_split(sizes, self.what, f"tensor argument {j - head} (a field [B, N, C])")
        key = (tuple(shared.values()), tuple(row[head:] for row in rows))
        store = self.__dict__.setdefault("_facts_by_key", {})
        facts = store.get(key)
        if facts is None:  # the same keys, evicted in the same order, on every rank
            if len(store) >= self._MAX_KEYS:
                store.pop(next(iter(store)))
            facts = store[key] = {}
        seed = rows[0][N_SUMS] if extra["seed"] is not None else None  # group rank 0's draw
        push_call(CallState(info.group, key, facts, seed=seed, params=extra["params"]))
        self._depth += 1
        return None

    def _raise_configs(self, info: GroupInfo, root: nn.Module) -> None:
        """The ranks' converted layers differ in a setting: name where (one more exchange, on this
        error path only; every rank is here, holding the same rows)."""
        mine = [(name, type(m).__name__, dict(zip(type(m)._hp_call_config, _config(m))))
                for name, m in root.named_modules() if _config(m) is not None]
        every: list = [None] * info.world_size
        dist.all_gather_object(every, mine, group=info.group)
        lines = []
        for r, theirs in enumerate(every[1:], start=1):
            for i, (name, kind, settings) in enumerate(theirs):
                ref = every[0][i] if i < len(every[0]) else (None, None, {})
                if ref[0] != name or ref[2] != settings:
                    differ = {k: v for k, v in settings.items() if ref[2].get(k) != v}
                    lines.append(f"{info.describe_rank(r)}: {kind} {name or '(root)'!r} has {differ} "
                                 f"where group rank 0 has {({k: ref[2].get(k) for k in differ})}")
                    break
        raise ValueError(
            f"{self.what}: the ranks' converted layers differ in their settings (every rank must "
            f"hold the same model): {'; '.join(lines[:8]) or 'the layers themselves differ'}"
        )

    @not_traced
    def exit(self, root: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Forward hook (also called when the forward raised): close the call's state."""
        if self._depth > 0:
            self._depth -= 1
            pop_call()
        return None

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._depth = 0


def attach_call_agreement(root: nn.Module, process_group: Optional[dist.ProcessGroup],
                          grids: frozenset) -> None:
    """Register :class:`ModelCallAgreement` on ``root`` (once), checking the split of its tensor
    arguments whose pixel counts add up to one of ``grids`` (the model's grid sizes)."""
    for hook in root._forward_pre_hooks.values():
        if isinstance(getattr(hook, "__self__", None), ModelCallAgreement):
            hook.__self__.grids |= frozenset(grids)
            return
    agreement = ModelCallAgreement(process_group, f"converted model {type(root).__name__}", grids)
    root.register_forward_pre_hook(agreement.enter, with_kwargs=True)
    root.register_forward_hook(agreement.exit, with_kwargs=True, always_call=True)
