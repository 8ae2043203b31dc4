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

from hpattn_dist.comm.agreement import dtype_code, validated_signature
from hpattn_dist.comm.groups import GroupInfo
from hpattn_dist.kernels import KERNEL_BACKENDS, BlockKernel, check_backend_name, select_kernel
from hpattn_dist.local.plan import LocalPlan, cached_plan
from hpattn_dist.local.windows import WINDOW_MODES, check_window
from hpattn_dist.masks import key_bias_from_mask, mask_layout
from hpattn_dist.replicas import N_SUMS, LayerFacts, LayerRef, check_layer_rows, resolve_layer
from hpattn_dist.validation import check_dropout_p, check_qkv

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


def agree(q: Tensor, k: Tensor, v: Tensor, info: GroupInfo, *, window_nside: int, mode: str, backend: str,
          dropout_p: float, scale: Optional[float], key_mask: Optional[Tensor], key_bias: Optional[Tensor],
          seed: int, layer: "Optional[LayerFacts | LayerRef]", cross: bool, strategy: Optional[str], what: str,
          needs_grad: bool, bias_grad: bool, via_op: bool = True) -> WindowCall:
    """The door of windowed attention: this rank's checks inside ONE agreement whose row carries
    ``Nq_r``, ``Nk_r``, whether a mask is left and the seed (Note [fail together]), then the plan.

    ``seed``: this rank's proposal (group rank 0's is used). ``strategy``: what a caller of
    :func:`~hpattn_dist.strategies.sharded_attention` named; the halo exchange has no
    head-parallel form, so anything but ``"ring"`` / ``"auto"`` is refused (on every rank).
    ``what`` names the entry point (or the layer) in errors. ``via_op``: called by the registered
    op (False: by a rank whose arguments the op cannot take, which raises after the agreement; the
    flag is agreed, so its peers raise with it instead of running the op's exchanges).

    Raises:
        ValueError: (on every rank together) what :func:`windowed_attention` lists.
    """
    with validated_signature(info, what) as sig:
        if strategy not in (None, "ring", "auto"):
            raise ValueError(f"{what}: window_nside={window_nside!r} runs the halo exchange of local "
                             f"attention, which has no head-parallel form; strategy must be 'ring' or "
                             f"'auto', got {strategy!r}")
        check_qkv(q, k, v, scale, cross=cross)
        layer = resolve_layer(layer)  # reading parameters may fail on one rank: inside the agreement
        check_dropout_p(dropout_p)
        check_backend_name(backend)
        window_nside = check_window(window_nside, mode)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
            raise ValueError(f"dropout_seed must be an int in [0, 2**31), got {seed!r}")
        bias = key_bias_from_mask(k, key_mask, key_bias)  # k: the keys' N (check_qkv: q's B, H, dtype)
        batch, heads, n_local, head_dim = q.shape
        mask_left = key_mask is not None and mask_layout(key_mask).any_masked
        sig.set(
            {
                "B": batch, "H": heads, "D": head_dim, "dtype": dtype_code(q.dtype),
                "window_nside": window_nside, "mode": WINDOW_MODES.index(mode),
                "key_bias_heads": -1 if key_bias is None else bias.shape[1],
                "key_mask": int(key_mask is not None),
                "dropout_ppm": int(round(dropout_p * 1e6)),
                "backend": KERNEL_BACKENDS.index(backend),
                "bias_grad": int(bias_grad),
                "cross": int(cross), "scale": head_dim**-0.5 if scale is None else float(scale),
                "via_op": int(via_op),
                **({} if layer is None else {"param_layout": layer.layout}),
            },
            (n_local, k.shape[2], int(mask_left), seed, *(() if layer is None else layer.sums)),
            q.device,
            kind="healpix_local_attention",
            grads=needs_grad,
        )
    per_rank = sig.per_rank
    sizes = tuple(row[0] for row in per_rank)
    key_sizes = tuple(row[1] for row in per_rank) if cross else None
    if layer is not None:  # the same rows on every rank: raised on every rank
        check_layer_rows(info, layer, sizes, [row[4:4 + N_SUMS] for row in per_rank])
        if cross:
            check_layer_rows(info, replace(layer, name=layer.name + " (keys and values)"), key_sizes,
                             [row[4:4 + N_SUMS] for row in per_rank])
    try:
        plan = cached_plan(sizes, key_sizes, window_nside, mode, info.rank, q.device)
    except ValueError as err:  # same sizes and window on every rank: raised on every rank
        split = f"query shard sizes {list(sizes)}, key shard sizes {list(key_sizes)}" if cross else \
            f"shard sizes {list(sizes)}"
        raise ValueError(f"{what}: {err} ({split})") from None
    # Whether a mask or a bias is given is agreed (shared values), so every rank decides alike.
    use_bias = key_bias is not None or any(row[2] for row in per_rank)
    if not use_bias:
        bias = None
    kernel = select_kernel(backend, q, has_bias=use_bias, dropout=dropout_p > 0)
    scale = head_dim**-0.5 if scale is None else float(scale)
    return WindowCall(plan, sizes, key_sizes, bias, use_bias, per_rank[0][3], kernel, scale)
