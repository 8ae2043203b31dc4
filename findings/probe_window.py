"""Windowed attention (self and cross) with a key bias: grad on one rank only, [B,H,N] bias, empty shard, inf K excluded."""
import sys
import torch
from hpattn_dist import healpix_local_attention, ring_cross_attention
from hpattn_dist.local.oracle import window_mask
from tests.harness import run_ranks
from tests.reference import reference_attention
from findings.probe_paths import full, shard, err

def run(rank, p, nside_q, nside_k, wn, mode, seed, bh=False, grad=True, sq=None, sk=None, inf_k=False):
    nq, nk = 12 * nside_q**2, 12 * nside_k**2
    q, k, v, dout, bias, mask = full(nq, nk, seed, bh)
    if inf_k:
        k[0, 1, 5, 2] = float("inf"); bias[..., 5] = float("-inf")
        v[1, 0, 9, 0] = float("nan"); mask[1, 9] = False
    qs, ks = shard(nq, p, rank, sq), shard(nk, p, rank, sk)
    ql, kl, vl = (t[..., s, :].clone().requires_grad_() for t, s in ((q, qs), (k, ks), (v, ks)))
    bl = bias[..., ks].clone().requires_grad_(grad)
    if nside_q == nside_k and sq == sk:
        out = healpix_local_attention(ql, kl, vl, window_nside=wn, mode=mode, backend="manual", key_bias=bl, key_mask=mask[:, ks])
    else:
        out = ring_cross_attention(ql, kl, vl, window_nside=wn, mode=mode, backend="manual", key_bias=bl, key_mask=mask[:, ks])
    out.backward(dout[..., qs, :])
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v)); b = bias.clone().requires_grad_()
    bb = b.masked_fill(~(mask if b.dim() == 2 else mask[:, None]), float("-inf"))
    ro = reference_attention(qq, kk, vv, key_bias=bb, allowed=window_mask(nside_q, wn, mode, key_nside=nside_k))
    ro.backward(dout)
    return err((out.detach(), ql.grad, kl.grad, vl.grad, bl.grad if grad else None),
               (ro.detach(), qq.grad, kk.grad, vv.grad, b.grad), qs, ks)

def cases(rank, p):
    R = {}
    def tryit(name, f):
        try: R[name] = f()
        except Exception as e: R[name] = "ERR " + type(e).__name__ + ": " + str(e)[:300]
    tryit("local_grad_rank0", lambda: run(rank, p, 2, 2, 1, "neighbourhood", 1, grad=(rank == 0)))
    tryit("local_bh_empty", lambda: run(rank, p, 2, 2, 1, "cell", 2, bh=True, sq=[48, 0], sk=[48, 0]))
    tryit("local_inf_excluded", lambda: run(rank, p, 2, 2, 1, "neighbourhood", 3, inf_k=True))
    tryit("cross_bh_grad_rank1", lambda: run(rank, p, 1, 2, 1, "neighbourhood", 4, bh=True, grad=(rank == 1), sq=[12, 0], sk=[5, 43]))
    tryit("cross_inf_excluded", lambda: run(rank, p, 2, 4, 2, "cell", 5, inf_k=True))
    return R

if __name__ == "__main__":
    res = run_ranks(cases, int(sys.argv[1]), timeout=400.0)
    for name in res[0]:
        print(name)
        for r, rr in enumerate(res):
            v = rr[name]
            if isinstance(v, dict): v = {k: (None if x is None else f"{x:.1e}") for k, x in v.items()}
            print("   rank", r, v)
