"""Every CUDA op call of the block kernels, replayed on a CPU build under ``FakeTensorMode``.

The fused CUDA ops run on fake ``device="cuda"`` tensors (their meta kernels check shapes); a
``TorchDispatchMode`` recorder binds each call's arguments to the op's schema (torch 2.13) and
checks them against what the CUDA sources require (Note [fused op arguments] in
``kernels/sdpa.py``). The requirements below are written from those sources, not from our
wrappers. The flash_attn wrappers run against stand-in ``flash_attn`` modules with the 2.6.0 and
2.7+ backward signatures (the latter a ``torch.library`` custom op, as in the package).
The autograd engine cannot run on fake CUDA tensors, so the block kernels are called directly.

Legend: B batch, H heads, N_q queries, N_k keys, D head dim.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from typing import Any, Optional

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from hpattn_dist.kernels import dispatch, sdpa
from hpattn_dist.kernels import flash_attn as fa

B, H, NQ, NK, D = 2, 3, 17, 13, 16
SCALE = 0.3
_aten = torch.ops.aten
FLASH_OPS = (_aten._scaled_dot_product_flash_attention.default,
             _aten._scaled_dot_product_flash_attention_backward.default)
EFFICIENT_OPS = (_aten._scaled_dot_product_efficient_attention.default,
                 _aten._scaled_dot_product_efficient_attention_backward.default)
# Element types the CUDA kernels are compiled for (flash_api.cpp; mem-efficient DISPATCH_TYPES).
OP_DTYPES = {**{op: (torch.float16, torch.bfloat16) for op in FLASH_OPS},
             **{op: (torch.float16, torch.bfloat16, torch.float32) for op in EFFICIENT_OPS}}


def _bind(op, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by schema name, defaults filled in; type-checked against the schema."""
    bound: dict[str, Any] = {}
    positional = list(args)
    for arg in op._schema.arguments:
        if positional and not arg.kwarg_only:
            bound[arg.name] = positional.pop(0)
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        else:
            assert arg.has_default_value(), f"{op}: argument {arg.name} missing"
            bound[arg.name] = arg.default_value
        _check_type(op, arg, bound[arg.name])
    assert not positional, f"{op}: {len(positional)} extra positional arguments"
    assert set(kwargs) <= set(bound), f"{op}: unknown keywords {set(kwargs) - set(bound)}"
    return bound


def _check_type(op, arg, value) -> None:
    kind = str(arg.type)
    optional = kind.startswith("Optional[")
    base = kind[len("Optional["):-1] if optional else kind
    if value is None:  # None is an undefined Tensor for a plain Tensor argument
        assert optional or base == "Tensor", f"{op}: {arg.name} ({kind}) got None"
        return
    ok = {"Tensor": lambda v: isinstance(v, torch.Tensor),
          "float": lambda v: isinstance(v, (float, int)) and not isinstance(v, bool),
          "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "bool": lambda v: isinstance(v, bool),
          "List[bool]": lambda v: (isinstance(v, (list, tuple)) and len(v) == arg.N
                                   and all(isinstance(x, bool) for x in v))}[base]
    assert ok(value), f"{op}: {arg.name} ({kind}) got {value!r}"


