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
  right after :func:`hpattn_dist.grad_sync.sync_gradients`);
- ``SpatialSelfAttention`` (also inside ``SpatialTransformerBlock``): the distributed attention
  of :func:`hpattn_dist.modules.convert_spatial_attention` with ``strategy``;
- statistics over pixels and dropout masks (``SpatialBatchNorm``, ..., ``ChannelDropout``,
  ``SpatialDropout``, ``nn.Dropout``, and the batch norms and dropouts inside ``GlobalMLP`` /
  ``SpatialMLP``): the converters of :mod:`.reductions`, masks keyed by global position so that
  training with dropout gives the same result at every P;
- per-pixel modules (:data:`PIXELWISE`) and containers (:data:`CONTAINERS`) stay as they are.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Optional, Sequence

import idx_flow
import torch.distributed as dist
import torch.nn as nn

from hpattn_dist.comm.groups import resolve_group
from hpattn_dist.integrations.idx_flow.context import Converter, ShardContext
from hpattn_dist.integrations.idx_flow.gather_layers import (
    GATHER_CONVERTERS,
    check_convertible,
    convert_vit,
)
from hpattn_dist.strategies import check_strategy_name

__all__ = ["CONTAINERS", "CONVERTERS", "PIXELWISE", "ShardContext", "convert_model"]

PIXELWISE: frozenset = frozenset({
    idx_flow.SpatialLayerNorm,
    nn.Linear, nn.Bilinear, nn.Identity,
    nn.ReLU, nn.ReLU6, nn.SELU, nn.CELU, nn.LeakyReLU, nn.PReLU, nn.GELU, nn.ELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
})
"""Module types whose forward acts on each pixel of ``[B, N, C]`` on its own (exact type match).

``nn.LayerNorm`` / ``nn.RMSNorm`` count as per-pixel only over the last dim (one-element
``normalized_shape``); ``SpatialLayerNorm`` holds one, which is checked too. Not here: ``nn.Dropout``
and ``GlobalMLP`` (converted: a per-element mask drawn rank-locally would be correlated across
ranks, Note [pixel dropout on shards] in :mod:`.reductions`); other dropouts (``nn.AlphaDropout``,
``nn.Dropout1d``, ...) are refused under ``strict``.
"""

CONTAINERS: frozenset = frozenset({
    nn.Sequential, nn.ModuleList, nn.ModuleDict, idx_flow.SpatialTransformerBlock,
})
"""Module types whose forward only composes their children (each child is checked)."""

_LAST_DIM_NORMS = (nn.LayerNorm, nn.RMSNorm)


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
    return new


def _registry() -> dict[type, Converter]:
    """Every converter: the index-gather layers', the attention's, and those of ``.reductions``.

    The reductions module may also provide the attention's converter (it then replaces the default
    above); the index-gather layers and ``SpatialViT`` are this package's.
    """
    mine: dict[type, Converter] = {idx_flow.SpatialViT: convert_vit, **GATHER_CONVERTERS}
    defaults: dict[type, Converter] = {idx_flow.SpatialSelfAttention: convert_attention}
    try:
        reductions = importlib.import_module("hpattn_dist.integrations.idx_flow.reductions")
    except ModuleNotFoundError as err:
        if err.name != "hpattn_dist.integrations.idx_flow.reductions":
            raise
        return {**defaults, **mine}
    return {**defaults, **reductions.CONVERTERS, **mine}


CONVERTERS: dict[type, Converter] = _registry()
"""idx-flow module type -> ``converter(module, ctx)`` (exact type match)."""

# Converted in place, their children still to be converted (the rest own their subtree).
_COMPOSITES = frozenset({idx_flow.SpatialViT})


def _is_pixelwise(module: nn.Module, user: tuple[type, ...]) -> bool:
    kind = type(module)
    if kind in user:
        return True
    if kind in _LAST_DIM_NORMS:
        return len(module.normalized_shape) == 1
    return kind in PIXELWISE


def convert_model(
    model: nn.Module,
    process_group: Optional[dist.ProcessGroup] = None,
    *,
    strategy: str = "auto",
    strict: bool = True,
    pixelwise: Sequence[type] = (),
) -> nn.Module:
    """Convert an idx-flow model IN PLACE so that each rank runs it on its shard of the field.

    Parameter objects, names and ``state_dict`` are unchanged (an optimizer built before keeps
    working). Call it on every rank of ``process_group`` with identical models; it does not
    communicate. Then each rank calls the model with ``x_local [B, N_r, C]`` (its range
    ``healpix.shard_bounds(N_in, P)[rank]``, pixel order of the model's tables) and gets
    ``[B, O_r, C_out]`` (range ``shard_bounds(N_out, P)[rank]``). Train with each rank's loss
    as its share of the global loss (:func:`hpattn_dist.grad_sync.sharded_mean`) and
    :func:`hpattn_dist.grad_sync.sync_gradients` before the optimizer step.

    Args:
        model: an idx-flow model (a layer, ``SpatialViT``, an ``nn.Sequential`` of layers, ...)
            whose lazily created parameters exist (one forward done, or a checkpoint loaded).
        process_group: the sequence-parallel group (None: the default group, or one process
            when ``torch.distributed`` is not initialised).
        strategy: attention strategy for the attention layers (``"auto"``, ``"ring"``,
            ``"ulysses"``; ``"hybrid"`` is refused: ``"auto"`` picks it with its degree).
        strict: raise when a module is neither converted nor known to act per pixel.
        pixelwise: your own module types (exact types) whose forward acts per pixel or only
            composes children per pixel (e.g. your model's root class); their children are
            still checked and converted.

    Returns:
        ``model`` (the same object, unless the root itself was replaced by a converter).

    Raises:
        ValueError: with ``strict``, naming every module (qualified name and type) that is
            neither converted nor per-pixel; a layer whose parameters do not exist yet; a layer
            the converters cannot shard exactly; an
            unknown ``strategy`` or ``"hybrid"``; ``pixelwise`` not a sequence of types.
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
    user = tuple(pixelwise)

    # Pass 1 checks everything before pass 2 changes anything, so a refusal leaves the model as it was.
    todo: list[tuple[nn.Module, str, Converter]] = []
    refused: list[str] = []

    def check(module: nn.Module, name: str) -> None:
        if getattr(module, "_hp_converted", False):
            return
        check_convertible(module, name)
        converter = CONVERTERS.get(type(module))
        if converter is not None:
            todo.append((module, name, converter))
            if type(module) not in _COMPOSITES:
                return
        elif strict and not (type(module) in CONTAINERS or _is_pixelwise(module, user)):
            kind = type(module)
            refused.append(f"{name or '(root)'} ({kind.__module__}.{kind.__qualname__})")
        for child_name, child in module.named_children():
            check(child, f"{name}.{child_name}" if name else child_name)

    check(model, "")
    if refused:
        raise ValueError(
            "convert_model: these modules are neither converted nor known to act per pixel, so the "
            "sharded model could differ from the single-device one: " + "; ".join(refused)
            + ". Declare your own per-pixel (or child-composing) module types with pixelwise=(...), "
            "or pass strict=False at your own risk"
        )

    # Pass 2, children before parents so that a parent replaced by its converter holds them.
    root = model
    for module, name, converter in reversed(todo):
        new = converter(module, dataclasses.replace(ctx, name=name))
        new._hp_converted = True
        if new is module:
            continue
        if not name:
            root = new
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return root
