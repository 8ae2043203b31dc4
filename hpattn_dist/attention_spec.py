"""The options every attention call shares: described once, held in one frozen object, checked once.

Every public function (:func:`~hpattn_dist.strategies.ring_attention`,
:func:`~hpattn_dist.strategies.ulysses_attention`, :func:`~hpattn_dist.strategies.hybrid_attention`,
:func:`~hpattn_dist.strategies.ring_cross_attention`, :func:`~hpattn_dist.strategies.sharded_attention`,
:func:`~hpattn_dist.local.healpix_local_attention`, ...) takes the keyword arguments of
:class:`AttentionOptions` and turns them, with the options that are its own (a strategy, a window,
``cross``), into an :class:`AttentionSpec`. The doors check a spec inside their ONE agreement
(:meth:`AttentionSpec.check`, so that a rank with a bad option makes every rank raise, Note [fail
together]); a distributed layer checks its spec when it is built (:meth:`AttentionSpec.check_layer`).

Legend: B batch, H heads, D head dim, P ranks in the group, N_r pixels on rank r (Nq_r / Nk_r the
queries / keys on rank r across two grids).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, TypedDict

from torch import Tensor

from hpattn_dist.healpix import check_nside
from hpattn_dist.kernels import check_backend_name, check_dropout_seed
from hpattn_dist.validation import check_dropout_p

__all__ = ["ENTRY_POINTS", "STRATEGIES", "WINDOW_MODES", "AttentionOptions", "AttentionSpec", "check_option_names",
           "check_strategy_args", "check_strategy_name", "check_ulysses_degree", "check_window"]

STRATEGIES: tuple[str, ...] = ("ring", "ulysses", "hybrid", "auto")
"""The strategy names :func:`~hpattn_dist.strategies.sharded_attention` and the layers accept."""

ENTRY_POINTS: tuple[str, ...] = ("ring_attention", "ring_cross_attention", "ulysses_attention", "hybrid_attention",
                                 "auto_attention", "healpix_local_attention")
"""The public functions a call's errors name (:attr:`AttentionSpec.entry_point`)."""

WINDOW_MODES: tuple[str, ...] = ("cell", "neighbourhood")
"""The windows of local attention (:mod:`hpattn_dist.local.windows`)."""


class AttentionOptions(TypedDict, total=False):
    """The keyword arguments every attention function takes (``**options``), all optional.

    Attributes:
        backend: block kernel, ``"auto" | "sdpa" | "manual" | "flash_attn"`` (see
            :mod:`hpattn_dist.kernels.dispatch`). Default ``"auto"``.
        dropout_p: attention-weight dropout probability in ``[0, 1)``; weights are normalised
            first, then dropped, keyed by the global (query, key) pixels (Note [position-keyed
            dropout]: the mask does not depend on P). Default 0.
        scale: score scale, default ``D ** -0.5``.
        key_mask: optional bool ``[B, Nk_r]`` (``[B, N_r]`` for self-attention), True = this key
            may be attended to. A query with no unmasked key it may see gets a zero output and
            zero gradients (PyTorch's SDPA returns NaN there).
        key_bias: optional float ``[B, Nk_r]`` or ``[B, H, Nk_r]`` added to every score of that
            key (for instance the log of a source pixel's area, a quadrature weight); differentiable.
        dropout_seed: seed of the dropout mask, an int in ``[0, 2**31)``; None draws one from
            PyTorch's default generator. Either way group rank 0's value is used on every rank, so
            all ranks drop alike.
    """

    backend: str
    dropout_p: float
    scale: Optional[float]
    key_mask: Optional[Tensor]
    key_bias: Optional[Tensor]
    dropout_seed: Optional[int]


_DATA = ("key_mask", "key_bias")  # options that are per-call data, not part of the spec


def check_option_names(what: str, options: dict) -> None:
    """Raise ``TypeError`` naming ``what`` for a keyword in ``options`` that is none of
    :class:`AttentionOptions`' (as Python's own error for an unknown keyword argument)."""
    for name in options:
        if name not in AttentionOptions.__annotations__:
            raise TypeError(f"{what}() got an unexpected keyword argument {name!r}")


def check_window(window_nside: int, mode: str) -> int:
    """Validate the window arguments (not yet against a field's nside).

    Raises:
        ValueError: ``window_nside`` not a positive power of two, or ``mode`` not in
            :data:`WINDOW_MODES`.
    """
    if mode not in WINDOW_MODES:
        raise ValueError(f"mode must be one of {WINDOW_MODES}, got {mode!r}")
    try:
        return check_nside(window_nside)
    except ValueError as err:
        raise ValueError(f"window_nside: {err}") from None