class OpRecorder(TorchDispatchMode):
    """Records ``(op, bound arguments)`` of the fused attention ops that pass through it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, dict[str, Any]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in OP_DTYPES:
            self.calls.append((func, _bind(func, args, kwargs)))
        return func(*args, **kwargs)

    def only(self, op) -> dict[str, Any]:
        found = [a for f, a in self.calls if f == op]
        assert len(found) == 1, f"{op}: {len(found)} calls"
        return found[0]


def _fake_qkv(dtype: torch.dtype, d: int = D):
    q = torch.randn(B, H, NQ, d, device="cuda", dtype=dtype)
    k = torch.randn(B, H, NK, d, device="cuda", dtype=dtype)
    v = torch.randn(B, H, NK, d, device="cuda", dtype=dtype)
    dout = torch.randn(B, H, NQ, d, device="cuda", dtype=dtype)
    return q, k, v, dout


def _check_inputs(op, a: dict[str, Any], names: tuple[str, ...], dtype: torch.dtype) -> None:
    assert dtype in OP_DTYPES[op], f"{op} has no {dtype} kernel"
    for name in names:
        t = a[name]
        assert t.device.type == "cuda" and t.dtype == dtype, (name, t.device, t.dtype)
        assert t.stride(-1) == 1, f"{name}: last stride {t.stride(-1)}"
        assert t.storage_offset() * t.element_size() % 16 == 0, f"{name}: misaligned storage"
    assert a["dropout_p"] == 0.0 and a["is_causal"] is False
    assert a["scale"] == SCALE


def _check_lse(lse: torch.Tensor, rows: int) -> None:
    assert lse.dtype == torch.float32 and lse.shape == (B, H, rows) and lse.is_contiguous(), \
        (lse.dtype, tuple(lse.shape), lse.stride())


def _run_block(kernel_name: str, dtype: torch.dtype, capability=(8, 0)):
    """Forward and backward of one block through the BlockKernel, as the ring calls them.

    ``out`` and ``lse`` handed to the backward are fresh row-major tensors (the ring's merged
    results), not the forward op's own outputs.
    """
    with FakeTensorMode():
        q, k, v, dout = _fake_qkv(dtype)
        kernel = dispatch.kernel_by_name(kernel_name)
        assert not kernel.not_supported_reasons(
            dispatch.KernelInput.of(q, capability=capability)), kernel_name
        with OpRecorder() as rec:
            out, lse = kernel.forward(q, k, v, SCALE)
            out_final = torch.randn(B, H, NQ, D, device="cuda", dtype=dtype)
            lse_final = torch.randn(H, B, NQ, device="cuda").transpose(0, 1)  # a strided view
            delta = torch.randn(B, H, NQ, device="cuda", dtype=torch.float32)
            dq, dk, dv, _ = kernel.backward(dout, q, k, v, out_final, lse_final, delta, SCALE)
        assert out.shape == q.shape and lse.shape == (B, H, NQ) and lse.dtype == torch.float32
        assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    return rec


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_flash_calls_match_the_dense_op_contract(dtype):
    rec = _run_block("sdpa:cuda_flash", dtype)
    fwd = rec.only(FLASH_OPS[0])
    _check_inputs(FLASH_OPS[0], fwd, ("query", "key", "value"), dtype)
    assert fwd["return_debug_mask"] is False
    bwd = rec.only(FLASH_OPS[1])
    _check_inputs(FLASH_OPS[1], bwd, ("grad_out", "query", "key", "value", "out"), dtype)
    # A defined cum_seq tensor (even an empty one) selects the variable-length kernel.
    assert bwd["cum_seq_q"] is None and bwd["cum_seq_k"] is None
    assert (bwd["max_q"], bwd["max_k"]) == (NQ, NK)
    _check_lse(bwd["logsumexp"], NQ)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_efficient_calls_match_the_op_contract(dtype):
    rec = _run_block("sdpa:cuda_efficient", dtype)
    fwd = rec.only(EFFICIENT_OPS[0])
    _check_inputs(EFFICIENT_OPS[0], fwd, ("query", "key", "value"), dtype)
    assert fwd["attn_bias"] is None and fwd["compute_log_sumexp"] is True
    bwd = rec.only(EFFICIENT_OPS[1])
    _check_inputs(EFFICIENT_OPS[1], bwd, ("grad_out_", "query", "key", "value", "out"), dtype)
    assert bwd["attn_bias"] is None
    assert list(bwd["grad_input_mask"]) == [True, True, True, False]
    # The kernel reads out as [B, N, H, D] with an assumed row stride H * D.
    out = bwd["out"]
    assert out.transpose(1, 2).is_contiguous(), f"out strides {out.stride()}"
    _check_lse(bwd["logsumexp"], -(-NQ // 32) * 32)  # the forward's padded lse rows


def test_recorder_flags_a_dtype_the_op_has_no_kernel_for():
    """The recorder can fail: float64 reaches the efficient op's meta kernel without an error."""
    with FakeTensorMode():
        q, k, v, _ = _fake_qkv(torch.float64)
        with OpRecorder() as rec:
            sdpa.cuda_efficient_forward(q, k, v, SCALE)
    op, args = rec.calls[0]
    with pytest.raises(AssertionError, match="no torch.float64 kernel"):
        _check_inputs(op, args, ("query",), torch.float64)


def test_old_flash_backward_call_would_be_flagged():
    """What the recorder says about the pre-fix call (empty int64 cum_seq tensors)."""
    with FakeTensorMode():
        q, k, v, dout = _fake_qkv(torch.float16)
        empty = torch.empty(0, dtype=torch.int64, device="cuda")
        lse = torch.randn(B, H, NQ, device="cuda")
        with OpRecorder() as rec:
            _aten._scaled_dot_product_flash_attention_backward(
                dout, q, k, v, dout, lse, empty, empty, NQ, NK, 0.0, False, empty, empty, scale=SCALE)
    assert rec.only(FLASH_OPS[1])["cum_seq_q"] is not None


# --- flash_attn through stand-in modules -----------------------------------------------------


