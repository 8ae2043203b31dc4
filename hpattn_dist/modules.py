"""The drop-in distributed layer and the converter that swaps it into an existing model.

:class:`DistributedSpatialSelfAttention` computes exactly what :class:`SpatialSelfAttention`
computes, but on a field whose pixel dimension is sharded over the ranks of a process group: each
rank passes its own contiguous NESTED range of pixels ``[B, N_r, E]`` (see
:func:`hpattn_dist.healpix.shard_bounds` / :func:`hpattn_dist.healpix.scatter`) and gets the
attention output for those pixels, attended against the keys of EVERY rank.

:func:`convert_spatial_attention` replaces every :class:`SpatialSelfAttention` inside a model by
the distributed layer, keeping the very same parameter objects (so weights, device, dtype, an
optimizer built before the conversion and checkpoints all carry over), like
:func:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`.

Legend: B batch, N global pixels, N_r pixels on group rank r, P group size, E embed dim,
H heads, D head dim (E / H).

Note [replicated parameters]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The layer's parameters (``qkv_proj``, ``out_proj``) are replicated on every rank of the
sequence-parallel group, but each rank's backward only sees the part of the loss that flows
through its own pixels' projections. The full gradient is the SUM over the group of the local
gradients, provided each rank's loss is its share of the global loss (for a per-pixel mean: the
local SUM divided by the GLOBAL pixel count). :func:`hpattn_dist.grad_sync.sync_gradients` does
that reduction; DDP or DeepSpeed over the same group do it too when their averaging is
compensated (see :mod:`hpattn_dist.grad_sync`). Without it the ranks' parameters drift apart.
"""

from __future__ import annotations

from typing import Optional, Unpack

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from hpattn_dist.attention_spec import AttentionSpec, check_strategy_args
from hpattn_dist.comm.agreement import fail_together
from hpattn_dist.comm.binding import bind_process_group
from hpattn_dist.comm.groups import resolve_group
from hpattn_dist.distributed_layer import DistributedAttentionLayer, LayerOptions
from hpattn_dist.kernels import KERNEL_BACKENDS
from hpattn_dist.cross import DistributedSpatialCrossAttention
from hpattn_dist.local.modules import (
    DistributedLocalSpatialSelfAttention,
    LocalSpatialSelfAttention,
    to_distributed_local,
)
from hpattn_dist.oracle import ATTN_BACKENDS, SpatialSelfAttention
from hpattn_dist.replicas import LayerRef, layer_label
from hpattn_dist.strategies.api import attend
from hpattn_dist.swap_modules import carry_hooks, install, module_paths, unique_modules
from hpattn_dist.validation import check_layer_input

__all__ = ["DistributedSpatialSelfAttention", "convert_spatial_attention"]

