"""Block kernels (manual, sdpa:cpu_flash): forward (out, lse), final-statistics backward, bounded
score tile, empty and fully masked blocks, dtypes, and the dispatch's errors and warnings.

Everything is checked against :func:`tests.reference.reference_attention` (float64, explicit
softmax) and ``torch.logsumexp`` of the float64 scores. Legend: B batch, H heads, N_q queries,
N_k keys, D head dim.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from hpattn_dist.kernels import dispatch, manual, select_kernel
from hpattn_dist.kernels.manual import acc_dtype
from tests.reference import reference_attention

BACKENDS = ["manual", "sdpa"]
B, H, D = 2, 3, 8


def _qkv(n_q: int, n_k: int, dtype: torch.dtype, seed: int = 0, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, n_q, D, generator=g, dtype=torch.float64) * scale).to(dtype)
    k = (torch.randn(B, H, n_k, D, generator=g, dtype=torch.float64) * scale).to(dtype)
    v = torch.randn(B, H, n_k, D, generator=g, dtype=torch.float64).to(dtype)
    dout = torch.randn(B, H, n_q, D, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, dout


def _ref_lse(q, k, scale, bias=None):
    s = torch.matmul(q.double(), k.double().transpose(-2, -1)) * scale
    if bias is not None:
        s = s + bias.double()[:, :, None, :]
    return torch.logsumexp(s, dim=-1)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).abs().max() / ref.abs().max()).item()


# Tolerances relative to max|ref|: fp64 near machine precision, fp32 a few ulps of the sums.
REL_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}
LSE_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_forward_matches_reference(backend, dtype):
    q, k, v, _ = _qkv(23, 17, dtype)
    scale = D**-0.5
    kernel = select_kernel(backend, q)
    assert kernel.name == ("manual" if backend == "manual" else "sdpa:cpu_flash")
    out, lse = kernel.forward(q, k, v, scale)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert lse.dtype == acc_dtype(dtype)  # fp32 lse for bf16 inputs, fp64 for fp64
    # fused kernels return q.dtype, manual the accumulation dtype
    assert out.dtype == (acc_dtype(dtype) if backend == "manual" else dtype)
    ref = reference_attention(q, k, v, scale)
    assert _rel(out, ref) <= REL_TOL[dtype]
    ref_lse = _ref_lse(q, k, scale)
    assert (lse.double() - ref_lse).abs().max().item() <= LSE_TOL[dtype] * ref_lse.abs().max().item()


def _final_stats(q, k, v, dout, scale, bias=None):
    """Final output (float64 reference) and its fp64 lse / delta, as the ring would hold them."""
    out = reference_attention(q, k, v, scale, key_bias=bias)
    lse = _ref_lse(q, k, scale, bias)
    delta = (dout.double() * out).sum(-1)
    return out, lse, delta


KEY_SPLIT = [0, 5, 5, 13, 17]  # blocks [0,5), [5,5) (empty), [5,13), [13,17)


def _blockwise_backward(kernel, q, k, v, dout, scale, bias=None, need_dbias=False):
    acc = acc_dtype(q.dtype)
    out, lse, delta = _final_stats(q, k, v, dout, scale, bias)
    dq = torch.zeros(q.shape, dtype=acc)
    dks, dvs, dbs = [], [], []
    for a, b in zip(KEY_SPLIT[:-1], KEY_SPLIT[1:]):
        bias_b = None if bias is None else bias[:, :, a:b]
        dq_b, dk_b, dv_b, db_b = kernel.backward(
            dout, q, k[:, :, a:b], v[:, :, a:b], out.to(q.dtype), lse.to(acc), delta.to(acc),
            scale, bias_b, None, need_dbias,
        )
        dq += dq_b
        dks.append(dk_b)
        dvs.append(dv_b)
        dbs.append(db_b)
    dbias = torch.cat(dbs, dim=-1) if need_dbias else None
    return dq, torch.cat(dks, dim=2), torch.cat(dvs, dim=2), dbias


def _reference_grads(q, k, v, dout, scale, bias=None):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    bias_leaf = None if bias is None else bias.detach().double().requires_grad_()
    out = reference_attention(*leaves, scale, key_bias=bias_leaf)
    out.backward(dout.double())
    grads = [t.grad for t in leaves]
    return grads + [None if bias_leaf is None else bias_leaf.grad]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_block_backward_with_final_stats_equals_autograd(backend, dtype):
    q, k, v, dout = _qkv(19, KEY_SPLIT[-1], dtype, seed=1)
    scale = 0.3
    kernel = select_kernel(backend, q)
    grads = _blockwise_backward(kernel, q, k, v, dout, scale)
    ref = _reference_grads(q, k, v, dout, scale)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref):
        assert g.shape == r.shape, name
        assert _rel(g, r) <= REL_TOL[dtype], (name, _rel(g, r))


def test_manual_block_backward_with_bias_and_dbias():
    q, k, v, dout = _qkv(19, KEY_SPLIT[-1], torch.float64, seed=2)
    g = torch.Generator().manual_seed(5)
    bias = torch.randn(B, H, KEY_SPLIT[-1], generator=g, dtype=torch.float64)
    bias[:, :, 3] = float("-inf")  # a masked key inside a block
    kernel = select_kernel("manual", q, has_bias=True)
    dq, dk, dv, dbias = _blockwise_backward(kernel, q, k, v, dout, 0.35, bias, need_dbias=True)
    rq, rk, rv, rb = _reference_grads(q, k, v, dout, 0.35, bias)
    for got, ref in ((dq, rq), (dk, rk), (dv, rv), (dbias, rb)):
        assert _rel(got, ref) <= 1e-12
    assert torch.all(dbias[:, :, 3] == 0)


def _record_matmuls(monkeypatch) -> list:
    shapes: list = []
    real = torch.matmul

    def recording(a, b, *args, **kwargs):
        res = real(a, b, *args, **kwargs)
        shapes.append(tuple(res.shape))
        return res

    monkeypatch.setattr(torch, "matmul", recording)
    return shapes


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def test_manual_tile_is_bounded_and_results_unchanged(monkeypatch):
    """A tiny TILE_ELEMENTS forces 3-row query chunks: same results, no larger score tensor."""
    q, k, v, dout = _qkv(29, 17, torch.float64, seed=3)
    scale = D**-0.5
    out_lse_ref = manual.manual_forward(q, k, v, scale)
    out, lse, delta = _final_stats(q, k, v, dout, scale)
    grads_ref = manual.manual_backward(dout, q, k, v, lse, delta, scale)

    monkeypatch.setattr(manual, "TILE_ELEMENTS", B * H * 17 * 3)
    shapes = _record_matmuls(monkeypatch)
    out_c, lse_c = manual.manual_forward(q, k, v, scale)
    grads_c = manual.manual_backward(dout, q, k, v, lse, delta, scale)
    assert shapes, "manual kernel no longer goes through torch.matmul; update this test"
    # Every matmul result is a [B, H, <=3, N_k] score tile, a [B, H, <=3, D] output chunk or a
    # [B, H, N_k, D] key-side gradient; never [B, H, N_q, N_k].
    assert max(_numel(s) for s in shapes) <= B * H * 17 * max(3, D)
    assert all(s[-2] <= 3 for s in shapes if s[-1] == 17)
    assert torch.allclose(out_c, out_lse_ref[0], rtol=0, atol=1e-14)
    assert torch.allclose(lse_c, out_lse_ref[1], rtol=0, atol=1e-14)
    for got, ref in zip(grads_c[:3], grads_ref[:3]):
        assert torch.allclose(got, ref, rtol=0, atol=1e-13)


def test_manual_default_tile_does_not_scale_with_nq_times_nk(monkeypatch):
    """N_q * N_k = 5.3M scores > TILE_ELEMENTS = 4.2M: no matmul result exceeds the tile."""
    n = 2304
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 1, n, D, generator=g)
    k = torch.randn(1, 1, n, D, generator=g)
    v = torch.randn(1, 1, n, D, generator=g)
    shapes = _record_matmuls(monkeypatch)
    out, lse = manual.manual_forward(q, k, v, D**-0.5)
    dout = torch.randn(out.shape, generator=g)
    delta = (dout * out).sum(-1)
    manual.manual_backward(dout, q, k, v, lse, delta, D**-0.5)
    assert n * n > manual.TILE_ELEMENTS
    assert max(_numel(s) for s in shapes) <= manual.TILE_ELEMENTS
    # spot-check a few rows against the float64 reference
    rows = slice(1000, 1004)
    ref = reference_attention(q[:, :, rows], k, v)
    assert _rel(out[:, :, rows], ref) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_empty_key_block(backend, dtype):
    q, k, v, dout = _qkv(7, 0, dtype)
    kernel = select_kernel(backend, q)
    out, lse = kernel.forward(q, k, v, 0.3)
    assert out.shape == q.shape and torch.all(out == 0)
    assert lse.dtype == acc_dtype(dtype) and torch.all(lse == float("-inf"))
    acc = acc_dtype(dtype)
    dq, dk, dv, _ = kernel.backward(dout, q, k, v, out.to(dtype), torch.zeros(B, H, 7, dtype=acc),
                                    torch.zeros(B, H, 7, dtype=acc), 0.3)
    assert torch.all(dq == 0) and dk.shape == k.shape and dv.shape == v.shape
    # and an empty query block
    out0, lse0 = kernel.forward(q[:, :, :0], q, q, 0.3)
    assert out0.shape == (B, H, 0, D) and lse0.shape == (B, H, 0)


@pytest.mark.parametrize("query", ["finite", "inf", "nan"])
def test_fully_masked_rows_give_zero_output_and_zero_grads(query):
    """A query with no allowed key gets zeros and gives no gradient, whatever it holds (Note
    [non-finite inputs]). Was, for a non-finite query: dK NaN (``0 * inf`` in ``dS^T Q``)."""
    q, k, v, dout = _qkv(11, 13, torch.float64, seed=6)
    bias = torch.zeros(B, 1, 13, dtype=torch.float64)
    bias[0] = float("-inf")  # batch 0: every key masked
    bias[1, 0, ::2] = float("-inf")  # batch 1: half the keys masked
    if query != "finite":
        q[0, 1, 4, 2] = float(query)
    kernel = select_kernel("manual", q, has_bias=True)
    out, lse = kernel.forward(q, k, v, 0.4, bias)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))
    ref = reference_attention(q, k, v, 0.4, key_bias=bias)
    assert _rel(out, ref) <= 1e-12
    delta = (dout * out).sum(-1)
    dq, dk, dv, dbias = kernel.backward(dout, q, k, v, out, lse, delta, 0.4, bias, None, True)
    for g in (dq, dk, dv, dbias):
        assert torch.isfinite(g).all()
        assert torch.all(g[0] == 0)
    rq, rk, rv, rb = _reference_grads(q, k, v, dout, 0.4, bias)
    assert dbias.shape == (B, H, 13)  # per head; a head-shared bias sums it over heads
    for got, r in ((dq, rq), (dk, rk), (dv, rv), (dbias.sum(1, keepdim=True), rb)):
        assert _rel(got, r) <= 1e-12


_NONFINITE = {  # name: (tensor, index, value); B = 2, H = 3, N_q = 5, N_k = 4, D = 8
    "nan query": ("q", (0, 1, 2, 3), "nan"),
    "-inf query, scores all -inf": ("q", (1, 0, 4, 0), "-inf"),  # k[..., 0] > 0 below
    "nan key, every score of (0, 2) nan": ("k", (0, 2, 1, 5), "nan"),
    "+inf key": ("k", (1, 1, 3, 2), "inf"),
    "nan value": ("v", (0, 0, 0, 7), "nan"),
    "-inf value": ("v", (1, 2, 2, 4), "-inf"),
    "nan bias": ("bias", (0, 0, 3), "nan"),
    "+inf bias": ("bias", (1, 0, 1), "inf"),
    "nan key excluded by the bias": ("k", (1, 2, 0, 3), "nan"),  # reaches no row
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", _NONFINITE)
def test_rows_reading_a_non_finite_value_are_nan(backend, dtype, case):
    """Note [non-finite inputs]: NaN output and lse on exactly the rows the reference makes NaN,
    the reference's values elsewhere; a key the bias excludes (-inf: key 0 of batch 1) reaches no
    row. Was: zeros (lse -inf, or lse 0 from the CPU flash kernel) for a
    row whose scores are all -inf or all NaN, finite columns beside a NaN or infinite value."""
    q, k, v, _ = _qkv(5, 4, torch.float64, seed=8)
    k[..., 0] = k[..., 0].abs() + 0.1
    name, at, value = _NONFINITE[case]
    if backend == "sdpa" and "bias" in case:
        pytest.skip("the fused kernels take no bias (a bias runs the manual kernel)")
    bias = torch.zeros(B, 1, 4, dtype=torch.float64) if backend == "manual" else None
    if bias is not None:
        bias[1, 0, 0] = float("-inf")
    {"q": q, "k": k, "v": v, "bias": bias}[name][at] = float(value)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    kernel = select_kernel(backend, q, has_bias=bias is not None)
    out, lse = kernel.forward(q, k, v, 0.5, None if bias is None else bias.to(acc_dtype(dtype)))
    want = reference_attention(q, k, v, 0.5, key_bias=bias)
    nan_rows = torch.isnan(want).any(dim=-1)
    assert nan_rows.any() != (bias is not None and "excluded" in case)
    assert torch.equal(torch.isnan(want).all(dim=-1), nan_rows)
    assert torch.equal(torch.isnan(out).all(dim=-1), nan_rows) and torch.equal(torch.isnan(out).any(dim=-1), nan_rows)
    assert torch.equal(torch.isnan(lse), nan_rows)
    assert _rel(out[~nan_rows], want[~nan_rows]) <= REL_TOL[dtype]


def test_select_kernel_unknown_backend():
    q = torch.zeros(1, 1, 2, D)
    with pytest.raises(ValueError, match="backend must be one of"):
        select_kernel("bogus", q)


def test_select_kernel_flash_attn_on_cpu_lists_reasons():
    q = torch.zeros(1, 2, 5, D)
    with pytest.raises(ValueError) as info:
        select_kernel("flash_attn", q)
    msg = str(info.value)
    assert "flash_attn" in msg and "(1, 2, 5, 8)" in msg and "cpu" in msg
    assert "needs cuda" in msg  # the device reason
    assert "float16 or bfloat16" in msg  # the dtype reason (float32 input)


def test_sdpa_with_dropout_or_bias_falls_back_to_manual_and_warns_once(monkeypatch):
    monkeypatch.setattr(dispatch, "_reported", set())
    q = torch.zeros(1, 1, 4, D)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernels = [select_kernel("sdpa", q, dropout=True) for _ in range(3)]
    assert all(kern.name == "manual" for kern in kernels)
    relevant = [w for w in caught if "dropout" in str(w.message)]
    assert len(relevant) == 1, [str(w.message) for w in caught]
    assert "manual" in str(relevant[0].message)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert select_kernel("sdpa", q, has_bias=True).name == "manual"
        assert select_kernel("sdpa", q, has_bias=True).name == "manual"
    assert len([w for w in caught if "bias" in str(w.message)]) == 1
    # "auto" falls back silently; "manual" never warns
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert select_kernel("auto", q, dropout=True).name == "manual"
        assert select_kernel("manual", q, dropout=True).name == "manual"
    assert not caught


def test_auto_on_cpu_picks_cpu_flash():
    assert select_kernel("auto", torch.zeros(1, 1, 4, D)).name == "sdpa:cpu_flash"