def _check_nhd(name: str, t: torch.Tensor, n: int, dtype: torch.dtype) -> None:
    assert t.shape == (B, n, H, D) and t.dtype == dtype and t.is_contiguous(), (name, t.shape, t.stride())


def _check_backward_args(calls: list, a: dict[str, Any], dtype: torch.dtype) -> None:
    for name, n in (("dout", NQ), ("q", NQ), ("k", NK), ("v", NK), ("out", NQ),
                    ("dq", NQ), ("dk", NK), ("dv", NK)):
        _check_nhd(name, a[name], n, dtype)
    lse = a["softmax_lse"]
    assert lse.shape == (B, H, NQ) and lse.dtype == torch.float32 and lse.is_contiguous()
    assert a["dropout_p"] == 0.0 and a["softmax_scale"] == SCALE and a["causal"] is False
    assert a["alibi_slopes"] is None and a.get("softcap", 0.0) == 0.0
    calls.append(a)


def _backward_26(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                 window_size, softcap, alibi_slopes, deterministic, rng_state=None):
    """flash_attn 2.6.x's private backward signature (a plain function)."""
    assert tuple(window_size) == (-1, -1)
    _check_backward_args(_CALLS, dict(locals()), q.dtype)
    return dq, dk, dv, torch.empty(B, H, 128, device=q.device)


_CALLS: list = []
_OP_27: Optional[Any] = None


def _backward_27():
    """flash_attn 2.7+'s private backward: a torch.library custom op (signature *args, **kwargs)."""
    global _OP_27
    if _OP_27 is None:
        @torch.library.custom_op("hpattn_test_fa::bwd", mutates_args=("dq", "dk", "dv"),
                                 device_types="cuda")
        def bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                out: torch.Tensor, softmax_lse: torch.Tensor, dq: Optional[torch.Tensor],
                dk: Optional[torch.Tensor], dv: Optional[torch.Tensor], dropout_p: float,
                softmax_scale: float, causal: bool, window_size_left: int, window_size_right: int,
                softcap: float, alibi_slopes: Optional[torch.Tensor], deterministic: bool,
                rng_state: Optional[torch.Tensor] = None) -> torch.Tensor:
            raise AssertionError("the CUDA implementation must not run in these tests")

        @bwd.register_fake
        def _(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
              window_size_left, window_size_right, softcap, alibi_slopes, deterministic,
              rng_state=None):
            assert (window_size_left, window_size_right) == (-1, -1)
            _check_backward_args(_CALLS, dict(locals()), q.dtype)
            return torch.empty(B, H, 128, device=q.device)

        _OP_27 = bwd
    return _OP_27


def _flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                     softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn 2.6-2.8's public forward: q, k, v ``[B, N, H, D]``; lse ``[B, H, N_q]`` fp32."""
    assert dropout_p == 0.0 and softmax_scale == SCALE and causal is False and return_attn_probs
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return out, torch.empty(q.shape[0], q.shape[2], q.shape[1], device=q.device), None


@pytest.fixture
def fake_flash_attn(monkeypatch):
    """Install stand-in ``flash_attn`` modules; yields a function (version, backward) -> None."""
    def install(version: str, backward) -> None:
        package = types.ModuleType("flash_attn")
        package.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
        package.__version__ = version
        package.flash_attn_func = _flash_attn_func
        interface = types.ModuleType("flash_attn.flash_attn_interface")
        interface.__spec__ = importlib.machinery.ModuleSpec("flash_attn.flash_attn_interface", None)
        interface._flash_attn_backward = backward
        package.flash_attn_interface = interface
        monkeypatch.setitem(sys.modules, "flash_attn", package)
        monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", interface)
        fa.library_problem.cache_clear()
        fa.installed_release.cache_clear()

    _CALLS.clear()
    yield install
    fa.library_problem.cache_clear()
    fa.installed_release.cache_clear()


@pytest.mark.parametrize("version,style", [("2.6.0", "tuple"), ("2.7.4", "left_right"),
                                           ("2.8.3", "left_right")])
def test_flash_attn_backward_calls_each_supported_signature(fake_flash_attn, version, style):
    backward = _backward_26 if style == "tuple" else _backward_27()
    fake_flash_attn(version, backward)
    assert fa.library_problem() is None
    assert fa.backward_window_style(backward) == style
    with FakeTensorMode():
        q, k, v, dout = _fake_qkv(torch.bfloat16)
        kernel = dispatch.select_kernel("auto", q, capability=(8, 0))
        assert kernel.name == "flash_attn"
        out, lse = kernel.forward(q, k, v, SCALE)
        assert out.shape == q.shape and lse.shape == (B, H, NQ)
        out_final = torch.randn(B, H, NQ, D, device="cuda", dtype=torch.float32)  # cast inside
        lse_final = torch.randn(H, B, NQ, device="cuda").transpose(0, 1)  # a strided view
        dq, dk, dv, _ = kernel.backward(dout, q, k, v, out_final, lse_final, lse_final, SCALE)
        assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert len(_CALLS) == 1


