"""idx-flow's dropouts on a sharded field: masks keyed by global positions and one agreed seed,
so the ranks drop as one process would (Note [pixel dropout on shards]).

Legend: B batch, N pixels of the layer's grid, N_r pixels on group rank r, P group size, C channels.

Note [pixel dropout on shards]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
idx-flow draws its masks from the default generator (``torch.bernoulli``). On shards:

- ``ChannelDropout`` (mask ``[B, 1, C]``, one decision per channel for ALL pixels) must drop the
  same channels on every rank. Rank-local draws agree only while every rank's generator is in the
  same state, which ends at the first draw whose size depends on ``N_r`` (any per-pixel dropout),
  and the layer then silently computes another function. Here the keep/drop of ``(b, c)`` is the
  position-keyed hash of :func:`hpattn_dist.kernels.keep_mask` with group rank 0's seed (drawn
  from its default generator, shared through the signature all_gather): the same mask on every
  rank.
- ``SpatialDropout`` (mask ``[B, N, 1]``, one decision per pixel) has a correct marginal when
  drawn rank-locally, but not the single-device JOINT distribution: ranks seeded alike (as the
  attention layers ask) draw identical masks over their local indices, so the i-th pixel of every
  shard is dropped together; and the mask changes with P. Here the decision for ``(b, pixel)`` is
  keyed by the GLOBAL pixel index: independent per pixel with keep probability ``1 - p`` (up to
  2^-32), and the same mask at every P (a run at P ranks equals the run at P = 1 bitwise).
- ``nn.Dropout`` (one decision per element: transformer feed-forward, ``SpatialViT``'s
  ``embed_dropout``, inside ``GlobalMLP`` / ``SpatialMLP``) has the same problem as
  ``SpatialDropout``: ranks seeded alike draw the same mask for local index i. Here the decision
  for ``(b, i, c)`` is keyed by the GLOBAL pixel ``i``. The MLPs apply it to ``[B * N_r, C]``
  rows; their forward tells the dropout ``B`` so the rows are read as ``[B, N_r, C]``.
- Neither equals the unconverted module's mask bitwise: it comes from another random stream.
  What holds is the Bernoulli(1 - p) law per decision and exact invariance under P. The scaling is
  idx-flow's (and torch's) ``x * mask / (1 - p)``. Eval mode and ``p = 0`` return the input
  untouched, as the unconverted modules do.
- Every rank draws one seed per call from its default generator (only rank 0's is used), so the
  generators of all ranks, and of a one-process run, advance alike: with no other rank-dependent
  draw in the model, a training run on P ranks equals the run on one.
"""

from __future__ import annotations

import zlib
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from hpattn_dist.comm.agreement import dtype_code, validated_signature
from hpattn_dist.comm.groups import offsets, resolve_group
from hpattn_dist.comm.model_call import agreed, derives_seeds, layer_seed
from hpattn_dist.kernels import DropoutSpec, draw_seed, keep_mask
from hpattn_dist.integrations.idx_flow.context import ShardedModule, check_field

__all__ = ["ShardedChannelDropout", "ShardedDropout", "ShardedSpatialDropout"]


def _check_p(p: Any, what: str) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{what}: dropout probability must be between 0 and 1, got {p!r}")
    return float(p)


class _ShardedPixelDropout(ShardedModule):
    """Shared body of the dropouts: agree on a seed, build the keyed mask, scale."""

    _hp_call_config = ("p",)  # agreed by a converted model's call (Note [seeds in a model call])
    _hp_drop_attr = "p"

    def __init__(self, module: nn.Module, process_group: Optional[dist.ProcessGroup] = None,
                 name: str = "") -> None:
        super().__init__(module, process_group, name)
        self.p = _check_p(module.p, self._what)

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: Tensor) -> Tensor:
        drops = self.training and self.p > 0.0
        info = resolve_group(self.process_group)
        # Inside a model call that draws seeds every rank proposes the same derived seed (Note
        # [seeds in a model call]); outside one each its own draw, and rank 0's is taken.
        derived = drops and derives_seeds(info)
        proposal = layer_seed(info, self._what, draw_seed()) if drops else 0

        def agree() -> tuple[list[int], int]:
            with validated_signature(info, self._what) as sig:  # also in eval: Note [modes in the agreement]
                field, replicated = self._as_field(x)
                batch, n_local, channels = field.shape
                shared = {"B": batch, "C": channels, "dtype": dtype_code(x.dtype), "drops": int(drops)}
                if replicated and drops:
                    shared["crc"] = _crc32(x)
                sig.set(shared, (n_local, proposal), x.device)
            return [row[0] for row in sig.per_rank], sig.per_rank[0][1]  # group rank 0's seed

        if drops and (not derived or self._replicated(x)):  # a fresh seed, or a CRC of the data
            sizes, seed = agree()
        else:
            mine = (tuple(x.shape), x.dtype, drops, getattr(self, "batch", None)) \
                if isinstance(x, Tensor) else type(x).__name__
            sizes, seed = agreed(self, info, mine, agree, self._what)
            seed = proposal  # the call's derived seed, the same on every rank
        if not drops:
            return x
        field, replicated = self._as_field(x)
        batch, n_local, channels = field.shape
        offset = 0 if replicated else offsets(sizes)[info.rank]
        mask = self._mask(DropoutSpec(self.p, seed, q_offset=offset), batch, n_local, channels, x.device)
        y = field * mask.to(x.dtype)
        if self.p < 1.0:  # p == 1 drops everything: zeros, as torch
            y = y / (1 - self.p)
        return y.reshape(x.shape)

    def _as_field(self, x: Any) -> tuple[Tensor, bool]:
        """Check ``x`` (locally) and return it as ``[B, N_r, C]``, and whether it is replicated."""
        check_field(x, self._what)
        return x, False

    def _replicated(self, x: Any) -> bool:
        """Whether ``x`` is read as a replicated tensor (its values are then agreed each call)."""
        return False

    def _mask(self, spec: DropoutSpec, batch: int, n_local: int, channels: int, device) -> Tensor:
        raise NotImplementedError


