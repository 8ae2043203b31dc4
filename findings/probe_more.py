"""retain_graph double backward, a rank whose keys are all masked, selective checkpoint policy, with a key bias."""
import sys
import torch
from torch.utils.checkpoint import checkpoint
from hpattn_dist import ring_attention, ulysses_attention, checkpoint_context_fn
from hpattn_dist.strategies import sharded_attention
from hpattn_dist.kernels import DropoutSpec
from tests.harness import run_ranks
from findings.probe_paths import full, shard, ref, err, B, H, D

def run(rank, p, fn, seed, mask_edit=None, twice=False, bh=False, drop=None):
    n = 13
    q, k, v, dout, bias, mask = full(n, n, seed, bh)
    if mask_edit: mask = mask_edit(mask)
    s = shard(n, p, rank)
    ql, kl, vl = (t[..., s, :].clone().requires_grad_() for t in (q, k, v))
    bl = bias[..., s].clone().requires_grad_()
    out = fn(ql, kl, vl, bl, mask[:, s])
    out.backward(dout[..., s, :], retain_graph=twice)
    if twice:
        out.backward(dout[..., s, :])
    f = 2.0 if twice else 1.0
    got = (out.detach(), ql.grad / f, kl.grad / f, vl.grad / f, bl.grad / f)
    return err(got, ref(q, k, v, dout, bias, mask, drop), s, s)

def cases(rank, p):
    R = {}
    def tryit(name, f):
        try: R[name] = f()
        except Exception as e: R[name] = "ERR " + type(e).__name__ + ": " + str(e)[:300]
    for nm, a in (("ring", ring_attention), ("uly", ulysses_attention)):
        fn = lambda q, k, v, b, m, a=a: a(q, k, v, backend="manual", key_bias=b, key_mask=m)
        tryit(f"{nm}_retain_graph_twice", lambda: run(rank, p, fn, 11, twice=True))
        tryit(f"{nm}_retain_graph_twice_bh", lambda: run(rank, p, fn, 12, twice=True, bh=True))
        def allmask(m):
            m = m.clone(); s = shard(13, p, 1); m[:, s] = False; return m
        tryit(f"{nm}_rank1_all_masked", lambda: run(rank, p, fn, 13, mask_edit=allmask))
        tryit(f"{nm}_all_masked_everywhere", lambda: run(rank, p, fn, 14, mask_edit=lambda m: torch.zeros_like(m)))
        fd = lambda q, k, v, b, m, a=a: checkpoint(
            lambda q, k, v, b: a(q, k, v, backend="manual", key_bias=b, key_mask=m, dropout_p=0.2, dropout_seed=9),
            q, k, v, b, use_reentrant=False, context_fn=checkpoint_context_fn)
        tryit(f"{nm}_selective_ckpt_drop", lambda: run(rank, p, fd, 15, drop=DropoutSpec(0.2, 9)))
        tryit(f"{nm}_selective_ckpt_drop_twice", lambda: run(rank, p, fd, 16, drop=DropoutSpec(0.2, 9), twice=True))
        cf = torch.compile(lambda q, k, v, b, m, a=a: a(q, k, v, backend="manual", key_bias=b, key_mask=m), fullgraph=True, backend="aot_eager")
        tryit(f"{nm}_compile_retain_twice", lambda: run(rank, p, cf, 17, twice=True))
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
