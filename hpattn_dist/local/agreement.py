"""The door of one windowed call: this rank's checks inside ONE agreement, then the plan of both
splits (:class:`WindowCall`), read by the registered op (:mod:`hpattn_dist.local.ops`) and by a rank
whose arguments the op cannot take (Note [fail together]).

Legend: B batch, H heads, D head dim, P ranks in the group, r this rank, N_r pixels on rank r;
across two grids Nq_r / Nk_r queries / keys on rank r.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from torch import Tensor

from hpattn_dist.attention_spec import AttentionSpec
from hpattn_dist.comm.agreement import dtype_code, validated_signature
from hpattn_dist.comm.groups import GroupInfo
from hpattn_dist.kernels import KERNEL_BACKENDS, BlockKernel, select_kernel
from hpattn_dist.local.plan import LocalPlan, cached_plan
from hpattn_dist.local.windows import WINDOW_MODES
from hpattn_dist.masks import key_bias_from_mask, mask_layout
from hpattn_dist.replicas import N_SUMS, LayerFacts, LayerRef, check_layer_rows, resolve_layer
from hpattn_dist.validation import check_qkv

__all__ = ["WindowCall", "agree"]


@dataclass(frozen=True)
class WindowCall:
    """What one windowed call does, agreed on every rank.

    Attributes:
        plan: this rank's :class:`~hpattn_dist.local.plan.LocalPlan`.
        sizes, key_sizes: every rank's ``Nq_r`` and ``Nk_r`` (``key_sizes`` None: self-attention).
        bias: this rank's ``[B, Hb, Nk_r]`` key bias (accumulation dtype), or None when no rank
            masks a key or gives a bias (then the fused kernels run).
        use_bias: some rank has a bias (so every rank runs the biased kernel).
        seed: group rank 0's dropout seed.
        kernel, scale: the block kernel and the score scale.
    """

    plan: LocalPlan
    sizes: tuple[int, ...]
    key_sizes: Optional[tuple[int, ...]]
    bias: Optional[Tensor]
    use_bias: bool
    seed: int
    kernel: BlockKernel
    scale: float


def agree(q: Tensor, k: Tensor, v: Tensor, info: GroupInfo, spec: AttentionSpec, *, key_mask: Optional[Tensor],
          key_bias: Optional[Tensor], layer: "Optional[LayerFacts | LayerRef]", what: str, needs_grad: bool,
          bias_grad: bool, via_op: bool = True) -> WindowCall:
    """The door of windowed attention: this rank's checks (the spec's among them) inside ONE
    agreement whose row carries ``Nq_r``, ``Nk_r``, whether a mask is left and the seed (Note
    [fail together]), then the plan.

    ``spec``: the call's options, with ``window_nside`` set and ``dropout_seed`` this rank's
    proposal (group rank 0's is used); its strategy is what a caller of
    :func:`~hpattn_dist.strategies.sharded_attention` named: the halo exchange has no
    head-parallel form, so anything but ``"ring"`` / ``"auto"`` is refused (on every rank).
    ``what`` names the entry point (or the layer) in errors. ``via_op``: called by the registered
    op (False: by a rank whose arguments the op cannot take, which raises after the agreement; the
    flag is agreed, so its peers raise with it instead of running the op's exchanges).

    Raises:
        ValueError: (on every rank together) what :func:`~hpattn_dist.local.attention.healpix_local_attention`
            and :func:`~hpattn_dist.strategies.ring_cross_attention` (with a window) list.
    """
    with validated_signature(info, what) as sig:
        check_qkv(q, k, v, spec.scale, cross=spec.cross)
        layer = resolve_layer(layer)  # reading parameters may fail on one rank: inside the agreement
        spec = spec.check(what)
        bias = key_bias_from_mask(k, key_mask, key_bias)  # k: the keys' N (check_qkv: q's B, H, dtype)
        batch, heads, n_local, head_dim = q.shape
        mask_left = key_mask is not None and mask_layout(key_mask).any_masked
        sig.set(
            {
                "B": batch, "H": heads, "D": head_dim, "dtype": dtype_code(q.dtype),
                "window_nside": spec.window_nside, "mode": WINDOW_MODES.index(spec.mode),
                "key_bias_heads": -1 if key_bias is None else bias.shape[1],
                "key_mask": int(key_mask is not None),
                "dropout_p": float(spec.dropout_p) + 0.0,
                "backend": KERNEL_BACKENDS.index(spec.backend),
                "bias_grad": int(bias_grad),
                "cross": int(spec.cross), "scale": spec.scale_for(head_dim),
                "via_op": int(via_op),
                **({} if layer is None else {"param_layout": layer.layout}),
            },
            (n_local, k.shape[2], int(mask_left), spec.dropout_seed, *(() if layer is None else layer.sums)),
            q.device,
            kind="healpix_local_attention",
            grads=needs_grad,
        )
    per_rank = sig.per_rank
    sizes = tuple(row[0] for row in per_rank)
    key_sizes = tuple(row[1] for row in per_rank) if spec.cross else None
    if layer is not None:  # the same rows on every rank: raised on every rank
        check_layer_rows(info, layer, sizes, [row[4:4 + N_SUMS] for row in per_rank])
        if spec.cross:
            check_layer_rows(info, replace(layer, name=layer.name + " (keys and values)"), key_sizes,
                             [row[4:4 + N_SUMS] for row in per_rank])
    try:
        plan = cached_plan(sizes, key_sizes, spec.window_nside, spec.mode, info.rank, q.device)
    except ValueError as err:  # same sizes and window on every rank: raised on every rank
        split = f"query shard sizes {list(sizes)}, key shard sizes {list(key_sizes)}" if spec.cross else \
            f"shard sizes {list(sizes)}"
        raise ValueError(f"{what}: {err} ({split})") from None
    # Whether a mask or a bias is given is agreed (shared values), so every rank decides alike.
    use_bias = key_bias is not None or any(row[2] for row in per_rank)
    if not use_bias:
        bias = None
    kernel = select_kernel(spec.backend, q, has_bias=use_bias, dropout=spec.dropout_p > 0)
    return WindowCall(plan, sizes, key_sizes, bias, use_bias, per_rank[0][3], kernel, spec.scale_for(head_dim))