def check_strategy_name(strategy: str) -> None:
    """Raise ``ValueError`` unless ``strategy`` is one of :data:`STRATEGIES`."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")


def check_ulysses_degree(ulysses_degree: Optional[int]) -> None:
    """Raise ``ValueError`` unless ``ulysses_degree`` is None or a positive int."""
    if ulysses_degree is not None and (
            not isinstance(ulysses_degree, int) or isinstance(ulysses_degree, bool) or ulysses_degree < 1):
        raise ValueError(f"ulysses_degree must be a positive int, got {ulysses_degree!r}")


def check_strategy_args(strategy: str, ulysses_degree: Optional[int]) -> None:
    """A layer's (or a converter's) ``strategy`` and ``ulysses_degree``, checked when it is built: a
    known strategy, and a positive int ``ulysses_degree`` exactly when the strategy is ``"hybrid"``."""
    AttentionSpec(strategy, ulysses_degree=ulysses_degree).check_strategy()
    if strategy == "hybrid" and ulysses_degree is None:
        raise ValueError("strategy='hybrid' needs ulysses_degree=U (a divisor of P and H)")
    check_ulysses_degree(ulysses_degree)


@dataclass(frozen=True)
class AttentionSpec:
    """The static options of one attention call, the same fields for every entry point.

    Built by an entry point from its arguments (:meth:`from_options`), checked by the door inside
    its one agreement (:meth:`check`) and read by the plan. The key mask and bias are data, not
    options: they travel beside the spec.

    Attributes:
        strategy: one of :data:`STRATEGIES` (Note [one agreement per call]).
        backend, dropout_p, scale, dropout_seed: as in :class:`AttentionOptions`.
        ulysses_degree: U for ``"hybrid"`` over one group (a divisor of P and H), None otherwise.
        cross: queries and keys on two grids sharded independently (Note [cross-grid plan]).
        window_nside: None, or the window grid of local attention (a power of two): the halo path
            of Note [local attention plan], for strategies ``"ring"`` and ``"auto"`` only.
        mode: the window, ``"cell"`` or ``"neighbourhood"`` (:mod:`hpattn_dist.local.windows`);
            read with ``window_nside`` only.
    """

    strategy: str = "auto"
    backend: str = "auto"
    dropout_p: float = 0.0
    scale: Optional[float] = None
    dropout_seed: Optional[int] = None
    ulysses_degree: Optional[int] = None
    cross: bool = False
    window_nside: Optional[int] = None
    mode: str = "neighbourhood"

    @classmethod
    def from_options(cls, what: str, options: dict, **own: object) -> tuple["AttentionSpec", Optional[Tensor],
                                                                            Optional[Tensor]]:
        """``(spec, key_mask, key_bias)`` from an entry point's ``**options`` and its own fields.

        Raises:
            TypeError: :func:`check_option_names`.
        """
        check_option_names(what, options)
        fields = {name: value for name, value in options.items() if name not in _DATA}
        return cls(**own, **fields), options.get("key_mask"), options.get("key_bias")

    @property
    def entry_point(self) -> str:
        """The public function a call with these options stands for, named in its errors (a layer's
        call names the layer instead): one of :data:`ENTRY_POINTS`."""
        if self.window_nside is not None:
            return "ring_cross_attention" if self.cross else "healpix_local_attention"
        if self.cross and self.strategy == "ring":
            return "ring_cross_attention"
        return {"ring": "ring_attention", "ulysses": "ulysses_attention", "hybrid": "hybrid_attention"}.get(
            self.strategy, "auto_attention")

    def scale_for(self, head_dim: int) -> float:
        """The score scale of a call whose head dim is ``head_dim``: ``scale``, else ``D ** -0.5``.
        D = 0 gets 1.0, so that no rank raises before the call's agreement (a peer would wait in
        it): :func:`~hpattn_dist.validation.check_qkv` refuses D = 0 there, on every rank."""
        if self.scale is not None:
            return float(self.scale)
        return head_dim ** -0.5 if head_dim > 0 else 1.0

    def check_strategy(self) -> None:
        """The strategy's name, and ``ulysses_degree`` given for ``"hybrid"`` only: what the door
        routes by, so it raises before any exchange."""
        check_strategy_name(self.strategy)
        if self.ulysses_degree is not None and self.strategy != "hybrid":
            raise ValueError(f"ulysses_degree is only used by strategy='hybrid', got strategy={self.strategy!r}")

    def check(self, what: str) -> "AttentionSpec":
        """Every option, checked where the door runs its local checks (inside its agreement, so that
        ranks fail together). Returns the spec with ``window_nside`` as an ``int``.

        Raises:
            ValueError: an unknown strategy, a bad ``ulysses_degree``, ``dropout_p``, ``backend``,
                ``dropout_seed``, window or mode; a window with a head-parallel strategy (naming
                ``what``, the entry point).
        """
        self.check_strategy()
        check_ulysses_degree(self.ulysses_degree)
        check_dropout_p(self.dropout_p)
        check_backend_name(self.backend)
        check_dropout_seed(self.dropout_seed)
        return self._checked_window(what)

    def check_layer(self, what: str, healpix_field: bool = True) -> "AttentionSpec":
        """A distributed layer's options, checked when it is built (every rank builds its layer
        alike, before any exchange): as :meth:`check` for the strategy (``ulysses_degree`` required
        for ``"hybrid"``), the backend (named ``attn_backend``) and the window, which needs HEALPix
        grids (``healpix_field``)."""
        check_strategy_args(self.strategy, self.ulysses_degree)
        if self.window_nside is not None and (self.strategy not in ("ring", "auto") or not healpix_field):
            raise ValueError(
                f"window_nside={self.window_nside!r} runs the halo exchange over two NESTED HEALPix grids: it "
                f"needs strategy 'ring' or 'auto' and healpix_field=True, got strategy={self.strategy!r}, "
                f"healpix_field={healpix_field!r}")
        check_backend_name(self.backend, "attn_backend")
        return self._checked_window(what)

    def _checked_window(self, what: str) -> "AttentionSpec":
        if self.window_nside is None:
            return self
        if self.strategy not in ("ring", "auto"):
            raise ValueError(f"{what}: window_nside={self.window_nside!r} runs the halo exchange of local "
                             f"attention, which has no head-parallel form; strategy must be 'ring' or "
                             f"'auto', got {self.strategy!r}")
        return replace(self, window_nside=check_window(self.window_nside, self.mode))