def _crc32(x: Tensor) -> int:
    """CRC-32 of a tensor's bytes: ranks holding a replicated tensor hold the same bits."""
    raw = x.detach().contiguous().reshape(-1).view(torch.uint8).cpu()
    return zlib.crc32(raw.numpy().tobytes())


class ShardedChannelDropout(_ShardedPixelDropout):
    """idx-flow ``ChannelDropout`` on a sharded field: the same ``[B, 1, C]`` mask on every rank.

    The keep/drop of channel ``c`` of sample ``b`` is a hash of ``(seed, b, c)``, the seed group
    rank 0's draw (Note [pixel dropout on shards]). Shape: ``[B, N_r, C] -> [B, N_r, C]``.
    """

    _kind = "ChannelDropout"

    def _mask(self, spec: DropoutSpec, batch: int, n_local: int, channels: int, device) -> Tensor:
        mask = keep_mask(DropoutSpec(spec.p, spec.seed), batch, 1, 1, channels, device)  # [B, 1, 1, C]
        return mask.view(batch, 1, channels)


class ShardedSpatialDropout(_ShardedPixelDropout):
    """idx-flow ``SpatialDropout`` on a sharded field: a ``[B, N_r, 1]`` mask keyed by GLOBAL pixel.

    The keep/drop of pixel ``i`` (global index) of sample ``b`` is a hash of ``(seed, b, i)``, the
    seed group rank 0's draw: independent per pixel and the same at every P (Note [pixel dropout
    on shards]). Shape: ``[B, N_r, C] -> [B, N_r, C]``.
    """

    _kind = "SpatialDropout"

    def _mask(self, spec: DropoutSpec, batch: int, n_local: int, channels: int, device) -> Tensor:
        return keep_mask(spec, batch, 1, n_local, 1, device).view(batch, n_local, 1)


class ShardedDropout(_ShardedPixelDropout):
    """``nn.Dropout`` on a sharded field: an element mask keyed by (b, GLOBAL pixel, channel).

    The keep/drop of element ``(b, i, c)`` (``i`` the global pixel index) is a hash of
    ``(seed, b, i, c)``, the seed group rank 0's draw: independent per element and the same at
    every P, so a run on P ranks equals the run on one (Note [pixel dropout on shards]). Eval
    mode and ``p == 0`` return the input itself, as ``nn.Dropout`` does.

    Shapes:
        - ``[B, N_r, C] -> [B, N_r, C]``: a sharded field;
        - ``[B * N_r, C]`` rows inside a converted ``SpatialMLP`` / ``GlobalMLP``, whose forward
          sets :attr:`batch` (:func:`shard_mlp_internals`);
        - ``[B, C]`` otherwise: a REPLICATED vector (e.g. after ``Squeeze``), the same mask on
          every rank; the ranks' values must be bitwise equal (a CRC-32 is compared), so a 2-D
          shard of pixel rows fails instead of silently drawing correlated masks.

    Raises:
        ValueError: on every rank, for another shape, ranks disagreeing on B, C or dtype, or a
            2-D input (outside an MLP) that differs across ranks.
    """

    _kind = "Dropout"

    def __init__(self, module: nn.Module, process_group: Optional[dist.ProcessGroup] = None,
                 name: str = "") -> None:
        super().__init__(module, process_group, name)
        self.batch: Optional[int] = None  # B of the [B * N_r, C] rows an owning MLP feeds

    def _as_field(self, x: Any) -> tuple[Tensor, bool]:
        if self.batch is not None:
            if not isinstance(x, Tensor) or x.dim() != 2 or (self.batch and x.shape[0] % self.batch):
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"{self._what}: expected pixel rows [B * N_r, C] with B={self.batch}, "
                                 f"got {shape}")
            rows = x.shape[0] // self.batch if self.batch else 0
            return x.reshape(self.batch, rows, x.shape[1]), False
        if self._replicated(x):
            return x.unsqueeze(1), True
        if isinstance(x, Tensor) and x.dim() != 3:
            raise ValueError(
                f"{self._what}: expected a sharded field [B, N_r, C] or a replicated [B, C], got "
                f"shape {tuple(x.shape)}"
            )
        check_field(x, self._what)
        return x, False

    def _replicated(self, x: Any) -> bool:
        return self.batch is None and isinstance(x, Tensor) and x.dim() == 2 and x.is_floating_point()

    def _mask(self, spec: DropoutSpec, batch: int, n_local: int, channels: int, device) -> Tensor:
        return keep_mask(spec, batch, 1, n_local, channels, device).view(batch, n_local, channels)
