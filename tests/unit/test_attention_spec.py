"""One spec (issue 28): every public entry point hands each shared option (``AttentionOptions``) to
the one door, and ``AttentionSpec`` holds their one validation.

Each entry point runs one process with every option set away from its default (a kernel, dropout
with a seed, a scale, a key mask and a key bias) and must give the float64 reference of
``tests/reference.py`` computed from those options: a wrapper that dropped or renamed an option
would give another result. Legend: B batch, H heads, N pixels (nside 2), D head dim.
"""

from __future__ import annotations

import pytest
import torch

from hpattn_dist import (hybrid_attention, healpix_local_attention, ring_attention, ring_cross_attention,
                         ulysses_attention)
from hpattn_dist.attention_spec import AttentionSpec
from hpattn_dist.kernels import DropoutSpec
from hpattn_dist.local.oracle import window_mask
from hpattn_dist.strategies import auto_attention, sharded_attention
from hpattn_dist.strategies.api import attend
from tests.reference import reference_attention

B, H, N, D = 2, 2, 48, 4
P, SEED, SCALE = 0.25, 11, 0.3


def _inputs() -> tuple:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(B, N, generator=g, dtype=torch.float64)
    mask = torch.rand(B, N, generator=g) > 0.3
    return q, k, v, {"backend": "manual", "dropout_p": P, "scale": SCALE, "key_mask": mask, "key_bias": bias,
                     "dropout_seed": SEED}


def _expected(q, k, v, options: dict, allowed=None):
    bias = options["key_bias"].masked_fill(~options["key_mask"], float("-inf"))
    return reference_attention(q, k, v, scale=SCALE, key_bias=bias, dropout=DropoutSpec(P, SEED), allowed=allowed)


GLOBAL = {
    "ring_attention": lambda q, k, v, o: ring_attention(q, k, v, **o),
    "ulysses_attention": lambda q, k, v, o: ulysses_attention(q, k, v, **o),
    "hybrid_attention": lambda q, k, v, o: hybrid_attention(q, k, v, ulysses_group=None, ring_group=None, **o),
    "auto_attention": lambda q, k, v, o: auto_attention(q, k, v, **o),
    "ring_cross_attention": lambda q, k, v, o: ring_cross_attention(q, k, v, **o),
    "sharded_attention": lambda q, k, v, o: sharded_attention("hybrid", q, k, v, ulysses_degree=1, **o),
    "attend": lambda q, k, v, o: attend(
        AttentionSpec("ring", o["backend"], o["dropout_p"], o["scale"], o["dropout_seed"]), q, k, v,
        key_mask=o["key_mask"], key_bias=o["key_bias"]),
}

WINDOWED = {
    "healpix_local_attention": lambda q, k, v, o: healpix_local_attention(q, k, v, window_nside=1, mode="cell", **o),
    "ring_cross_attention": lambda q, k, v, o: ring_cross_attention(q, k, v, window_nside=1, mode="cell", **o),
    "sharded_attention": lambda q, k, v, o: sharded_attention("auto", q, k, v, window_nside=1, mode="cell", **o),
}


@pytest.mark.parametrize("entry", sorted(GLOBAL))
def test_every_entry_point_hands_every_option_to_the_door(entry):
    q, k, v, options = _inputs()
    torch.testing.assert_close(GLOBAL[entry](q, k, v, options), _expected(q, k, v, options), rtol=0, atol=1e-12)


@pytest.mark.parametrize("entry", sorted(WINDOWED))
def test_every_windowed_entry_point_hands_every_option_to_the_door(entry):
    q, k, v, options = _inputs()
    allowed = window_mask(2, 1, "cell")
    torch.testing.assert_close(WINDOWED[entry](q, k, v, options), _expected(q, k, v, options, allowed),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("entry", ["ring_attention", "ulysses_attention", "auto_attention", "ring_cross_attention",
                                   "healpix_local_attention"])
def test_an_unknown_keyword_names_the_entry_point(entry):
    q, k, v, _ = _inputs()
    call = {**GLOBAL, **WINDOWED}[entry]
    with pytest.raises(TypeError, match=rf"{entry}\(\) got an unexpected keyword argument 'dropout'"):
        call(q, k, v, {"dropout": 0.1})


@pytest.mark.parametrize("own", [{"window_nside": 1}, {"cross": True}, {"mode": "cell"}])
def test_auto_attention_takes_the_options_of_ring_attention_only(own):
    """``auto_attention`` has ring_attention's arguments: a door field of ``sharded_attention``
    (a window, which would run local attention instead of the global one) is an unknown keyword."""
    q, k, v, _ = _inputs()
    with pytest.raises(TypeError, match=rf"auto_attention\(\) got an unexpected keyword argument '{next(iter(own))}'"):
        auto_attention(q, k, v, **own)


@pytest.mark.parametrize("field, value, message", [
    ("strategy", "rign", "strategy must be one of"),
    ("ulysses_degree", 2, "ulysses_degree is only used by strategy='hybrid'"),
    ("backend", "fast", "backend must be one of"),
    ("dropout_p", 1.0, r"dropout_p must be a float in \[0, 1\)"),
    ("dropout_seed", -1, r"dropout_seed must be an int in \[0, 2\*\*31\)"),
    ("window_nside", 3, "window_nside: nside must be a power of two"),
    ("mode", "ring", "mode must be one of"),
])
def test_check_refuses_each_bad_option(field, value, message):
    spec = AttentionSpec(**{"window_nside": 2, field: value})
    with pytest.raises(ValueError, match=message):
        spec.check("ring_attention")


def test_check_refuses_a_window_with_a_head_parallel_strategy_naming_the_entry_point():
    with pytest.raises(ValueError, match="ring_cross_attention: window_nside=2 .* strategy must be 'ring' or 'auto'"):
        AttentionSpec("ulysses", window_nside=2).check("ring_cross_attention")
    with pytest.raises(ValueError, match="needs strategy 'ring' or 'auto' and healpix_field=True"):
        AttentionSpec("ulysses", window_nside=2).check_layer("DistributedSpatialCrossAttention")


def test_check_returns_the_window_as_an_int():
    import numpy as np

    spec = AttentionSpec("ring", window_nside=np.int64(4)).check("healpix_local_attention")
    assert type(spec.window_nside) is int and spec.window_nside == 4
    assert AttentionSpec().check("ring_attention") == AttentionSpec()  # the defaults are valid


@pytest.mark.parametrize("entry, call", [(f"{table}:{name}", fn) for table, calls in (("global", GLOBAL), ("windowed", WINDOWED))
                                         for name, fn in sorted(calls.items())])
def test_a_second_derivative_is_refused_naming_the_entry_point_the_call_stands_for(entry, call):
    """The name in the refusal is the public function the call stands for
    (``AttentionSpec.entry_point``): the strategy's (``sharded_attention("hybrid", ...)`` is
    ``hybrid_attention``), ``ring_cross_attention`` for a cross call, ``healpix_local_attention`` for
    a windowed self call (``sharded_attention`` with a window)."""
    table, name = entry.split(":")
    expected = {"attend": "ring_attention", "sharded_attention": "hybrid_attention" if table == "global"
                else "healpix_local_attention"}.get(name, name)
    q, k, v, options = _inputs()
    q.requires_grad_(True)
    options = {**options, "dropout_p": 0.0, "key_mask": None, "key_bias": None}
    (dq,) = torch.autograd.grad((call(q, k, v, options) ** 2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match=f"{expected} does not support double backward"):
        dq.sum().backward()
