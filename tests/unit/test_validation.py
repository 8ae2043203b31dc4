"""Local input checks, the signature protocol at one rank, the exchange timeout and its errors.

Single process, no process group (the multi-rank behaviour is in
``tests/distributed/test_reliability.py``). Legend: B batch, H heads, N pixels, D head dim.
"""

from __future__ import annotations

import datetime
import math
import time

import pytest
import torch

from hpattn_dist import ring_attention
from hpattn_dist.comm import ExchangeError, get_exchange_timeout, set_exchange_timeout
from hpattn_dist.comm.agreement import SIGNATURE_WIDTH, agree_on_shapes, raise_on_every_rank, validated_signature
from hpattn_dist.comm.groups import GroupInfo, resolve_group
from hpattn_dist.comm.waits import wait_work
from hpattn_dist.comm.ring import PendingExchange
from hpattn_dist.strategies import sharded_attention
from hpattn_dist.masks import key_bias_from_mask
from hpattn_dist.validation import check_dropout_p, check_layer_input, check_qkv


def _qkv(b=2, h=3, n=5, d=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(b, h, n, d, generator=g, dtype=dtype) for _ in range(3))


# --------------------------------------------------------------------------------------------
# check_qkv, check_dropout_p, check_layer_input, key_bias_from_mask


@pytest.mark.parametrize(
    "mutate, error, fragment",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, "q must have shape [B, H, N_local, D], got (3, 5, 4)"),
        (lambda q, k, v: (q, k[:, :1], v), ValueError, "H (heads): q 3, k 1, v 3"),
        (lambda q, k, v: (q, k, v[..., :2]), ValueError, "D (head dim): q 4, k 4, v 2"),
        (lambda q, k, v: (q, k[:1], v[:, :, :2]), ValueError, "B (batch): q 2, k 1, v 2; N_local"),
        (lambda q, k, v: (q, k.float(), v), ValueError, "share a dtype, got torch.float64, torch.float32"),
        (lambda q, k, v: (q, k, torch.empty(v.shape, dtype=v.dtype, device="meta")), ValueError,
         "one device"),
        (lambda q, k, v: (q.long(), k, v), ValueError, "q must be a floating-point tensor of dtype float64, float32, float16 or bfloat16, got torch.int64"),
        (lambda q, k, v: (q, k, v.to(torch.complex128)), ValueError, "v must be a floating-point"),
        (lambda q, k, v: (q, k.bool(), v), ValueError, "k must be a floating-point"),
        (lambda q, k, v: (q.numpy(), k, v), TypeError, "q must be a torch.Tensor, got ndarray"),
    ],
)
def test_check_qkv_names_the_argument(mutate, error, fragment):
    with pytest.raises(error) as info:
        check_qkv(*mutate(*_qkv()), None)
    assert fragment in str(info.value)


@pytest.mark.parametrize("scale", [0.0, -1.0, math.inf, math.nan, True, "0.5"])
def test_check_qkv_rejects_bad_scale(scale):
    with pytest.raises(ValueError, match="scale must be a positive finite float or None"):
        check_qkv(*_qkv(), scale)


def test_check_qkv_accepts_good_input():
    check_qkv(*_qkv(), None)
    check_qkv(*_qkv(dtype=torch.bfloat16), 0.3)
    check_qkv(*_qkv(n=0), 2)  # an empty shard is valid


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, math.nan, math.inf, True, "0.1", None])
def test_check_dropout_p_rejects(p):
    with pytest.raises(ValueError, match=r"dropout_p must be a float in \[0, 1\)"):
        check_dropout_p(p)


@pytest.mark.parametrize("p", [0, 0.0, 0.5, 0.999])
def test_check_dropout_p_accepts(p):
    check_dropout_p(p)


