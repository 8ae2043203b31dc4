"""Whole idx-flow models, sequence-parallel: :func:`convert_model`.

Importing this package imports ``idx_flow`` (``pip install hpattn-dist[idx-flow]``); importing
``hpattn_dist`` does not.

Legend: B batch, N_in / N_out pixels of the model's input / output grid, P group size, C channels.

After ``convert_model(model, group)``, rank ``r`` calls the model with its contiguous range
``healpix.shard_bounds(N_in, P)[r]`` of the input field ``[B, N_in, C]`` (in the pixel order of
the model's connection tables: RING for ``idx_flow.utils.compute_connection_indices``) and gets
its range ``shard_bounds(N_out, P)[r]`` of the output, equal to the unconverted model's output on
the full field, forward and backward. Every grid inside the model is split the same way
(``shard_bounds`` of that grid's size). Per module type:

- index-gather layers (``SpatialConv``, ``SpatialTransposeConv``, ``SpatialUpsampling``,
  ``SpatialPatchEmbedding``, ``SpatialMLP``, ``SpatialPooling``): a halo exchange
  (:mod:`hpattn_dist.comm.halo`) of the input rows the rank's outputs read, then the layer's own
  math (:mod:`.gather_layers`); an MLP's batch norms and dropouts as below;
- ``SpatialViT``: its pixel-indexed ``pos_embed`` is read on the rank's output rows (gradients
  right after :func:`hpattn_dist.grad_sync.sync_gradients`), like the parameters and buffers a
  user declares with ``pixel_tensors`` (:mod:`.pixel_tensors`);
- ``SpatialSelfAttention`` (also inside ``SpatialTransformerBlock``): the distributed attention
  of :func:`hpattn_dist.modules.convert_spatial_attention` with ``strategy``;
- statistics over pixels and dropout masks (``SpatialBatchNorm``, ..., ``ChannelDropout``,
  ``SpatialDropout``, ``nn.Dropout``, and the batch norms and dropouts inside ``GlobalMLP`` /
  ``SpatialMLP``): the converters of :mod:`.reductions`, masks keyed by global position so that
  training with dropout gives the same result at every P;
- per-pixel modules (:data:`PIXELWISE`) and containers (:data:`CONTAINERS`) stay as they are.

Types match by class, subclasses included when they keep the matched class's ``forward`` (a
user's ``class MyConv(SpatialConv)`` with its own ``__init__``, or the classes torch's
parametrizations such as ``spectral_norm`` inject); a subclass with its own ``forward`` is refused.
A module bound under several names or parents is converted once and replaced at every path; its
hooks move to its replacement; checks run before anything changes and a failure restores the
model (:mod:`hpattn_dist.swap_modules`). A converted model agrees once per call
(:mod:`.call_agreement`) and takes every grid split by ``shard_bounds`` (Note [converted models
take shard_bounds]).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import idx_flow
import numpy as np
import torch.distributed as dist
import torch.nn as nn
from torch.nn.utils import parametrize

from hpattn_dist.comm.binding import bind_process_group
from hpattn_dist.comm.groups import resolve_group
from hpattn_dist.integrations.idx_flow.call_agreement import attach_call_agreement
from hpattn_dist.integrations.idx_flow.context import Converter, ShardContext
from hpattn_dist.integrations.idx_flow.gather_layers import (
    GATHER_CONVERTERS,
    check_convertible,
)
from hpattn_dist.integrations.idx_flow.pixel_tensors import PixelSlices, attach_pixel_slices
from hpattn_dist.modules import DISTRIBUTED_LAYERS
from hpattn_dist.strategies import check_strategy_name
from hpattn_dist.swap_modules import (
    all_or_nothing,
    carry_hooks,
    check_aliases_kept,
    install,
    module_paths,
    unique_modules,
)

__all__ = ["CONTAINERS", "CONVERTERS", "PIXELWISE", "ShardContext", "bind_process_group", "convert_model"]

PIXELWISE: frozenset = frozenset({
    idx_flow.SpatialLayerNorm,
    nn.Linear, nn.Bilinear, nn.Identity,
    nn.ReLU, nn.ReLU6, nn.SELU, nn.CELU, nn.LeakyReLU, nn.PReLU, nn.GELU, nn.ELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
})
"""Module types whose forward acts on each pixel of ``[B, N, C]`` on its own.

