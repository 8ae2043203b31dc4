"""One rank differs from its peers in one argument: every rank must raise, none hang."""
import sys
import torch
from hpattn_dist import ring_attention, ulysses_attention
from hpattn_dist.strategies import sharded_attention, auto_attention
from tests.harness import run_ranks

def cases(rank, p):
    R = {}
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    b = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    def tryit(name, f):
        try:
            out = f(); out.sum().backward(); R[name] = "ok"
        except Exception as e: R[name] = "ERR " + type(e).__name__ + ": " + str(e)[:160]
    tryit("bias_on_rank0_only_uly", lambda: ulysses_attention(q, k, v, key_bias=b if rank == 0 else None))
    tryit("bias_on_rank0_only_ring", lambda: ring_attention(q, k, v, key_bias=b if rank == 0 else None))
    tryit("ring_vs_ulysses", lambda: (ring_attention if rank == 0 else ulysses_attention)(q, k, v, key_bias=b))
    tryit("auto_vs_ring", lambda: (ring_attention if rank == 0 else auto_attention)(q, k, v, key_bias=b))
    tryit("cross_flag_rank0", lambda: sharded_attention("ring", q, k, v, cross=(rank == 0), key_bias=b))
    tryit("seed_mismatch", lambda: ring_attention(q, k, v, dropout_p=0.1, dropout_seed=rank + 1, key_bias=b))
    tryit("dropout_p_mismatch", lambda: ring_attention(q, k, v, dropout_p=0.1 * rank, key_bias=b))
    tryit("bias_nograd_rank1_uly", lambda: ulysses_attention(q, k, v, key_bias=b if rank == 0 else b.detach()))
    tryit("window_rank0_only", lambda: sharded_attention("ring", q, k, v, window_nside=1 if rank == 0 else None, key_bias=b))
    tryit("after_all", lambda: ulysses_attention(q, k, v, key_bias=b))
    return R

if __name__ == "__main__":
    res = run_ranks(cases, int(sys.argv[1]), timeout=300.0)
    for name in res[0]:
        print(name); [print("   ", r, rr[name]) for r, rr in enumerate(res)]