@pytest.mark.parametrize("version,needle", [("2.5.9", "2.5.9 is not supported"),
                                            ("3.0.0", "3.0.0 is not supported")])
def test_flash_attn_versions_outside_the_claim_are_refused(fake_flash_attn, version, needle):
    fake_flash_attn(version, _backward_26)
    with FakeTensorMode():
        q = torch.empty(B, H, NQ, D, device="cuda", dtype=torch.float16)
        with pytest.raises(ValueError, match=needle):
            dispatch.select_kernel("flash_attn", q, capability=(8, 0))
        assert dispatch.select_kernel("auto", q, capability=(8, 0)).name == "sdpa:cuda_flash"


def test_flash_attn_unknown_backward_signature_is_refused(fake_flash_attn):
    def backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal):
        raise AssertionError("must not be called")

    fake_flash_attn("2.6.3", backward)
    assert "unknown _flash_attn_backward signature" in fa.library_problem()


# --- Note [backward layouts] and the NaN rows, once per call ----------------------------------


class _Copies(TorchDispatchMode):
    """Counts the ops that copy or pad a tensor, by the shape they produce."""

    COPY_OPS = (_aten.clone.default, _aten._to_copy.default, _aten.copy_.default,
                _aten.constant_pad_nd.default, _aten.isnan.default)

    def __init__(self) -> None:
        super().__init__()
        self.made: list[tuple[Any, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.COPY_OPS:
            self.made.append((func, tuple(out.shape)))
        return out


@pytest.mark.parametrize("name", ["flash_attn", "sdpa:cuda_flash", "sdpa:cuda_efficient"])
def test_ring_blocks_read_prepared_dout_out_lse_without_a_copy(fake_flash_attn, name):
    """The ring hands every key block the same dout, q, out and lse: prepared once, the block
    backwards copy none of them (only the block's own k, v where the kernel wants another
    layout). Before, flash_attn re-laid dout, q, out and lse out per block and the memory-efficient
    kernel re-padded lse and re-laid out per block."""
    fake_flash_attn("2.7.4", _backward_27())
    with FakeTensorMode():
        q, k, v, dout = _fake_qkv(torch.bfloat16)
        kernel = dispatch.kernel_by_name(name)
        out = torch.randn(B, H, NQ, D, device="cuda", dtype=torch.float32)  # the ring's merged out
        lse = torch.randn(H, B, NQ, device="cuda").transpose(0, 1)  # a strided view
        prepared = kernel.prepare_backward(dout, q, out, lse)
        with _Copies() as rec:
            for _ in range(3):  # three key blocks
                kernel.backward(*prepared[:2], k, v, *prepared[2:], None, SCALE)
    query_side = [(f, shape) for f, shape in rec.made if NQ in shape]
    assert query_side == [], query_side


def test_fused_forward_takes_the_nan_rows_of_the_call():
    """The ring builds the NaN-row mask of its queries once per call and hands it to every
    block: the block forward then scans q for NaN no more (and fills its own outputs in place)."""
    kernel = dispatch.kernel_by_name("sdpa:cpu_flash")
    q, k, v = (torch.randn(B, H, NQ, D) for _ in range(3))
    q[0, 1, 2, 3] = float("nan")
    rows = kernel.nan_rows(q)
    with _Copies() as rec:
        for _ in range(3):
            out, lse = kernel.forward(q, k, v, SCALE, nan_rows=rows)
    assert [f for f, _ in rec.made if f is _aten.isnan.default] == []
    assert torch.isnan(out[0, 1, 2]).all() and torch.isnan(lse[0, 1, 2]) and not torch.isnan(out[0, 1, 3]).any()


@pytest.mark.parametrize("deterministic", [False, True])
def test_flash_attn_backward_is_deterministic_only_when_asked(fake_flash_attn, deterministic):
    """flash_attn's deterministic backward zero-fills an fp32 dq accumulator per split (~0.86 GB
    per block backward at N = 24k on an H100): it follows
    ``torch.are_deterministic_algorithms_enabled()`` instead of being always on."""
    fake_flash_attn("2.7.4", _backward_27())
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        _run_block("flash_attn", torch.bfloat16)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert [c["deterministic"] for c in _CALLS] == [deterministic]