``nn.LayerNorm`` / ``nn.RMSNorm`` count as per-pixel only over the last dim (one-element
``normalized_shape``); ``SpatialLayerNorm`` holds one, which is checked too. Not here: ``nn.Dropout``
and ``GlobalMLP`` (converted: a per-element mask drawn rank-locally would be correlated across
ranks, Note [pixel dropout on shards] in :mod:`.reductions`); other dropouts (``nn.AlphaDropout``,
``nn.Dropout1d``, ...) are refused under ``strict``.
"""

CONTAINERS: frozenset = frozenset({
    nn.Sequential, nn.ModuleList, nn.ModuleDict, idx_flow.SpatialTransformerBlock, idx_flow.SpatialViT,
})
"""Module types whose forward only composes their children (each child is checked), reading
their own pixel-indexed tensors per rank (:data:`PIXEL_TENSORS_OF`)."""

PIXEL_TENSORS_OF: dict[type, dict[str, int]] = {idx_flow.SpatialViT: {"pos_embed": 1}}
"""Known module types' parameters indexed by pixel, and their pixel dim (Note [pixel tensors])."""

_LAST_DIM_NORMS = frozenset({nn.LayerNorm, nn.RMSNorm})

_INSTEAD: dict[type, str] = {
    nn.BatchNorm1d: "idx_flow.SpatialBatchNorm (statistics over the pixels of every rank)",
    nn.GroupNorm: "idx_flow.SpatialGroupNorm (statistics over the pixels of every rank)",
    nn.InstanceNorm1d: "idx_flow.SpatialInstanceNorm (statistics over the pixels of every rank)",
    nn.LayerNorm: "nn.LayerNorm(C) or idx_flow.SpatialLayerNorm over the channels (this one "
                  "normalises over pixels too)",
    nn.RMSNorm: "nn.RMSNorm(C) over the channels (this one normalises over pixels too)",
    nn.MultiheadAttention: "idx_flow.SpatialSelfAttention (converted to "
                           "hpattn_dist.DistributedSpatialSelfAttention) or "
                           "hpattn_dist.DistributedSpatialSelfAttention itself",
    nn.Upsample: "idx_flow.SpatialUpsampling with a connection table between the two grids "
                 "(nn.Upsample treats the pixel order as a 1-D signal)",
    nn.Flatten: "idx_flow.Squeeze to pool the pixels, or keep [B, N, C] (flattening mixes every "
                "rank's pixels into one vector)",
    nn.Unflatten: "keep fields as [B, N, C]",
    nn.Conv1d: "idx_flow.SpatialConv with a connection table (a Conv1d over the pixel axis "
               "reads neighbours in pixel order, across shard boundaries)",
    nn.ConvTranspose1d: "idx_flow.SpatialTransposeConv with a connection table",
    nn.AvgPool1d: "idx_flow.SpatialPooling or idx_flow.Squeeze",
    nn.MaxPool1d: "idx_flow.SpatialPooling or idx_flow.Squeeze",
    nn.AdaptiveAvgPool1d: "idx_flow.Squeeze(reduction='mean')",
    nn.AdaptiveMaxPool1d: "idx_flow.Squeeze(reduction='max')",
    nn.AlphaDropout: "nn.Dropout, idx_flow.SpatialDropout or idx_flow.ChannelDropout (converted "
                     "with masks keyed by global position)",
    nn.Dropout1d: "idx_flow.ChannelDropout (converted with a mask shared by every rank)",
    nn.FeatureAlphaDropout: "idx_flow.ChannelDropout",
}
"""torch layers that cannot act per pixel on a shard, and what to use instead."""


