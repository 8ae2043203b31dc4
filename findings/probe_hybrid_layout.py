"""hybrid_attention over explicit groups the user made (two layouts), with a key bias and dropout:
each rank's shard (WORLD-rank order) against the float64 reference with the global dropout mask."""
import sys
import torch
import torch.distributed as dist
from hpattn_dist import hybrid_attention
from hpattn_dist.kernels import DropoutSpec
from tests.harness import run_ranks
from findings.probe_paths import full, shard, ref, err

def cases(rank, p):
    R = {}
    layouts = {"uly_adjacent": ([[0, 1], [2, 3]], [[0, 2], [1, 3]]),
               "uly_strided": ([[0, 2], [1, 3]], [[0, 1], [2, 3]])}
    for name, (ug, rg) in layouts.items():
        ugs = [dist.new_group(g) for g in ug]; rgs = [dist.new_group(g) for g in rg]
        u = next(g for g, rs in zip(ugs, ug) if rank in rs); r = next(g for g, rs in zip(rgs, rg) if rank in rs)
        for drop in (0.0, 0.3):
            n = 13; q, k, v, dout, bias, mask = full(n, n, 21, True)
            s = shard(n, p, rank, [4, 3, 0, 6])
            ql, kl, vl = (t[..., s, :].clone().requires_grad_() for t in (q, k, v))
            bl = bias[..., s].clone().requires_grad_()
            try:
                out = hybrid_attention(ql, kl, vl, ulysses_group=u, ring_group=r, backend="manual", key_bias=bl,
                                       key_mask=mask[:, s], dropout_p=drop, dropout_seed=7)
                out.backward(dout[..., s, :])
                e = err((out.detach(), ql.grad, kl.grad, vl.grad, bl.grad),
                        ref(q, k, v, dout, bias, mask, DropoutSpec(drop, 7) if drop else None), s, s)
                R[f"{name}_drop{drop}"] = {a: f"{b:.1e}" for a, b in e.items()}
            except Exception as ex:
                R[f"{name}_drop{drop}"] = "ERR " + type(ex).__name__ + ": " + str(ex)[:300]
    return R

if __name__ == "__main__":
    res = run_ranks(cases, 4, timeout=300.0)
    for name in res[0]:
        print(name); [print("   ", r, rr[name]) for r, rr in enumerate(res)]
