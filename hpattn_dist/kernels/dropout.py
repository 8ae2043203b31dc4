"""Counter-based attention dropout whose mask depends only on global coordinates.

Note [position-keyed dropout]
    ``nn.Dropout`` draws its mask from a stateful generator in the order the scores happen to be
    laid out, so a sharded computation could never reproduce it, and a backward pass would have to
    store an ``N x N`` mask. Instead the keep/drop decision for score ``(b, h, i, j)`` is a hash of
    ``(seed, b, h, i, j)`` with ``i`` and ``j`` GLOBAL query and key pixel indices and ``h`` the
    global head index. Consequences:

    * the backward pass regenerates exactly the forward mask from the saved seed (no mask stored);
    * the result does not depend on the number of ranks, the strategy or the block order, so a run
      with dropout at P=4 equals the same run at P=1 (and the float64 test reference, which
      implements the definition below on its own, on the full matrix);
    * the seed is drawn from PyTorch's default generator (or passed as ``dropout_seed``), so
      ``torch.manual_seed`` makes runs reproducible; the strategies use group rank 0's seed on
      every rank, so ranks whose generators differ still drop consistently.

Note [seed outside the op]
    A registered attention op (``hpattn::attention_fwd``) never draws from a generator: its seed
    is an INPUT, an int64 CPU tensor drawn just before the call (:func:`seed_input`). A
    selective-checkpoint policy that saves the op's outputs (``checkpoint_context_fn``) recomputes
    the block without running the op, but it does rerun the draw, a plain operator: with
    ``preserve_rng_state=True`` the recomputation then consumes the generator exactly as the first
    forward did, and every later random op of the block (an ``nn.Dropout`` in the feed-forward)
    draws the same mask. A draw inside the op would be skipped by the recomputation and shift
    every later mask. The op's saved plan carries the agreed seed, so the attention's own mask is
    the forward's whatever the recomputed draw returns. Under ``torch.compile`` the draw is a node
    of the graph (inductor lowers it with its own generator, as it does every random op).

    The definition, in unsigned 32-bit arithmetic (every product taken mod 2^32)::

        mix(x):  x ^= x >> 16;  x *= 0x7FEB352D;  x ^= x >> 15;  x *= 0x846CA68B;  x ^= x >> 16
        x = mix(seed)               # seed in [0, 2^31)
        x = mix(x ^ b)              # batch element
        x = mix(x ^ h)              # global head
        x = mix(x ^ i)              # global query pixel
        x = mix(x ^ j)              # global key pixel
        keep(b, h, i, j)  <=>  x >= floor(p * 2^32)

    ``mix`` is Wellons' ``lowbias32`` finaliser, a bijection of the 32-bit integers. Each
    coordinate enters through its own mixing round, the seed included: an earlier version added
    the seed to ``b`` before the first round, so (seed s, batch b) had the mask of (s + 1, b - 1)
    and a step counter used as ``dropout_seed`` repeated masks across steps. Keep probability is
    ``1 - p`` up to 2^-32. Computed in int64 tensors masked to 32 bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF


def _mix32(x: "Tensor | int") -> "Tensor | int":
    """``lowbias32`` finaliser on int64 tensors holding 32-bit values, or on a Python int (the
    seed's round runs on the host: no scalar is copied to the device, Note [agreement off the
    device] in ``comm/agreement.py``)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


@dataclass(frozen=True)
class DropoutSpec:
    """Where a block of scores sits in the global attention matrix, and how to drop from it.

    Attributes:
        p: drop probability in ``(0, 1)``.
        seed: 31-bit seed shared by forward and backward.
        q_offset: global pixel index of the block's first query.
        k_offset: global pixel index of the block's first key.
        h_offset: global index of the block's first head (non-zero under head parallelism).
        k_index: optional int64 ``[N_k]`` global pixel index of each key, for key blocks that are
            not contiguous (masked keys removed); overrides ``k_offset``.
        folded: the block folds window cells into its batch dim (:class:`FoldedIndex`); then
            ``q_offset``, ``k_offset`` and ``k_index`` are unused.
    """

    p: float
    seed: int
    q_offset: int = 0
    k_offset: int = 0
    h_offset: int = 0
    k_index: Optional[Tensor] = None
    folded: Optional["FoldedIndex"] = None

    def shifted(self, *, q: int = 0, h: int = 0) -> "DropoutSpec":
        """The spec of a sub-block starting ``q`` queries and ``h`` heads further on."""
        folded = self.folded
        if folded is not None and q:
            folded = FoldedIndex(folded.heads, folded.q_index[..., q:], folded.k_index)
        return DropoutSpec(
            self.p, self.seed, self.q_offset + q, self.k_offset, self.h_offset + h, self.k_index, folded
        )


@dataclass(frozen=True)
class FoldedIndex:
    """Global coordinates of a score block ``[X * B * H, Y, N_q, N_k]`` whose two batch dims fold
    in independent windows (local attention, Note [local attention plan]): batch row
    ``(x * B + b) * H + h`` holds batch element b and head h (plus the spec's ``h_offset``), and
    window ``(x, y)`` has its own queries and keys.

    Attributes:
        heads: H.
        q_index: int64 ``[X, Y, N_q]``, the global query pixel of each score row.
        k_index: int64 ``[X, Y, N_k]``, the global key pixel of each score column.
    """

    heads: int
    q_index: Tensor
    k_index: Tensor