def convert_attention(module: nn.Module, ctx: ShardContext) -> nn.Module:
    """idx-flow's ``SpatialSelfAttention`` -> :class:`~hpattn_dist.modules.DistributedSpatialSelfAttention`.

    Raises:
        ValueError: :func:`~hpattn_dist.modules.convert_spatial_attention` does not recognise the
            layer (it returned it unchanged).
    """
    from hpattn_dist.modules import DistributedSpatialSelfAttention, convert_spatial_attention

    new = convert_spatial_attention(module, ctx.process_group, strategy=ctx.strategy)
    if not isinstance(new, DistributedSpatialSelfAttention):
        raise ValueError(
            f"{type(module).__name__} {ctx.name!r}: convert_spatial_attention did not convert it "
            "(this version of hpattn_dist does not recognise idx-flow's attention)"
        )
    new.name = ctx.name or type(module).__name__  # its place in the model, in errors
    return new


def _registry() -> dict[type, Converter]:
    """Every converter: the index-gather layers', the attention's, and those of ``.reductions``.

    The reductions module may also provide the attention's converter (it then replaces the default
    above); the index-gather layers are this package's.
    """
    defaults: dict[type, Converter] = {idx_flow.SpatialSelfAttention: convert_attention}
    try:
        reductions = importlib.import_module("hpattn_dist.integrations.idx_flow.reductions")
    except ModuleNotFoundError as err:
        if err.name != "hpattn_dist.integrations.idx_flow.reductions":
            raise
        return {**defaults, **GATHER_CONVERTERS}
    return {**defaults, **reductions.CONVERTERS, **GATHER_CONVERTERS}


CONVERTERS: dict[type, Converter] = _registry()
"""idx-flow module type -> ``converter(module, ctx)`` (subclasses that keep the type's forward too)."""

# Modules that assume every grid is split by shard_bounds: the model then agrees once per call
# and checks its inputs' split (Note [converted models take shard_bounds]).
_NEEDS_SPLIT = (*GATHER_CONVERTERS, idx_flow.Unsqueeze)


def _match(module: nn.Module, types) -> Optional[type]:
    """The nearest class of ``type(module)``'s MRO that is in ``types``, or None."""
    for cls in type(module).__mro__:
        if cls in types:
            return cls
    return None


def _keeps_forward(module: nn.Module, cls: type) -> bool:
    return type(module).forward is cls.forward


def _kind(module: nn.Module) -> str:
    kind = type(module)
    return f"{kind.__module__}.{kind.__qualname__}"


def _where(paths: list[str]) -> str:
    head = paths[0] or "(root)"
    return head if len(paths) == 1 else f"{head} (also {', '.join(p or '(root)' for p in paths[1:])})"


def _grids(module: nn.Module, name: str) -> dict[int, str]:
    """Pixel counts of the grids a module reads or writes: ``{N: "where it was seen"}``."""
    out: dict[int, str] = {}
    table = getattr(module, "connection_indices", None)
    if _match(module, GATHER_CONVERTERS) and table is not None and table.dim() == 2:
        out[int(table.shape[0])] = f"the output grid of {type(module).__name__} {name!r}"
        if table.numel():
            n_in = 12 * 4 ** int(np.ceil(np.log(max(1.0, (int(table.max()) + 1) / 12)) / np.log(4)))
            out.setdefault(n_in, f"the input grid of {type(module).__name__} {name!r}")
    if _match(module, (idx_flow.Unsqueeze,)):
        out[int(module.num_points)] = f"the grid of Unsqueeze {name!r}"
    return out


