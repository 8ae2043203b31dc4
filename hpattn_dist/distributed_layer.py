"""What the distributed attention layers (self and cross-grid) share beside their oracle's attributes:
their keyword options (:class:`LayerOptions`), checked and kept as attributes."""

from __future__ import annotations

from typing import Any, Optional, TypedDict

import torch.distributed as dist

from hpattn_dist.attention_spec import AttentionSpec
from hpattn_dist.comm.binding import GroupBound

__all__ = ["DistributedAttentionLayer", "LayerOptions"]


class LayerOptions(TypedDict, total=False):
    """The keyword options every distributed attention layer takes (``**options``), all optional;
    each layer's docstring describes them (``Args``).

    Attributes:
        process_group: the group sharding the pixels. Default None (the default group).
        strategy: ``"ring" | "ulysses" | "hybrid" | "auto"``. Default ``"auto"``.
        ulysses_degree: the Ulysses sub-group size of ``"hybrid"``. Default None.
        healpix_field: the shards form a HEALPix field. Default True.
        name: names the layer in errors. Default ``""``.
    """

    process_group: Optional[dist.ProcessGroup]
    strategy: str
    ulysses_degree: Optional[int]
    healpix_field: bool
    name: str


_DEFAULTS: dict[str, Any] = {"process_group": None, "strategy": "auto", "ulysses_degree": None,
                             "healpix_field": True, "name": ""}


class DistributedAttentionLayer(GroupBound):
    """Mixin of a distributed attention layer, listed before its oracle class: the options its calls
    read, checked before the oracle is built and kept as attributes (deepcopy shares the group,
    pickling drops it: :class:`~hpattn_dist.comm.binding.GroupBound`)."""

    # The probability that makes a converted model's call ask for a dropout seed (Note [attention
    # plans in a model call] in strategies/plan.py).
    _hp_drop_attr = "dropout_p"

    @staticmethod
    def oracle_backend(attn_backend: str) -> str:
        """The oracle constructor's backend: it checks its own names (auto|sdpa|manual) and never
        runs the kernel, so ``"flash_attn"`` (a kernel name) is ``"auto"`` there."""
        return "auto" if attn_backend == "flash_attn" else attn_backend

    def _checked_options(self, attn_backend: str, options: dict[str, Any], **spec: Any) -> dict[str, Any]:
        """``options`` with the defaults filled in, after :meth:`AttentionSpec.check_layer
        <hpattn_dist.attention_spec.AttentionSpec.check_layer>` (``spec``: the layer's other spec
        fields); an unknown keyword raises ``TypeError`` as Python's own error would."""
        for key in options:
            if key not in _DEFAULTS:
                raise TypeError(f"{type(self).__name__}.__init__() got an unexpected keyword argument {key!r}")
        full = {**_DEFAULTS, **options}
        AttentionSpec(full["strategy"], attn_backend, ulysses_degree=full["ulysses_degree"], **spec).check_layer(
            type(self).__name__, full["healpix_field"])
        return full

    def _keep_options(self, attn_backend: str, options: dict[str, Any]) -> None:
        """Keep :meth:`_checked_options`' result and ``attn_backend`` as attributes (after the oracle's
        ``__init__``)."""
        self.attn_backend = attn_backend
        for key, value in options.items():
            setattr(self, key, value)
        self.healpix_field = bool(self.healpix_field)
