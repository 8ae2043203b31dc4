"""Ranks whose dropout_p differ below one part per million pass the agreement (dropout_ppm) and each
rank then drops with its own p: the shards are not those of any one single-device model."""
import sys
import torch
from hpattn_dist import ring_attention, ulysses_attention
from hpattn_dist.kernels import DropoutSpec
from tests.harness import run_ranks
from tests.reference import reference_attention
from findings.probe_paths import full, shard

P0 = 0.3

def cases(rank, p):
    R = {}
    for name, fn in (("ring", ring_attention), ("ulysses", ulysses_attention)):
        n = 13; q, k, v, dout, bias, mask = full(n, n, 31)
        s = shard(n, p, rank)
        dp = P0 if rank == 0 else P0 + 4e-7  # e.g. a rate computed by float arithmetic on each rank
        try:
            out = fn(q[..., s, :], k[..., s, :], v[..., s, :], backend="manual", dropout_p=dp, dropout_seed=3)
            exp = reference_attention(q, k, v, dropout=DropoutSpec(P0, 3))[..., s, :]
            R[name] = f"{(out - exp).abs().max().item():.1e}"
        except Exception as e:
            R[name] = "ERR " + type(e).__name__ + ": " + str(e)[:200]
    return R

if __name__ == "__main__":
    res = run_ranks(cases, 2, timeout=200.0)
    for name in res[0]:
        print(name, [rr[name] for rr in res])
