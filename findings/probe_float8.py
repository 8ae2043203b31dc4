"""float8 inputs: check_qkv accepts them (floating point), dtype_code maps every float8 to 0 ("other"),
so two ranks with different float8 formats agree on dtype; on CPU the kernels then raise
NotImplementedError per rank. Does any rank hang (an empty shard skips the failing reduction)?"""
import sys
import torch
from hpattn_dist import ring_attention, ulysses_attention
from tests.harness import run_ranks, attempt

def cases(rank, p):
    R = {}
    x = torch.randn(1, 2, 6, 4)
    dt = {"same": (torch.float8_e4m3fn, torch.float8_e4m3fn), "mixed": (torch.float8_e4m3fn, torch.float8_e5m2)}
    for name, dts in dt.items():
        for empty in (False, True):
            n = 0 if (empty and rank == 1) else 6
            q = x[:, :, :n].to(dts[rank])
            for fn in (ring_attention, ulysses_attention):
                R[f"{fn.__name__}_{name}_empty{empty}"] = attempt(lambda: fn(q, q, q))
    return R

if __name__ == "__main__":
    res = run_ranks(cases, 2, timeout=120.0)
    for name in res[0]:
        print(name, [str(rr[name])[:200] for rr in res])