def keep_mask(spec: DropoutSpec, batch: int, heads: int, n_q: int, n_k: int, device) -> Tensor:
    """Bool keep-mask ``[B, H, N_q, N_k]`` of the score block described by ``spec`` (for a
    ``spec.folded`` block: ``[X * B * H, Y, N_q, N_k]``, with ``batch = X * B * H`` and ``heads = Y``,
    or the same with its batch dims merged)."""
    if spec.folded is not None:
        return _folded_keep_mask(spec, batch, heads, n_q, n_k, device)
    # Views, not indexing: the same ops on every device, fake CUDA tensors of a CPU build included.
    b = torch.arange(batch, device=device, dtype=torch.int64).view(batch, 1, 1, 1)
    h = torch.arange(spec.h_offset, spec.h_offset + heads, device=device, dtype=torch.int64)
    i = torch.arange(spec.q_offset, spec.q_offset + n_q, device=device, dtype=torch.int64)
    if spec.k_index is None:
        j = torch.arange(spec.k_offset, spec.k_offset + n_k, device=device, dtype=torch.int64)
    else:
        if spec.k_index.shape != (n_k,):
            raise ValueError(f"k_index has shape {tuple(spec.k_index.shape)}, expected ({n_k},)")
        j = spec.k_index.to(device=device, dtype=torch.int64)
    x = _mix32(b ^ _mix32(spec.seed & _MASK32))
    x = _mix32(x ^ h.view(1, heads, 1, 1))
    x = _mix32(x ^ i.view(1, 1, n_q, 1))
    x = _mix32(x ^ j.view(1, 1, 1, n_k))
    threshold = int(spec.p * 2**32)
    return x >= threshold


def _folded_keep_mask(spec: DropoutSpec, rows: int, heads: int, n_q: int, n_k: int, device) -> Tensor:
    """The keep-mask of a :class:`FoldedIndex` block, ``[X * B * H, Y, N_q, N_k]`` (or that block
    with its batch dims merged, ``[X * B * H * Y, 1, N_q, N_k]``): the same hash as
    :func:`keep_mask`, with each window's own query and key pixels."""
    folded = spec.folded
    i = folded.q_index[..., :n_q].to(device=device, dtype=torch.int64)  # [X, Y, N_q]
    j = folded.k_index.to(device=device, dtype=torch.int64)  # [X, Y, N_k]
    windows, y = i.shape[0], i.shape[1]
    if j.shape != (windows, y, n_k) or (rows * heads) % (windows * y * folded.heads):
        raise ValueError(f"a folded block [{rows}, {heads}, {n_q}, {n_k}] does not fit query index "
                         f"{tuple(i.shape)}, key index {tuple(j.shape)}, {folded.heads} heads")
    bh = torch.arange(rows * heads // (windows * y), device=device, dtype=torch.int64)  # [B * H]
    x = _mix32(_mix32((bh // folded.heads) ^ _mix32(spec.seed & _MASK32)) ^ (bh % folded.heads + spec.h_offset))
    x = _mix32(x.view(1, -1, 1, 1) ^ i.unsqueeze(1))  # [X, B * H, Y, N_q]
    x = _mix32(x.unsqueeze(-1) ^ j.view(windows, 1, y, 1, n_k))  # [X, B * H, Y, N_q, N_k]
    return (x >= int(spec.p * 2**32)).view(rows, heads, n_q, n_k)


def draw_seed() -> int:
    """A fresh 31-bit seed from PyTorch's default CPU generator."""
    return int(draw_seed_tensor().item())


def draw_seed_tensor() -> Tensor:
    """:func:`draw_seed` as an int64 CPU tensor ``[1]``: the same draw, without reading it."""
    return torch.randint(0, 2**31 - 1, (1,))


def seed_input(dropout_p: float, seed: "int | None") -> Optional[Tensor]:
    """The seed this rank proposes to a registered attention op, as an int64 CPU tensor ``[1]``
    (None without dropout and without a given ``seed``): drawn HERE, before the op, so that it is
    an input of the op (Note [seed outside the op])."""
    if seed is not None:
        return torch.tensor([seed], dtype=torch.int64)
    return draw_seed_tensor() if dropout_p > 0 else None


def resolve_dropout_seed(dropout_p: float, seed: "int | None") -> int:
    """The seed a call will propose: ``seed`` if given (checked), a fresh draw if ``dropout_p > 0``,
    else 0. Strategies then take group rank 0's proposal (Note [position-keyed dropout]).
    """
    if seed is not None:
        check_dropout_seed(seed)
        return seed
    return draw_seed() if dropout_p > 0 else 0


def check_dropout_seed(seed: "int | None") -> None:
    """Raise ``ValueError`` unless ``seed`` is None or an int in ``[0, 2**31)``."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31):
        raise ValueError(f"dropout_seed must be an int in [0, 2**31), got {seed!r}")