def test_check_layer_input():
    x = torch.zeros(2, 5, 8)
    check_layer_input(x, 8)
    check_layer_input(x, 8, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"x must have shape \[B, N_local, embed_dim=16\], got \(2, 5, 8\)"):
        check_layer_input(x, 16)
    with pytest.raises(ValueError, match="x must have shape"):
        check_layer_input(x[0], 8)
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        check_layer_input(x.long(), 8)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        check_layer_input([[0.0]], 8)
    with pytest.raises(ValueError, match=r"key_mask must be a bool tensor of shape \[B, N_local\] = \(2, 5\)"):
        check_layer_input(x, 8, torch.ones(2, 5))
    with pytest.raises(ValueError, match="key_mask must be a bool tensor"):
        check_layer_input(x, 8, torch.ones(2, 4, dtype=torch.bool))


def test_key_bias_from_mask_errors():
    q = _qkv()[0]
    with pytest.raises(ValueError, match="key_mask must be a bool tensor"):
        key_bias_from_mask(q, torch.ones(2, 5), None)
    with pytest.raises(ValueError, match=r"key_mask must have shape \[B, N_local\] = \(2, 5\)"):
        key_bias_from_mask(q, torch.ones(2, 6, dtype=torch.bool), None)
    with pytest.raises(ValueError, match="key_bias must have shape"):
        key_bias_from_mask(q, None, torch.zeros(2, 3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="key_bias must be a floating-point tensor"):
        key_bias_from_mask(q, None, torch.zeros(2, 5, dtype=torch.long))


# --------------------------------------------------------------------------------------------
# The functional API and the factory in one process


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"dropout_p": 1.0}, "dropout_p"),
        ({"backend": "cudnn9000"}, "cudnn9000"),
        ({"scale": -2.0}, "scale"),
        ({"key_mask": torch.ones(2, 4, dtype=torch.bool)}, "key_mask"),
    ],
)
def test_ring_attention_single_process_errors(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        ring_attention(*_qkv(), **kwargs)


def test_group_without_torch_distributed():
    with pytest.raises(ValueError, match="group was given but torch.distributed is not initialised"):
        resolve_group(object())


def test_unknown_strategy():
    with pytest.raises(ValueError, match="strategy must be one of"):
        sharded_attention("no-such-strategy", *_qkv())


# --------------------------------------------------------------------------------------------
# validated_signature with one rank (no communication)

ONE = GroupInfo(None, 0, 1)


def test_validated_signature_one_rank_returns_local_values():
    with validated_signature(ONE, "f") as sig:
        sig.set({"B": 2, "H": 3}, 7)
    assert sig.per_rank == [7]
    with validated_signature(ONE, "f") as sig:
        sig.set({"B": 2}, (7, 5, 1))
    assert sig.per_rank == [(7, 5, 1)]
    assert agree_on_shapes(ONE, torch.device("cpu"), {"B": 1}, 4, "f") == [4]
    assert agree_on_shapes(ONE, torch.device("cpu"), {"B": 1}, (4, 2), "f") == [(4, 2)]


def test_validated_signature_one_rank_reraises_the_local_error_unchanged():
    err = ValueError("q must have shape ...")
    with pytest.raises(ValueError) as info:
        with validated_signature(ONE, "f"):
            raise err
    assert info.value is err
    with pytest.raises(ValueError) as info:
        raise_on_every_rank(ONE, "layer", err)
    assert info.value is err


def test_validated_signature_misuse():
    with pytest.raises(RuntimeError, match="without Signature.set"):
        with validated_signature(ONE, "f"):
            pass
    with pytest.raises(ValueError, match=f"at most {SIGNATURE_WIDTH - 4} values"):
        with validated_signature(ONE, "f") as sig:
            sig.set({f"x{i}": i for i in range(SIGNATURE_WIDTH)}, 1)
    with validated_signature(ONE, "f") as sig:
        with pytest.raises(RuntimeError, match="only known after"):
            sig.per_rank
        sig.set({}, 1)


# --------------------------------------------------------------------------------------------
# Exchange timeout and ExchangeError (fake work handles: the formatting and the clock)


class _Work:
    """A stand-in for a torch.distributed Work: completes, fails, or never completes."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour

    def is_completed(self) -> bool:
        return self.behaviour == "ok"

    def wait(self, timeout: datetime.timedelta = datetime.timedelta(0)) -> bool:
        if self.behaviour == "reset":
            raise RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer")
        if self.behaviour == "hang":
            time.sleep(timeout.total_seconds())
            raise RuntimeError("Timed out waiting 200ms for recv operation to complete")
        if self.behaviour == "false":
            time.sleep(timeout.total_seconds())
            return False
        return True


def test_set_exchange_timeout_validates_and_returns_previous():
    previous = set_exchange_timeout(3)
    try:
        assert get_exchange_timeout() == 3.0
        assert set_exchange_timeout(None) == 3.0
        assert get_exchange_timeout() is None
        for bad in (0, -1, math.inf, math.nan, "5", True):
            with pytest.raises(ValueError, match="seconds must be None or a positive finite number"):
                set_exchange_timeout(bad)
    finally:
        set_exchange_timeout(previous)


def test_wait_work():
    wait_work(_Work("ok"), None)
    wait_work(_Work("ok"), 0.1)
    with pytest.raises(TimeoutError):
        wait_work(_Work("false"), 0.05)
    with pytest.raises(TimeoutError, match="Timed out"):
        wait_work(_Work("hang"), 0.05)
    with pytest.raises(RuntimeError, match="Connection reset"):
        wait_work(_Work("reset"), 5.0)


def test_pending_exchange_names_the_dead_peer():
    info = GroupInfo(None, 2, 4)
    pending = PendingExchange([(_Work("ok"), "send to", 3, 3), (_Work("reset"), "receive from", 1, 1)],
                              "ring.forward", 1, info, timeout_s=5.0)
    with pytest.raises(ExchangeError) as caught:
        pending.wait()
    err = caught.value
    assert str(err).startswith("ring.forward step 1 on rank 2: receive from rank 1 failed after")
    assert "Connection reset by peer" in str(err) and "unusable" in str(err)
    assert (err.label, err.step, err.peer_group_rank, err.peer_global_rank, err.timed_out) == (
        "ring.forward", 1, 1, 1, False)
    assert isinstance(err, RuntimeError)


def test_pending_exchange_times_out_within_the_budget():
    pending = PendingExchange([(_Work("hang"), "send to", 0, 4), (_Work("hang"), "receive from", 2, 6)],
                              "ring.backward.dkv", 3, None, timeout_s=0.2)
    start = time.monotonic()
    with pytest.raises(ExchangeError) as caught:
        pending.wait()
    elapsed = time.monotonic() - start
    assert 0.15 <= elapsed < 1.0, elapsed  # the whole exchange shares one budget
    err = caught.value
    assert err.timed_out and err.peer_global_rank == 4 and err.peer_group_rank == 0
    assert "send to group rank 0 (global rank 4) did not complete within the exchange timeout of 0.2 s" in str(err)
    assert "set_exchange_timeout" in str(err)


# --------------------------------------------------------------------------------------------
# Edge numerics in one process (no ring): the kernels and the single-block path


@pytest.mark.parametrize("backend", ["manual", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_single_process_equal_scores_and_large_logits(backend, dtype):
    q, k, v = _qkv(n=9, dtype=dtype)
    out = ring_attention(torch.zeros_like(q), k, v, backend=backend)
    mean = v.double().mean(dim=2, keepdim=True).expand_as(out)
    assert (out.double() - mean).abs().max() <= 8 * torch.finfo(dtype).eps
    big = ring_attention(q * 100, k * 100, v, backend=backend)
    assert torch.isfinite(big).all()
    ref = torch.softmax((q.double() * 100) @ (k.double() * 100).transpose(-2, -1) / 2, dim=-1) @ v.double()
    if dtype == torch.float64:
        assert (big - ref).abs().max() <= 1e-12