class DistributedSpatialSelfAttention(DistributedAttentionLayer, SpatialSelfAttention):
    """Multi-head self-attention over a HEALPix field whose pixels are sharded across ranks.

    Same constructor arguments, attributes, parameter names (``qkv_proj``, ``out_proj``) and
    ``state_dict`` as :class:`SpatialSelfAttention` (it subclasses it), so either layer loads the
    other's checkpoint. Called on every rank of ``process_group`` with that rank's shard, it
    returns that rank's shard of the oracle's output on the full field.

    Args:
        embed_dim: total model dimension ``E`` (divisible by ``num_heads``).
        num_heads: number of heads ``H``.
        dropout: dropout probability on the attention weights (training mode only), normalised
            first, then dropped. The mask is keyed by global pixel positions and a seed drawn from
            each rank's default CPU generator, so seed every rank identically
            (``torch.manual_seed``) when ``dropout > 0``. Default: 0.0.
        bias: whether the projections have a bias. Default: True.
        attn_backend: block kernel, ``"auto" | "sdpa" | "manual" | "flash_attn"`` (the kernel
            backend of the same name, chosen from the capability table of
            :mod:`hpattn_dist.kernels.dispatch`; README, API reference, "Backend names").
            ``"flash_attn"`` is the layer's own: the oracle's contract has the other three.
            Default: ``"auto"``.
        process_group: the sequence-parallel group sharding the pixels (None: the default group,
            or a single process when ``torch.distributed`` is not initialised).
        strategy: one of :data:`hpattn_dist.strategies.STRATEGIES`:
            ``"ring"``, ``"ulysses"`` (H divisible by P), ``"hybrid"`` or ``"auto"``.
            Default: ``"auto"``, the strategy that sends the fewest bytes for this H and group size
            (:func:`hpattn_dist.strategies.choose_strategy`: Ulysses when P divides H, else hybrid
            or ring), at no extra communication.
        ulysses_degree: for ``strategy="hybrid"`` only: the Ulysses sub-group size U (a divisor of
            P and H); the sub-groups are created collectively on the first forward.
        healpix_field: the ranks' shards together form a HEALPix field (``N = 12 * nside**2``),
            checked on every call at no extra communication; False accepts any ``N`` (attention
            over an arbitrary point set). Default: True.
        name: names the layer in errors (:func:`convert_spatial_attention` sets its path in the
            model). Default: ``""``.

    Shape:
        - Input ``x_local``: ``[B, N_r, E]``, this rank's contiguous range of the field in NESTED
          order, ranges in group-rank order (the plan of :func:`hpattn_dist.healpix.shard_bounds`
          or any other contiguous split; ``N_r`` may differ between ranks).
        - Optional ``key_mask``: bool ``[B, N_r]``, True = this key may be attended to.
        - Output: ``[B, N_r, E]``.

    Raises:
        ValueError: bad constructor arguments (as for the oracle), an unknown ``strategy``, or (in
            forward) a badly shaped input or mask; errors about ranks that disagree on shapes are
            raised on every rank, and so are (in forward) parameters that differ between ranks
            and shards that add up to no HEALPix field (with ``healpix_field=True``).

    Parameters are replicated over ``process_group``: build them identically on every rank (same
    seed) or copy rank 0's with :func:`hpattn_dist.broadcast_parameters`; every forward checks
    that they agree (Note [replicated parameter check] in :mod:`hpattn_dist.replicas`). Reduce
    their gradients over the group with :func:`hpattn_dist.grad_sync.sync_gradients` (Note
    [replicated parameters]).

    ``copy.deepcopy`` shares the process group; pickling drops it, and the unpickled layer raises
    until ``layer.process_group`` is set (Note [copying a layer bound to a group] in
    :mod:`hpattn_dist.comm.binding`).

    Example::

        >>> # on every rank of a group of P ranks, x_full: [B, N, E] identical everywhere
        >>> attn = DistributedSpatialSelfAttention(64, 8)  # strategy="auto"
        >>> x_local = hpattn_dist.healpix.scatter(x_full)          # [B, N_r, E]
        >>> y_local = attn(x_local)                                  # [B, N_r, E]
    """

    # What a converted model's call agrees on for this layer (Note [attention plans in a model
    # call] in strategies/plan.py).
    _hp_call_config = ("embed_dim", "num_heads", "head_dim", "scale", "dropout_p", "attn_backend",
                       "strategy", "ulysses_degree", "healpix_field", "name")

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        attn_backend: str = "auto",
        **options: Unpack[LayerOptions],
    ) -> None:
        options = self._checked_options(attn_backend, options)
        super().__init__(embed_dim, num_heads, dropout, bias, self.oracle_backend(attn_backend))
        self._keep_options(attn_backend, options)

    def _ref(self) -> LayerRef:
        """What the call takes its facts from, where it runs (in the registered op, whose
        parameter sums ``torch.compile`` does not trace)."""
        return LayerRef(layer_label(self), tuple(self.parameters()), self.healpix_field)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"dropout={self.dropout_p}, attn_backend={self.attn_backend!r}, "
            f"strategy={self.strategy!r}"
            + ("" if self.ulysses_degree is None else f", ulysses_degree={self.ulysses_degree}")
            + ("" if self.healpix_field else ", healpix_field=False")
        )

    def forward(self, x: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
        """Attend this rank's pixels to the (unmasked) pixels of every rank.

        Args:
            x: this rank's shard ``[B, N_r, E]``.
            key_mask: optional bool ``[B, N_r]`` for this rank's keys; a query with no unmasked
                key on any rank gets a zero attention output (then ``out_proj``), never NaN.

        Returns:
            ``[B, N_r, E]``.
        """
        # The peers are about to enter the op's agreement: a check or projection that fails here
        # fails there, on every rank (Note [fail together]).
        with fail_together(resolve_group(self.process_group, "process_group"), layer_label(self)):
            check_layer_input(x, self.embed_dim, key_mask, weight=getattr(self.qkv_proj, "weight", None))
            batch_size, n_local, _ = x.shape
            qkv = self.qkv_proj(x)  # [B, N_r, 3E]
            qkv = qkv.reshape(batch_size, n_local, 3, self.num_heads, self.head_dim)
            # The oracle's permute(2, 0, 3, 1, 4).unbind(0), as views whose backward (a stack along
            # dim 2) writes the qkv gradient in place of the contiguous [B, N_r, 3, H, D] directly.
            q_local, k_local, v_local = (t.transpose(1, 2) for t in qkv.unbind(2))  # 3 x [B, H, N_r, D]

        spec = AttentionSpec(self.strategy, self.attn_backend, self.dropout_p if self.training else 0.0, self.scale,
                             ulysses_degree=self.ulysses_degree)
        out_local = attend(spec, q_local, k_local, v_local, self.process_group, key_mask=key_mask,
                           layer=self._ref())  # [B, H, N_r, D]

        out_local = out_local.transpose(1, 2).reshape(batch_size, n_local, self.embed_dim)
        return self.out_proj(out_local)


def convert_spatial_attention(
    module: nn.Module,
    process_group: Optional[dist.ProcessGroup] = None,
    strategy: str = "auto",
    attn_backend: Optional[str] = None,
    ulysses_degree: Optional[int] = None,
    healpix_field: bool = True,
) -> nn.Module:
    """Replace every :class:`SpatialSelfAttention` (and cross-attention) in ``module`` by a distributed layer.

    Recognised layers (Note [which layers convert]): this package's
    :class:`~hpattn_dist.oracle.SpatialSelfAttention`, idx-flow's ``SpatialSelfAttention`` (for
    instance inside ``idx_flow.SpatialTransformerBlock`` or ``SpatialViT``), a copy of that class
    (the seed layer) and subclasses that keep its ``forward``; idx-flow is never imported.
    :class:`~hpattn_dist.local.LocalSpatialSelfAttention` layers become
    :class:`~hpattn_dist.local.DistributedLocalSpatialSelfAttention` (same window; ``strategy``
    and ``ulysses_degree`` do not apply to them) and
    :class:`~hpattn_dist.cross.SpatialCrossAttention` layers become
    :class:`~hpattn_dist.cross.DistributedSpatialCrossAttention` (both grids sharded), so a model
    mixing them converts in one call.

    Modelled on :func:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`: returns the converted
    module (``module`` itself when it is not an attention layer, its children converted in place).
    The new layer takes over the SAME projection submodules (hence the same ``Parameter``
    objects: weights, device, dtype, ``requires_grad``, hooks on them and optimizer state keyed by
    them carry over), the same dropout probability, the training mode and the layer's own hooks.
    A layer bound under several names or parents is converted once and replaced at every path
    (:mod:`hpattn_dist.swap_modules`). Every layer is checked and built before the first one is
    swapped in, so an error leaves ``module`` unchanged. No random numbers are drawn. Distributed
    layers already in the model are left as they are (a group dropped by pickling is set to
    ``process_group``, Note [copying a layer bound to a group]).

    Args:
        module: a model containing ``SpatialSelfAttention`` layers (or one such layer).
        process_group: the sequence-parallel group for every converted layer (None: default).
        strategy: strategy name for every converted layer. Default: ``"auto"``.
        attn_backend: ``"auto" | "sdpa" | "manual" | "flash_attn"`` for every converted layer
            (local-attention layers take the first three); None keeps each layer's own.
        ulysses_degree: Ulysses sub-group size for ``strategy="hybrid"`` (only).
        healpix_field: passed to every converted layer (False: any total pixel count).

    Returns:
        The converted module. Its forward now takes this rank's shard ``[B, N_r, E]`` wherever the
        attention layers see pixels.

    Raises:
        ValueError: unknown ``strategy`` or ``attn_backend``; ``ulysses_degree`` missing for
            ``"hybrid"``, given for another strategy, or not a positive int; ``module`` holds no
            attention layer at all (nothing to convert); a layer breaks the contract (its
            projections' shapes, a dropout or scale its two backends disagree on, an
            ``attn_backend`` or ``dropout`` the distributed layer lacks, a strategy a windowed
            cross-attention cannot run), has the attention's attributes but a ``forward`` of
            its own, or overrides a method its forward calls (both named, with their path).

    Example::

        >>> model = convert_spatial_attention(model, process_group=sp_group)
    """
    check_strategy_args(strategy, ulysses_degree)
    if attn_backend is not None and attn_backend not in KERNEL_BACKENDS:
        raise ValueError(f"attn_backend must be None or one of {KERNEL_BACKENDS}, got {attn_backend!r}")
    options = {"strategy": strategy, "ulysses_degree": ulysses_degree, "healpix_field": healpix_field}
    paths = module_paths(module)
    found, built = _find_and_build(module, paths, process_group, options, attn_backend)
    if not found:
        raise ValueError(
            f"convert_spatial_attention: {type(module).__qualname__} holds no SpatialSelfAttention "
            "layer (this package's, idx-flow's or a copy of the seed layer), so nothing was "
            "converted and the model would attend within each rank's shard only"
        )
    # Every layer is built: nothing below can fail, so the model is never left half converted.
    for old, new in built:
        carry_hooks(old, new)
    for layer in found:
        bind_process_group(layer, process_group)
    return install(module, {id(old): new for old, new in built})


DISTRIBUTED_LAYERS = (DistributedSpatialSelfAttention, DistributedLocalSpatialSelfAttention,
                      DistributedSpatialCrossAttention)
"""The distributed attention layers (left as they are by the converters)."""


def _find_and_build(
    root: nn.Module,
    paths: dict[int, list[str]],
    process_group: Optional[dist.ProcessGroup],
    options: dict,
    attn_backend: Optional[str],
) -> tuple[list[nn.Module], list[tuple[nn.Module, nn.Module]]]:
    """Every attention layer under ``root`` (once each), and ``(old, new)`` for those to convert."""
    found: list[nn.Module] = []
    built: list[tuple[nn.Module, nn.Module]] = []
    for module in unique_modules(root, descend=lambda m: not _is_attention(m)):
        path = _where(paths[id(module)])
        if not _is_attention(module):
            if all(hasattr(module, name) for name in ("qkv_proj", "out_proj", "num_heads")):
                raise ValueError(
                    f"convert_spatial_attention: {path or 'the model'} ({type(module).__qualname__}) "
                    "has the attributes of SpatialSelfAttention but its own forward, which the "
                    "distributed layer cannot be shown to compute; convert it by hand or keep "
                    "SpatialSelfAttention.forward"
                )
            continue
        found.append(module)
        name = paths[id(module)][0]
        if isinstance(module, DISTRIBUTED_LAYERS):
            continue
        _refuse_overrides(module, path)
        if isinstance(module, LocalSpatialSelfAttention):  # windowed: its own distributed twin
            new = to_distributed_local(module, process_group, attn_backend, name=name)
        elif _runs_forward_of(module, "SpatialCrossAttention"):
            new = _convert_cross(module, process_group, options, attn_backend, path)
        else:
            new = _convert_layer(module, process_group, options, attn_backend, path)
        built.append((module, new))
    return found, built


def _refuse_overrides(layer: nn.Module, path: str) -> None:
    """Raise when ``layer``'s class overrides a method that its recognised forward calls (or, for a
    ``LocalSpatialSelfAttention``, ``forward`` itself).

    The distributed layer takes over the projections and runs its own code, none of the layer's
    methods: a subclass's ``_qkv`` / ``_project_out`` / ``_project`` (a QK norm, an output gate)
    would be dropped silently. Methods the forward does not call (added helpers, ``__init__``,
    ``extra_repr``) do not matter.
    """
    mro = type(layer).__mro__
    base = LocalSpatialSelfAttention if isinstance(layer, LocalSpatialSelfAttention) else \
        next(cls for cls in mro if "forward" in vars(cls))
    called = {"forward", *base.forward.__code__.co_names}
    overridden = sorted({name for cls in mro[:mro.index(base)] for name in vars(cls)
                         if name in called and callable(getattr(base, name, None))})
    if overridden:
        raise ValueError(
            f"convert_spatial_attention: {path or 'the model'} ({type(layer).__qualname__}) overrides "
            f"{', '.join(overridden)} of {base.__name__}, which its forward calls and the distributed "
            f"layer does not run; convert it by hand or keep {base.__name__}'s"
        )


def _where(paths: list[str]) -> str:
    """``"blocks.0.attn"``, or ``"blocks.0.attn (also: global_attn)"`` for an aliased module."""
    head = paths[0] or "the model"
    return head if len(paths) == 1 else f"{head} (also: {', '.join(p or 'the model' for p in paths[1:])})"


def _is_attention(module: nn.Module) -> bool:
    return isinstance(module, (LocalSpatialSelfAttention, *DISTRIBUTED_LAYERS)) or _has_seed_forward(module) \
        or _runs_forward_of(module, "SpatialCrossAttention")


def _runs_forward_of(module: nn.Module, class_name: str) -> bool:
    """True when the ``forward`` ``module`` runs is defined by a class named ``class_name``."""
    for cls in type(module).__mro__:
        if "forward" in vars(cls):
            return cls.__name__ == class_name
    return False


def _has_seed_forward(module: nn.Module) -> bool:
    """True when ``module`` runs a ``SpatialSelfAttention`` forward.

    Note [which layers convert]
    ~~~~~~~~~~~~~~~~~~~~~~~~~~~
    A layer converts when the ``forward`` it runs is defined by a class named
    ``SpatialSelfAttention``: this package's oracle, idx-flow's (``idx_flow.attention``, the same
    code as the seed layer: fused ``qkv_proj``, heads split by ``reshape(B, N, 3, H, D)``, scale
    ``D ** -0.5``, dropout on the normalised weights, backends auto/sdpa/manual) or a user's copy of
    the seed. The class is matched by name, not imported, so idx-flow stays optional. A subclass
    that overrides ``forward`` computes something else and is refused (:func:`_find_and_build`), and
    so is one that overrides a method the recognised forward calls (``_qkv`` of the local layer,
    ``_project`` of cross-attention: :func:`_refuse_overrides`), which the distributed layer would
    drop.
    """
    return _runs_forward_of(module, "SpatialSelfAttention")


def _layer_spec(layer: nn.Module, path: str) -> dict:
    """The constructor arguments of ``layer``, after checking it honours the seed's contract."""
    where = f"convert_spatial_attention: {path or 'the model'} ({type(layer).__qualname__})"
    embed_dim, num_heads = layer.embed_dim, layer.num_heads
    if not all(isinstance(v, int) and v > 0 for v in (embed_dim, num_heads)) or embed_dim % num_heads:
        raise ValueError(
            f"{where}: embed_dim={embed_dim!r} must be a multiple of num_heads={num_heads!r} > 0"
        )
    qkv, out = layer.qkv_proj, layer.out_proj
    if not (isinstance(qkv, nn.Linear) and qkv.in_features == embed_dim
            and qkv.out_features == 3 * embed_dim):
        raise ValueError(f"{where}: qkv_proj must be Linear({embed_dim}, {3 * embed_dim}), got {qkv}")
    if not (isinstance(out, nn.Linear) and out.in_features == embed_dim and out.out_features == embed_dim):
        raise ValueError(f"{where}: out_proj must be Linear({embed_dim}, {embed_dim}), got {out}")
    head_dim = embed_dim // num_heads
    if getattr(layer, "head_dim", head_dim) != head_dim or getattr(layer, "scale", None) not in (
        None, head_dim**-0.5
    ):
        raise ValueError(
            f"{where}: head_dim={getattr(layer, 'head_dim', None)} and scale="
            f"{getattr(layer, 'scale', None)} differ from embed_dim // num_heads = {head_dim} and "
            "its ** -0.5 (the SDPA backend would ignore a changed scale, the manual one use it)"
        )
    module_p = getattr(layer.dropout, "p", None)
    dropout_p = getattr(layer, "_dropout_p", module_p)
    if module_p is not None and module_p != dropout_p:
        raise ValueError(
            f"{where}: dropout.p={module_p} but _dropout_p={dropout_p}: its manual and SDPA "
            "backends drop with different probabilities"
        )
    if layer.attn_backend not in ATTN_BACKENDS:
        # The seed's names; another (idx-flow runs SDPA for any other string) has no meaning here.
        raise ValueError(f"{where}: attn_backend={layer.attn_backend!r} is not one of the seed "
                         f"layer's {ATTN_BACKENDS}; pass attn_backend= to choose the kernel")
    return {"embed_dim": embed_dim, "num_heads": num_heads, "dropout": dropout_p,
            "bias": qkv.bias is not None, "attn_backend": layer.attn_backend}


def _convert_layer(
    layer: nn.Module,
    process_group: Optional[dist.ProcessGroup],
    options: dict,
    attn_backend: Optional[str],
    path: str,
) -> DistributedSpatialSelfAttention:
    spec = _layer_spec(layer, path)
    if attn_backend is not None:
        spec["attn_backend"] = attn_backend
    # Built on the meta device: no allocation and no draw from the RNG for the throw-away
    # projections, which are replaced by the layer's own submodules right after.
    try:
        with torch.device("meta"):
            new = DistributedSpatialSelfAttention(**spec, process_group=process_group, **options,
                                                  name=path or type(layer).__name__)
    except (ValueError, RuntimeError) as err:
        raise ValueError(
            f"convert_spatial_attention: {path or 'the model'} ({type(layer).__qualname__}) cannot be "
            f"converted: {err}"
        ) from err
    new.qkv_proj = layer.qkv_proj
    new.out_proj = layer.out_proj
    new.dropout = layer.dropout
    new.train(layer.training)
    return new


def _convert_cross(
    layer: nn.Module,
    process_group: Optional[dist.ProcessGroup],
    options: dict,
    attn_backend: Optional[str],
    path: str,
) -> DistributedSpatialCrossAttention:
    """A :class:`~hpattn_dist.cross.SpatialCrossAttention` as the distributed layer, built on the
    meta device and given the layer's own projections and dropout (as :func:`_convert_layer`)."""
    where = f"convert_spatial_attention: {path or 'the model'} ({type(layer).__qualname__})"
    if not (isinstance(layer.q_proj, nn.Linear) and isinstance(layer.kv_proj, nn.Linear)
            and isinstance(layer.out_proj, nn.Linear)):
        raise ValueError(f"{where}: q_proj, kv_proj and out_proj must be nn.Linear")
    try:
        with torch.device("meta"):
            new = DistributedSpatialCrossAttention(
                layer.embed_dim, layer.num_heads, layer.kv_dim, layer.dropout_p,
                layer.q_proj.bias is not None, attn_backend or layer.attn_backend,
                process_group=process_group, **options, name=path or type(layer).__name__,
                window_nside=layer.window_nside, mode=layer.mode)
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"{where} cannot be converted: {err}") from err
    new.q_proj, new.kv_proj, new.out_proj = layer.q_proj, layer.kv_proj, layer.out_proj
    new.dropout = layer.dropout
    new.train(layer.training)
    return new
