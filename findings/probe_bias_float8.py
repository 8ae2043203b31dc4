"""A float8 key bias (q, k, v float64): raise together, compute right, or hang?"""
import torch
from hpattn_dist import ring_attention, ulysses_attention
from tests.harness import run_ranks, attempt

def cases(rank, p):
    x = torch.randn(1, 2, 6, 4, dtype=torch.float64)
    b = torch.randn(1, 6).to(torch.float8_e4m3fn)
    return {fn.__name__: attempt(lambda: fn(x, x, x, key_bias=b, backend="manual"))
            for fn in (ring_attention, ulysses_attention)}

if __name__ == "__main__":
    for r in run_ranks(cases, 2, timeout=60.0):
        print({k: (v or "ok")[:200] for k, v in r.items()})
