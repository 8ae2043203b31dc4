"""Probes: compile / checkpoint / autocast / cross U>1 / hybrid explicit groups, each with a key bias.
Every rank compares its own shard to the float64 reference on the full tensors."""
import sys, traceback
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint
from hpattn_dist import ring_attention, ulysses_attention, hybrid_attention, ring_cross_attention
from hpattn_dist.strategies import sharded_attention
from hpattn_dist.mesh import build_hybrid_groups
from hpattn_dist.kernels import DropoutSpec
from tests.harness import run_ranks
from tests.reference import reference_attention

B, H, D = 2, 4, 8

def full(nq, nk, seed, bh=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, nq, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, H, nk, D, generator=g, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(B, H, nq, D, generator=g, dtype=torch.float64)
    bias = torch.randn(*((B, H, nk) if bh else (B, nk)), generator=g, dtype=torch.float64)
    mask = torch.rand(B, nk, generator=g) > 0.3
    mask[0, :2] = False
    return q, k, v, dout, bias, mask

def shard(n, p, r, sizes=None):
    sizes = sizes or [n // p + (1 if i < n % p else 0) for i in range(p)]
    o = sum(sizes[:r]); return slice(o, o + sizes[r])

def ref(q, k, v, dout, bias, mask, drop=None, scale=None):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v)); b = bias.clone().requires_grad_()
    bb = b if mask is None else b.masked_fill(~(mask if b.dim() == 2 else mask[:, None]), float("-inf"))
    out = reference_attention(q, k, v, key_bias=bb, dropout=drop, scale=scale)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad, b.grad

def err(got, exp, qs, ks):
    names = ("out", "dq", "dk", "dv", "dbias")
    slices = (qs, qs, ks, ks, ks)
    res = {}
    for nm, g, e, s in zip(names, got, exp, slices):
        if g is None: res[nm] = None; continue
        e = e[..., s, :] if e.dim() == 4 else e[..., s]
        res[nm] = (g.double() - e).abs().max().item() if g.numel() else 0.0
    return res

def run_one(rank, p, fn, nq, nk, seed, bh=False, grad_bias=True, use_mask=True, sizes_q=None, sizes_k=None,
            dtype=torch.float64, drop=None, ctx=None):
    q, k, v, dout, bias, mask = full(nq, nk, seed, bh)
    qs, ks = shard(nq, p, rank, sizes_q), shard(nk, p, rank, sizes_k)
    ql, kl, vl = (t[..., s, :].to(dtype).clone().requires_grad_() for t, s in ((q, qs), (k, ks), (v, ks)))
    bl = bias[..., ks].clone().requires_grad_(grad_bias)
    ml = mask[:, ks] if use_mask else None
    out = fn(ql, kl, vl, bl, ml)
    out.backward(dout[..., qs, :].to(out.dtype))
    got = (out.detach(), ql.grad, kl.grad, vl.grad, bl.grad if grad_bias else None)
    exp = ref(q, k, v, dout, bias, mask if use_mask else None, drop)
    return err(got, exp, qs, ks)

