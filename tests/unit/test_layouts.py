"""Caller layouts reach no kernel raw (Note [block layout] in ``hpattn_dist/kernels/dispatch.py``).

q, k, v given as views whose last dim is not dense (``base[..., ::2]``, a ``[B, H, D, N]`` buffer
viewed as ``[B, H, N, D]``, an expanded head dim), as q is k, or as views of one buffer, through
every entry point on one process with the default kernel (the CPU flash op, which misreads a
non-unit last stride) and the manual one: forward and the gradients of the BASE tensors equal the
float64 explicit softmax of :func:`tests.reference.reference_attention` on the same views. The
multi-rank cases are in ``tests/distributed/test_one_rank_wrong.py`` (P = 2).

Legend: B batch, H heads, N pixels, D head dim.
"""

from __future__ import annotations

import pytest
import torch

from hpattn_dist import healpix_local_attention, ring_attention, ring_cross_attention
from hpattn_dist.strategies import sharded_attention
from tests.local_reference import healpy_window_mask, reference_local_attention
from tests.reference import reference_attention

B, H, N, D = 2, 2, 12, 4  # N = 12: the nside-1 field (local attention needs a HEALPix one)


def _views(layout: str, seed: int):
    """``(bases, views)``: leaf tensors and the q, k, v views of them the call receives."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if layout == "step":  # a non-unit last stride
        bases = [rand(B, H, N, 2 * D).requires_grad_() for _ in range(3)]
        return bases, [b[..., ::2] for b in bases]
    if layout == "transposed":  # heads-last memory: [B, H, D, N] viewed as [B, H, N, D]
        bases = [rand(B, H, D, N).requires_grad_() for _ in range(3)]
        return bases, [b.transpose(-1, -2) for b in bases]
    if layout == "expanded":  # one value per head dim, broadcast: last stride 0
        bases = [rand(B, H, N, 1).requires_grad_() for _ in range(3)]
        return bases, [b.expand(B, H, N, D) for b in bases]
    if layout == "one buffer":  # q, k, v as views of one packed [B, N, 3, H, D] projection
        base = rand(B, N, 3, H, D).requires_grad_()
        return [base], [t.transpose(1, 2) for t in base.unbind(2)]
    if layout == "q is k":
        bases = [rand(B, H, D, N).requires_grad_() for _ in range(2)]
        q = bases[0].transpose(-1, -2)
        return bases, [q, q, bases[1].transpose(-1, -2)]
    raise AssertionError(layout)


LAYOUTS = ("step", "transposed", "expanded", "one buffer", "q is k")
CALLS = {
    "ring_attention": lambda q, k, v, be: ring_attention(q, k, v, backend=be),
    "ring_cross_attention": lambda q, k, v, be: ring_cross_attention(q, k, v, backend=be),
    "ulysses": lambda q, k, v, be: sharded_attention("ulysses", q, k, v, backend=be),
    "auto, key_bias": lambda q, k, v, be: sharded_attention(
        "auto", q, k, v, backend=be, key_bias=torch.zeros(B, N, dtype=q.dtype)),
    "local": lambda q, k, v, be: healpix_local_attention(q, k, v, window_nside=1, mode="cell", backend=be),
}


def _reference(name: str, q, k, v):
    if name == "local":
        return reference_local_attention(q, k, v, healpy_window_mask(1, 1, "cell"))
    return reference_attention(q, k, v)


@pytest.mark.parametrize("backend", ["auto", "manual"])
@pytest.mark.parametrize("name", CALLS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_views_give_the_reference_forward_and_gradients(layout, name, backend):
    bases, views = _views(layout, seed=len(layout) + len(name))
    out = CALLS[name](*views, backend)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = torch.autograd.grad((w * out).sum(), bases)
    ref_bases = [b.detach().clone().requires_grad_() for b in bases]
    ref_views = _reapply(layout, ref_bases)  # the same views of fresh leaves
    ref = _reference(name, *ref_views)
    want = torch.autograd.grad((w * ref).sum(), ref_bases)
    assert (out - ref).abs().max() <= 1e-12 * ref.abs().max()
    for g, r in zip(got, want):
        assert (g - r).abs().max() <= 1e-12 * r.abs().max(), (g - r).abs().max()


def _reapply(layout: str, bases):
    """The views of :func:`_views` on other leaves."""
    if layout == "step":
        return [b[..., ::2] for b in bases]
    if layout == "transposed":
        return [b.transpose(-1, -2) for b in bases]
    if layout == "expanded":
        return [b.expand(B, H, N, D) for b in bases]
    if layout == "one buffer":
        return [t.transpose(1, 2) for t in bases[0].unbind(2)]
    q = bases[0].transpose(-1, -2)
    return [q, q, bases[1].transpose(-1, -2)]


def test_block_layout_copies_only_what_a_fused_kernel_misreads():
    from hpattn_dist.kernels.dispatch import block_layout

    x = torch.randn(2, 3, 5, 8)
    assert block_layout(x) is x
    assert block_layout(x.transpose(1, 2)) is not None and block_layout(x.transpose(1, 2)).data_ptr() == \
        x.data_ptr()  # a permuted view with dense rows is read in place
    for view in (x[..., ::2], x.transpose(-1, -2), x[..., 1:]):  # strided, transposed, misaligned
        y = block_layout(view)
        assert y.stride(-1) == 1 and y.storage_offset() == 0 and torch.equal(y, view)
