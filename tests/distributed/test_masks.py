"""Key masks and key biases carried around the ring, against the float64 masked reference.

Each world size runs one job; inside it every case computes the ring result on its shard and the
float64 reference on the full field, and returns the largest errors plus the bytes it sent.
"""

from __future__ import annotations

import pytest
import torch

from hpattn_dist import count_communication, ring_attention
from hpattn_dist.kernels import DropoutSpec, draw_seed
from tests.harness import run_ranks
from tests.reference import reference_attention

B, H, D = 3, 2, 8


def _bounds(n: int, world_size: int, rank: int) -> slice:
    return slice(n * rank // world_size, n * (rank + 1) // world_size)


def _make_mask(case: str, n: int, world_size: int, gen: torch.Generator) -> torch.Tensor:
    """``[B, N]`` bool mask for a named scenario (True = attend)."""
    if case == "all_true":
        return torch.ones(B, n, dtype=torch.bool)
    if case.startswith("land"):
        land = float(case[4:]) / 100  # fraction of masked pixels, shared by the batch
        return (torch.rand(n, generator=gen) >= land)[None].expand(B, n).contiguous()
    if case == "random":
        return torch.rand(B, n, generator=gen) > 0.5
    if case == "rank1_all_masked":
        mask = torch.rand(B, n, generator=gen) > 0.3
        mask[:, _bounds(n, world_size, min(1, world_size - 1))] = False
        return mask
    if case == "batch_all_masked":
        mask = torch.rand(B, n, generator=gen) > 0.4
        mask[1] = False
        return mask
    raise ValueError(case)


CASES = [
    # (mask scenario, with key bias, bias per head, dropout_p, backend)
    ("all_true", False, False, 0.0, "manual"),
    ("land30", False, False, 0.0, "sdpa"),
    ("land70", True, False, 0.0, "auto"),
    ("random", True, True, 0.0, "manual"),
    ("rank1_all_masked", True, False, 0.0, "manual"),
    ("batch_all_masked", True, True, 0.0, "sdpa"),
    ("random", False, False, 0.25, "manual"),
]


def _masked_cases(rank: int, world_size: int, n: int) -> list[dict]:
    results = []
    for i, (scenario, with_bias, per_head, dropout_p, backend) in enumerate(CASES):
        gen = torch.Generator().manual_seed(1000 * i + n)
        q, k, v, dout = (torch.randn(B, H, n, D, generator=gen, dtype=torch.float64) for _ in range(4))
        mask = _make_mask(scenario, n, world_size, gen)
        bias = torch.randn(B, H, n, generator=gen, dtype=torch.float64) if per_head else \
            torch.randn(B, n, generator=gen, dtype=torch.float64)
        sl = _bounds(n, world_size, rank)

        q_l, k_l, v_l = (t[:, :, sl].clone().requires_grad_() for t in (q, k, v))
        bias_l = bias[..., sl].clone().requires_grad_() if with_bias else None
        torch.manual_seed(7)
        with count_communication() as stats:
            out = ring_attention(q_l, k_l, v_l, backend=backend, dropout_p=dropout_p,
                                 key_mask=mask[:, sl].contiguous(), key_bias=bias_l)
        out.backward(dout[:, :, sl])

        torch.manual_seed(7)
        spec = DropoutSpec(dropout_p, draw_seed()) if dropout_p > 0 else None
        q_r, k_r, v_r = (t.clone().requires_grad_() for t in (q, k, v))
        bias_r = bias.clone().requires_grad_()
        full_bias = bias_r if with_bias else torch.zeros_like(bias_r)
        full_bias = full_bias.masked_fill(~(mask[:, None, :] if per_head else mask), float("-inf"))
        ref = reference_attention(q_r, k_r, v_r, key_bias=full_bias, dropout=spec)
        ref.backward(dout)

        pairs = [(out, ref[:, :, sl]), (q_l.grad, q_r.grad[:, :, sl]),
                 (k_l.grad, k_r.grad[:, :, sl]), (v_l.grad, v_r.grad[:, :, sl])]
        if with_bias:
            pairs.append((bias_l.grad, bias_r.grad[..., sl]))
        err = max(((a.double() - b).abs().max().item() if a.numel() else 0.0) for a, b in pairs)
        finite = all(bool(torch.isfinite(a).all()) for a, _ in pairs)
        kept_keys = int(mask[:, sl].any(0).sum())
        results.append({
            "case": (scenario, with_bias, per_head, dropout_p, backend),
            "err": err,
            "finite": finite,
            "sent": stats.bytes_sent["ring.forward"],
            "calls": stats.calls["ring.forward"],
            "kept_keys": kept_keys,
        })
    return results


@pytest.mark.parametrize("world_size,n", [(1, 17), (2, 25), (3, 31), (4, 30), (5, 23)])
def test_masked_ring_matches_float64_reference(world_size: int, n: int) -> None:
    per_rank = run_ranks(_masked_cases, world_size, n, timeout=90)
    for rank, results in enumerate(per_rank):
        for res in results:
            assert res["finite"], (rank, res)
            assert res["err"] <= 1e-12, (rank, res)


def _bytes_for_masks(rank: int, world_size: int, n: int, land_on_rank0: float) -> dict:
    """Forward bytes sent when rank 0's pixels are ``land_on_rank0`` masked (others unmasked)."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, D, generator=gen) for _ in range(3))
    sl = _bounds(n, world_size, rank)
    mask = torch.ones(1, n, dtype=torch.bool)
    rank0 = _bounds(n, world_size, 0)
    n0 = rank0.stop - rank0.start
    mask[0, rank0.start:rank0.start + int(round(land_on_rank0 * n0))] = False
    with count_communication() as stats:
        ring_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], key_mask=mask[:, sl].contiguous())
    return {"sent": stats.bytes_sent["ring.forward"], "kept": [int(mask[0, _bounds(n, world_size, r)].sum())
                                                                for r in range(world_size)]}


def test_masked_keys_are_not_sent() -> None:
    """Forward traffic equals the closed form 2*B*H*D*itemsize * (keys forwarded by this rank)."""
    world_size, n = 3, 30
    for land in (0.0, 0.3, 0.7, 1.0):
        per_rank = run_ranks(_bytes_for_masks, world_size, n, land, timeout=60)
        kept = per_rank[0]["kept"]
        for rank, res in enumerate(per_rank):
            # rank r forwards the blocks of ranks r, r-1, ..., r-P+2 (P-1 transfers)
            forwarded = sum(kept[(rank - s) % world_size] for s in range(world_size - 1))
            assert res["sent"] == 2 * 1 * 2 * D * 4 * forwarded, (land, rank, res)
        if land == 1.0:
            assert kept[0] == 0