def cases(rank, p):
    R = {}
    def tryit(name, f):
        try:
            R[name] = f()
        except Exception as e:
            R[name] = "ERR " + type(e).__name__ + ": " + str(e)[:400]
    uly = lambda q, k, v, b, m: ulysses_attention(q, k, v, backend="manual", key_bias=b, key_mask=m)
    if p == 2:
        for be in ("aot_eager", "inductor"):
            cf = torch.compile(uly, fullgraph=True, backend=be)
            tryit(f"compile_{be}_bias_grad_rank0_only", lambda: run_one(rank, p, cf, 13, 13, 1, grad_bias=(rank == 0)))
            tryit(f"compile_{be}_empty_shard_bh", lambda: run_one(rank, p, cf, 13, 13, 2, bh=True, sizes_q=[13, 0], sizes_k=[13, 0]))
        for reentrant in (False, True):
            def ck(q, k, v, b, m, reentrant=reentrant):
                return checkpoint(lambda q, k, v, b: ulysses_attention(q, k, v, backend="manual", key_bias=b, key_mask=m,
                                                                       dropout_p=0.25, dropout_seed=5), q, k, v, b,
                                  use_reentrant=reentrant)
            tryit(f"checkpoint_reentrant{reentrant}_drop", lambda: run_one(rank, p, ck, 13, 13, 3, drop=DropoutSpec(0.25, 5)))
            def ck_noseed(q, k, v, b, m, reentrant=reentrant):
                torch.manual_seed(99)
                return checkpoint(lambda q, k, v, b: ring_attention(q, k, v, backend="manual", key_bias=b, key_mask=m,
                                                                    dropout_p=0.25), q, k, v, b, use_reentrant=reentrant)
            def expected_seed():
                from hpattn_dist.kernels import draw_seed
                torch.manual_seed(99); return draw_seed()
            try:
                s = expected_seed()
                tryit(f"checkpoint_reentrant{reentrant}_ring_drop_noseed", lambda: run_one(rank, p, ck_noseed, 13, 13, 3, drop=DropoutSpec(0.25, s)))
            except Exception as e:
                R["draw_seed"] = repr(e)
        def cross_uly(bh, sq, sk):
            f = lambda q, k, v, b, m: sharded_attention("ulysses", q, k, v, cross=True, backend="manual", key_bias=b, key_mask=m)
            return run_one(rank, p, f, 11, 17, 4, bh=bh, sizes_q=sq, sizes_k=sk)
        tryit("cross_uly_bn", lambda: cross_uly(False, None, None))
        tryit("cross_uly_bhn_uneven", lambda: cross_uly(True, [11, 0], [3, 14]))
        def ac(q, k, v, b, m):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return ulysses_attention(q, k, v, key_bias=b, key_mask=m)
        tryit("autocast_bf16_uly_f32in", lambda: run_one(rank, p, ac, 13, 13, 5, dtype=torch.float32))
        def ac_ring(q, k, v, b, m):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return ring_attention(q, k, v, key_bias=b, key_mask=m)
        tryit("autocast_bf16_ring_f32in", lambda: run_one(rank, p, ac_ring, 13, 13, 5, dtype=torch.float32))
    if p == 4:
        groups = build_hybrid_groups(None, 2)
        hy = lambda q, k, v, b, m: hybrid_attention(q, k, v, ulysses_group=groups.ulysses_group, ring_group=groups.ring_group,
                                                     backend="manual", key_bias=b, key_mask=m)
        tryit("hybrid_explicit_bn", lambda: run_one(rank, p, hy, 13, 13, 6))
        tryit("hybrid_explicit_bhn_empty", lambda: run_one(rank, p, hy, 13, 13, 7, bh=True, sizes_q=[5, 0, 4, 4], sizes_k=[5, 0, 4, 4]))
        tryit("hybrid_explicit_grad_rank2_only", lambda: run_one(rank, p, hy, 13, 13, 8, grad_bias=(rank == 2)))
        cx = lambda q, k, v, b, m: sharded_attention("hybrid", q, k, v, ulysses_degree=2, cross=True, backend="manual",
                                                     key_bias=b, key_mask=m)
        tryit("cross_hybrid_bhn", lambda: run_one(rank, p, cx, 9, 15, 9, bh=True, sizes_q=[3, 3, 0, 3], sizes_k=[1, 6, 4, 4]))
    return R

if __name__ == "__main__":
    p = int(sys.argv[1])
    res = run_ranks(cases, p, timeout=500.0)
    for name in res[0]:
        print(name)
        for r, rr in enumerate(res):
            v = rr[name]
            if isinstance(v, dict):
                v = {k: (None if x is None else f"{x:.1e}") for k, x in v.items()}
            print("   rank", r, v)