@dataclass
class _Survey:
    """Pass 1 of :func:`convert_model`: what to convert and what to refuse; changes nothing."""

    todo: list[tuple[nn.Module, str, Converter]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    pixel: dict[int, tuple[nn.Module, str, dict[str, int]]] = field(default_factory=dict)
    grids: dict[int, str] = field(default_factory=dict)
    user: list[tuple[nn.Module, str]] = field(default_factory=list)
    needs_split: bool = False
    agreeing: int = 0  # layers that agree with their peers (converted now or before)

    def add_pixel(self, module: nn.Module, path: str, dims: Mapping[str, int]) -> None:
        entry = self.pixel.setdefault(id(module), (module, path, {}))
        entry[2].update(dims)
        for name, dim in dims.items():
            tensor = getattr(module, name)
            self.grids.setdefault(int(tensor.shape[dim]), f"pixel tensor {_join(path, name)!r}")
        self.needs_split = True


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _survey(model: nn.Module, paths: dict[int, list[str]], user_types: tuple[type, ...],
            strict: bool) -> _Survey:
    survey = _Survey()

    def converted(module: nn.Module) -> bool:  # by an earlier convert_model, or a distributed layer
        return bool(getattr(module, "_hp_converted", False)) or isinstance(module, DISTRIBUTED_LAYERS)

    def owns_subtree(module: nn.Module) -> bool:
        return bool(converted(module) or _match(module, CONVERTERS)
                    or isinstance(module, parametrize.ParametrizationList))

    for module in unique_modules(model, descend=lambda m: not owns_subtree(m)):
        where = _where(paths[id(module)])
        name = paths[id(module)][0]
        for hook in module._forward_pre_hooks.values():  # declared by an earlier conversion
            if isinstance(getattr(hook, "__self__", None), PixelSlices):
                survey.add_pixel(module, name, hook.__self__.dims)
        if converted(module):
            survey.agreeing += 1
            survey.needs_split |= isinstance(module, _NEEDS_SPLIT)  # Halo* subclass the idx-flow types
            survey.grids.update(_grids(module, name))
            continue
        if isinstance(module, parametrize.ParametrizationList):
            continue  # computes a parameter from replicated parameters: no pixel in sight
        check_convertible(module, where)
        cls = _match(module, CONVERTERS)
        if cls is not None:
            if not _keeps_forward(module, cls):
                survey.refused.append(
                    f"{where} ({_kind(module)}): a subclass of {cls.__module__}.{cls.__qualname__} with "
                    f"its own forward; the converter runs {cls.__qualname__}'s computation on the shard "
                    f"and cannot show that yours is the same: keep {cls.__qualname__}.forward (put "
                    "your change in a module around it)")
                continue
            survey.todo.append((module, name, CONVERTERS[cls]))
            survey.agreeing += 1
            survey.grids.update(_grids(module, name))
            survey.needs_split |= cls in _NEEDS_SPLIT
            continue
        known = _match(module, CONTAINERS | PIXELWISE | _LAST_DIM_NORMS)
        if known in _LAST_DIM_NORMS and len(module.normalized_shape) != 1:
            known = None  # normalises over more than the channels
        if known is not None and _keeps_forward(module, known):
            if known in PIXEL_TENSORS_OF:
                survey.add_pixel(module, name, PIXEL_TENSORS_OF[known])
            continue
        if type(module) in user_types or not strict:
            if not type(module).__module__.startswith(("torch.", "idx_flow.")):
                survey.user.append((module, name))  # its own tensors may be indexed by pixel
            continue
        instead = _match(module, _INSTEAD)
        if instead is not None:
            survey.refused.append(f"{where} ({_kind(module)}) cannot act per pixel on a shard; use "
                                  f"{_INSTEAD[instead]}")
        else:
            survey.refused.append(
                f"{where} ({_kind(module)}) is neither converted nor known to act per pixel; if its "
                "forward acts on each pixel on its own (or only composes its children), declare it "
                "with pixelwise=(...)")
    return survey


def _declare_pixel_tensors(model: nn.Module, survey: _Survey, paths: dict[int, list[str]],
                           pixel_tensors: Mapping[str, Optional[int]]) -> set[str]:
    """Check ``pixel_tensors`` and record them in ``survey``; return the names declared None."""
    if not isinstance(pixel_tensors, Mapping):
        raise ValueError("pixel_tensors must be a mapping {'path.to.tensor': pixel dim or None}, got "
                         f"{type(pixel_tensors).__name__}")
    not_pixel: set[str] = set()
    for full_name, dim in pixel_tensors.items():
        owner_path, _, attr = str(full_name).rpartition(".")
        try:
            owner = model.get_submodule(owner_path)
        except AttributeError:
            raise ValueError(f"pixel_tensors: {full_name!r}: the model has no module {owner_path!r}") from None
        tensor = owner._parameters.get(attr, owner._buffers.get(attr))
        if tensor is None:
            raise ValueError(f"pixel_tensors: {full_name!r}: {type(owner).__name__} {owner_path or '(root)'!r} "
                             f"has no parameter or buffer {attr!r}")
        if dim is None:
            not_pixel.add(_join(paths[id(owner)][0], attr))
            continue
        if isinstance(dim, bool) or not isinstance(dim, int) or not -tensor.dim() <= dim < tensor.dim():
            raise ValueError(f"pixel_tensors: {full_name!r}: pixel dim {dim!r} is not a dim of its shape "
                             f"{list(tensor.shape)}")
        if _match(owner, CONVERTERS):
            raise ValueError(f"pixel_tensors: {full_name!r} belongs to {type(owner).__name__}, whose "
                             "converter reads it on the shard itself: leave it out")
        survey.add_pixel(owner, paths[id(owner)][0], {attr: dim % tensor.dim()})
    return not_pixel


def _undeclared_pixel_tensors(survey: _Survey, not_pixel: set[str]) -> list[str]:
    """The user modules' tensors with a dim as long as one of the model's grids, not declared."""
    found = []
    for module, path in survey.user:
        declared = survey.pixel.get(id(module), (None, None, {}))[2]
        for store in (module._parameters, module._buffers):
            for attr, tensor in store.items():
                name = _join(path, attr)
                if tensor is None or attr in declared or name in not_pixel:
                    continue
                for dim, size in enumerate(tensor.shape):
                    if size in survey.grids:
                        kind = "parameter" if store is module._parameters else "buffer"
                        found.append(
                            f"{kind} {name!r} {list(tensor.shape)}: its dim {dim} has {size} entries, "
                            f"the pixels of {survey.grids[size]}; on a shard its forward would read "
                            f"all {size}. Declare it: pixel_tensors={{{name!r}: {dim}}} (read on this "
                            f"rank's pixels; gradients complete after sync_gradients), or "
                            f"pixel_tensors={{{name!r}: None}} if it is not indexed by pixel")
                        break
    return found


def convert_model(
    model: nn.Module,
    process_group: Optional[dist.ProcessGroup] = None,
    *,
    strategy: str = "auto",
    strict: bool = True,
    pixelwise: Sequence[type] = (),
    pixel_tensors: Optional[Mapping[str, Optional[int]]] = None,
) -> nn.Module:
    """Convert an idx-flow model IN PLACE so that each rank runs it on its shard of the field.

    Parameter objects, names and ``state_dict`` are unchanged (an optimizer built before keeps
    working). Call it on every rank of ``process_group`` with identical models; it does not
    communicate. Then each rank calls the model with ``x_local [B, N_r, C]`` (its range
    ``healpix.shard_bounds(N_in, P)[rank]``, pixel order of the model's tables) and gets
    ``[B, O_r, C_out]`` (range ``shard_bounds(N_out, P)[rank]``). Train with each rank's loss
    as its share of the global loss -- :func:`hpattn_dist.grad_sync.sharded_mean` of a sharded
    output, :func:`hpattn_dist.grad_sync.replicated_loss` of a loss on a replicated output -- and
    :func:`hpattn_dist.grad_sync.sync_gradients` before the optimizer step.

    A module bound under several names or parents is converted once and replaced at every path,
    with its hooks. Every check runs before the first change, and a failure leaves the model as it
    was. Calling it again on a converted model changes nothing, except that layers whose group was
    dropped by pickling are bound to ``process_group`` (Note [copying a layer bound to a group]).

    Args:
        model: an idx-flow model (a layer, ``SpatialViT``, an ``nn.Sequential`` of layers, your
            own modules, ...) whose lazily created parameters exist (one forward done, or a
            checkpoint loaded).
        process_group: the sequence-parallel group (None: the default group, or one process
            when ``torch.distributed`` is not initialised).
        strategy: attention strategy for the attention layers (``"auto"``, ``"ring"``,
            ``"ulysses"``; ``"hybrid"`` is refused: ``"auto"`` picks it with its degree).
        strict: raise when a module is neither converted nor known to act per pixel.
        pixelwise: your own module types whose forward acts per pixel or only composes children
            per pixel (e.g. your model's root class; subclasses keeping that forward match too);
            their children are still checked and converted.
        pixel_tensors: your modules' parameters and buffers indexed by pixel, ``{"path.name":
            pixel dim}`` (``{"pos": 1}`` for ``self.pos = nn.Parameter([1, N, E])`` of the root,
            ``{"static.orography": 0}`` for a buffer ``[N, 1]``): during the forward of the module
            that holds one, it reads as this rank's rows ``shard_bounds(N, P)[rank]`` (Note [pixel
            tensors]); ``None`` declares a tensor NOT indexed by pixel (one whose size only
            happens to equal a grid's).

    Returns:
        ``model`` (the same object, unless the root itself was replaced by a converter).

    Raises:
        ValueError: naming every module (qualified names, every alias) that cannot be converted:
            with ``strict``, a module neither converted nor known to act per pixel (a torch layer
            that cannot act per pixel names the layer to use instead); a subclass of a converted
            type with its own forward; a layer whose parameters do not exist yet; a parameter or
            buffer of your modules as long as a grid of the model and not declared in
            ``pixel_tensors``; a layer the converters cannot shard exactly; an aliased module the
            conversion would split in two. Also an unknown ``strategy`` or ``"hybrid"``,
            ``pixelwise`` not a sequence of types, a bad ``pixel_tensors`` entry.
    """
    check_strategy_name(strategy)
    if strategy == "hybrid":
        raise ValueError(
            "convert_model: strategy='hybrid' needs a Ulysses degree per layer; pass 'auto' (it "
            "chooses hybrid with the best degree when that sends fewest bytes), 'ring' or 'ulysses'"
        )
    if isinstance(pixelwise, type) or not all(isinstance(t, type) for t in pixelwise):
        raise ValueError(f"pixelwise must be a sequence of module types, got {pixelwise!r}")
    info = resolve_group(process_group, "process_group")
    ctx = ShardContext(info=info, process_group=process_group, strategy=strategy)

    # Pass 1 checks everything; it changes nothing.
    paths = module_paths(model)
    survey = _survey(model, paths, tuple(pixelwise), strict)
    not_pixel = _declare_pixel_tensors(model, survey, paths, pixel_tensors or {})
    refused = survey.refused + _undeclared_pixel_tensors(survey, not_pixel)
    if refused:
        raise ValueError(
            "convert_model: the sharded model could differ from the single-device one, so nothing "
            "was converted: " + "; ".join(refused)
            + ". (strict=False accepts unknown modules at your own risk)"
        )

    # Pass 2, children before parents; a converter's own check failing restores the model.
    before = {path: key for key, found in paths.items() for path in found}
    state_keys = list(model.state_dict())
    with all_or_nothing(model):
        replacements: dict[int, nn.Module] = {}
        for module, name, converter in reversed(survey.todo):
            new = converter(module, dataclasses.replace(ctx, name=name))
            new._hp_converted = True
            if new is not module:
                carry_hooks(module, new)
                replacements[id(module)] = new
        root = install(model, replacements)
        for owner, _, dims in survey.pixel.values():
            attach_pixel_slices(replacements.get(id(owner), owner), dims, process_group)
        if survey.needs_split or survey.agreeing > 1:  # one agreement instead of several
            attach_call_agreement(root, process_group, frozenset(survey.grids))
        bind_process_group(root, process_group)
        check_aliases_kept(before, root, "convert_model")
        if list(root.state_dict()) != state_keys:
            changed = sorted(set(state_keys) ^ set(root.state_dict()))
            raise ValueError(f"convert_model: the conversion would change the state_dict keys {changed} "
                             "(a subclass holding tensors its converted form drops?); nothing was converted")
    return root
