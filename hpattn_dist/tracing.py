"""Code that ``torch.compile`` must run, never trace, without importing ``torch._dynamo``.

``torch.compiler.disable`` imports ``torch._dynamo`` when it decorates, and that import binds
the default process group into ``torch.distributed.nn``'s defaults when it happens after init
(Note [clean exit] in :mod:`hpattn_dist.shutdown`); it also adds seconds to every process that
imports this library. :func:`not_traced` makes the disabled function on its first call instead.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

__all__ = ["not_traced"]

F = TypeVar("F", bound=Callable)


def not_traced(fn: F) -> F:
    """``torch.compiler.disable(fn)``, built when ``fn`` is first called: a compiled caller runs
    ``fn`` eagerly each time, reading its state when the call runs."""
    disabled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return call  # type: ignore[return-value]
