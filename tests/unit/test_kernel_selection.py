"""The capability table: each refusal reason of each kernel, and the choice it makes.

Inputs are fake CUDA tensors (``FakeTensorMode`` on the CPU build) with the compute capability
passed in or monkeypatched where :func:`hpattn_dist.kernels.capability.cuda_capability` reads it.
The expected limits are torch 2.13's (``sdp_utils.cpp``, ``flash_api.cpp``) and flash_attn's,
restated here rather than read from the table under test.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from hpattn_dist.kernels import capability, dispatch, select_kernel
from hpattn_dist.kernels import flash_attn as fa
from hpattn_dist.kernels.capability import KernelInput

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


@pytest.fixture(autouse=True)
def no_flash_attn(monkeypatch):
    """flash_attn absent unless a test says otherwise; warnings reported afresh."""
    monkeypatch.setattr(fa, "library_problem", lambda: "the flash_attn package is not installed")
    monkeypatch.setattr(dispatch, "_reported", set())


def _q(dtype=F16, d=64, device="cuda"):
    with FakeTensorMode():
        return torch.empty(2, 4, 10, d, dtype=dtype, device=device)


def _inp(dtype=F16, d=64, sm=(8, 0), device="cuda", bias=False, dropout=False):
    return KernelInput((2, 4, 10, d), dtype, torch.device(device), sm if device == "cuda" else None,
                       bias, dropout)


def _reasons(name, **kw):
    return dispatch.kernel_by_name(name).not_supported_reasons(_inp(**kw))


@pytest.mark.parametrize("kw,needle", [
    (dict(dtype=F32), "dtype torch.float32"),
    (dict(dtype=F64), "dtype torch.float64"),
    (dict(sm=(7, 5)), "sm 7.5 (needs sm 8.0 to sm 12.1)"),
    (dict(sm=(12, 2)), "sm 12.2"),
    (dict(d=12), "head dim 12 (needs a multiple of 8)"),
    (dict(d=264), "head dim 264 (needs <= 256)"),
    (dict(d=200, sm=(8, 6)), "head dim 200 on sm 8.6"),
    (dict(d=200, sm=(12, 0)), "head dim 200 on sm 12.0"),
    (dict(device="cpu"), "device cpu (needs cuda)"),
    (dict(bias=True), "takes no key bias"),
    (dict(dropout=True), "takes no dropout"),
])
def test_cuda_flash_refusals(kw, needle):
    reasons = _reasons("sdpa:cuda_flash", **kw)
    assert any(needle in r for r in reasons), reasons


@pytest.mark.parametrize("kw", [dict(), dict(dtype=BF16), dict(d=256), dict(d=200, sm=(8, 0)),
                                dict(d=232, sm=(8, 6)), dict(sm=(9, 0)), dict(sm=(12, 1))])
def test_cuda_flash_accepts(kw):
    assert _reasons("sdpa:cuda_flash", **kw) == []


@pytest.mark.parametrize("kw,needle", [
    (dict(dtype=F64), "dtype torch.float64"),
    (dict(dtype=BF16, sm=(7, 5)), "torch.bfloat16 on sm 7.5 (needs sm 8.0 or newer)"),
    (dict(sm=(3, 7)), "sm 3.7 (needs sm 5.0 to sm 12.1)"),
    (dict(d=12, dtype=F16), "head dim 12 (needs a multiple of 8"),
    (dict(d=6, dtype=F32), "head dim 6 (needs a multiple of 4"),
    (dict(d=12, dtype=F16, sm=(7, 0)), "head dim 12 (needs a multiple of 8"),
    (dict(device="cpu"), "device cpu"),
    (dict(bias=True), "takes no key bias"),
])
def test_cuda_efficient_refusals(kw, needle):
    reasons = _reasons("sdpa:cuda_efficient", **kw)
    assert any(needle in r for r in reasons), reasons


@pytest.mark.parametrize("kw", [dict(dtype=F32), dict(dtype=F32, d=6, sm=(7, 5)),
                                dict(dtype=F16, sm=(6, 0), d=6), dict(dtype=BF16),
                                dict(dtype=F32, d=512), dict(sm=(5, 0))])
def test_cuda_efficient_accepts(kw):
    assert _reasons("sdpa:cuda_efficient", **kw) == []


def test_cpu_flash_and_manual():
    assert _reasons("sdpa:cpu_flash", device="cpu", dtype=F64) == []
    assert any("device cuda:0" in r or "device cuda" in r for r in _reasons("sdpa:cpu_flash"))
    assert _reasons("manual", dtype=F64, bias=True, dropout=True, sm=(3, 0)) == []


def test_flash_attn_refusals(monkeypatch):
    assert "not installed" in " ".join(_reasons("flash_attn"))
    monkeypatch.setattr(fa, "library_problem", lambda: None)
    assert _reasons("flash_attn") == []
    assert _reasons("flash_attn", sm=(9, 0), d=224) == []
    for kw, needle in ((dict(sm=(7, 5)), "sm 7.5 (needs sm 8.0 or newer)"), (dict(dtype=F32), "dtype"),
                       (dict(d=200, sm=(8, 9)), "head dim 200 on sm 8.9"), (dict(d=20), "multiple of 8"),
                       (dict(device="cpu"), "device cpu")):
        assert any(needle in r for r in _reasons("flash_attn", **kw)), kw


@pytest.mark.parametrize("release, sm, refused", [
    ((2, 7, 2), (10, 0), True), ((2, 6, 3), (12, 0), True), ((2, 7, 2), (9, 0), False),
    ((2, 7, 3), (10, 0), False), ((2, 8, 0), (12, 0), False),
])
def test_flash_attn_before_2_7_3_runs_sm80_to_sm90_only(monkeypatch, release, sm, refused):
    """Note [flash_attn versions]: before 2.7.3 the package carries kernels up to sm 9.0; a newer
    GPU is refused at selection with the release in the reason, and "auto" takes the next kernel."""
    monkeypatch.setattr(fa, "library_problem", lambda: None)
    monkeypatch.setattr(fa, "installed_release", lambda: release)
    reasons = _reasons("flash_attn", sm=sm)
    assert any(f"flash_attn {'.'.join(map(str, release))} runs sm 8.0 to 9.0" in r for r in reasons) == refused
    assert (select_kernel("auto", _q(BF16), capability=sm).name == "flash_attn") == (not refused)


@pytest.mark.parametrize("text, release", [("2.7.2", (2, 7, 2)), ("2.7.2.post1", (2, 7, 2)),
                                           ("2.8.0+cu124", (2, 8, 0)), ("2.6", (2, 6, 0))])
def test_flash_attn_release_parsing(text, release):
    assert fa._release(text) == release


def test_rocm_build_refuses_the_cuda_fused_kernels(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2")
    for name in ("sdpa:cuda_flash", "sdpa:cuda_efficient"):
        assert any("ROCm" in r for r in _reasons(name))
    assert select_kernel("auto", _q(), capability=(9, 0)).name == "manual"


@pytest.mark.parametrize("dtype,d,sm,expected", [
    (F16, 64, (8, 0), "sdpa:cuda_flash"),
    (BF16, 64, (9, 0), "sdpa:cuda_flash"),
    (F16, 64, (7, 5), "sdpa:cuda_efficient"),  # pre-Ampere: no flash (issue 19 item 5)
    (F32, 64, (8, 0), "sdpa:cuda_efficient"),
    (F64, 64, (9, 0), "manual"),  # no fused float64 kernel on CUDA (issue 19 item 2)
    (BF16, 64, (7, 5), "manual"),
    (F16, 12, (8, 0), "manual"),
    (F32, 12, (8, 0), "sdpa:cuda_efficient"),
])
def test_auto_choice_on_cuda(dtype, d, sm, expected):
    assert select_kernel("auto", _q(dtype, d), capability=sm).name == expected


def test_capability_is_queried_through_one_function(monkeypatch):
    seen = []

    def fake(device):
        seen.append(device)
        return (7, 0)

    monkeypatch.setattr(capability, "cuda_capability", fake)
    assert select_kernel("auto", _q(F16)).name == "sdpa:cuda_efficient"
    assert seen and seen[0].type == "cuda"


def test_auto_prefers_flash_attn_when_it_runs(monkeypatch):
    monkeypatch.setattr(fa, "library_problem", lambda: None)
    assert select_kernel("auto", _q(BF16), capability=(8, 0)).name == "flash_attn"
    assert select_kernel("auto", _q(BF16), capability=(7, 5)).name == "manual"


def test_sdpa_without_a_fitting_kernel_warns_with_every_reason_and_runs_manual():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernel = select_kernel("sdpa", _q(F64), capability=(9, 0))
        select_kernel("sdpa", _q(F64), capability=(9, 0))
    assert kernel.name == "manual"
    assert len(caught) == 1
    msg = str(caught[0].message)
    for needle in ("sdpa:cuda_flash: dtype torch.float64", "sdpa:cuda_efficient: dtype torch.float64",
                   "sdpa:cpu_flash: device cuda", "'manual'"):
        assert needle in msg, msg


def test_flash_attn_request_that_cannot_run_lists_every_reason_and_the_input():
    with pytest.raises(ValueError) as info:
        select_kernel("flash_attn", _q(F32, 20), capability=(7, 5))
    msg = str(info.value)
    for needle in ("(2, 4, 10, 20)", "torch.float32", "cuda", "sm 7.5", "not installed",
                   "dtype torch.float32", "needs sm 8.0", "multiple of 8"):
        assert needle in msg, (needle, msg)


def test_flash_attn_with_only_dropout_in_the_way_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(fa, "library_problem", lambda: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert select_kernel("flash_attn", _q(BF16), dropout=True, capability=(8, 0)).name == "manual"
    assert len(caught) == 1 and "takes no dropout" in str(caught[0].message)


def test_every_backend_name_resolves_from_the_table():
    names = {k.name for k in dispatch.KERNEL_TABLE}
    assert names == {"manual", "sdpa:cpu_flash", "sdpa:cuda_flash", "sdpa:cuda_efficient", "flash_attn"}
    for backend in dispatch.KERNEL_BACKENDS:
        assert dispatch.candidates(backend)
    assert dispatch.candidates("auto")[-1] is dispatch.MANUAL  # "auto" always finds a kernel


# The layer's attn_backend names are the kernel backends (README, "Backend names"); the oracle's are
# the seed contract's three.


def test_layer_reaches_flash_attn_through_the_table_and_the_oracle_keeps_its_names():
    from hpattn_dist import DistributedSpatialSelfAttention, SpatialSelfAttention, convert_spatial_attention

    layer = DistributedSpatialSelfAttention(8, 2, attn_backend="flash_attn")
    assert layer.attn_backend == "flash_attn"
    with pytest.raises(ValueError) as info:  # CPU, and the package absent: the table's reasons
        layer(torch.randn(1, 12, 8))
    assert "backend='flash_attn' cannot run" in str(info.value) and "not installed" in str(info.value)
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        DistributedSpatialSelfAttention(8, 2, attn_backend="flash")
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        SpatialSelfAttention(8, 2, attn_backend="flash_attn")
    converted = convert_spatial_attention(SpatialSelfAttention(8, 2), attn_backend="flash_attn")
    assert converted.attn_backend == "flash_attn"
    source = SpatialSelfAttention(8, 2)
    source.attn_backend = "flash_attn"  # a seed-like layer with a name outside the seed's three
    with pytest.raises(ValueError, match="not one of the seed layer's"):
        convert_spatial_attention(source)
    x = torch.randn(1, 12, 8, dtype=torch.float64)
    torch.manual_seed(0)
    ref = SpatialSelfAttention(8, 2, attn_backend="manual").double()
    for name in ("auto", "sdpa", "manual"):  # one process: the layer is the oracle's attention
        layer = DistributedSpatialSelfAttention(8, 2, attn_backend=name).double()
        layer.load_state_dict(ref.state_dict())
        torch.testing.assert_close(layer(x), ref(x), rtol=1e-12, atol=1e-12)


def test_cross_layer_takes_the_same_names():
    from hpattn_dist.cross import DistributedSpatialCrossAttention, SpatialCrossAttention

    layer = DistributedSpatialCrossAttention(8, 2, attn_backend="flash_attn")
    assert layer.attn_backend == "flash_attn"
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        DistributedSpatialCrossAttention(8, 2, attn_backend="flash")
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        SpatialCrossAttention(8, 2, attn_backend="flash_attn")

