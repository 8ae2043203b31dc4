"""A layer after a call: pickle, deepcopy, a copy called beside the original, against the oracle."""
import sys, pickle, copy, io
import torch
from hpattn_dist import DistributedSpatialSelfAttention
from hpattn_dist.oracle import SpatialSelfAttention
from tests.harness import run_ranks

def cases(rank, p):
    R = {}
    torch.manual_seed(0)
    E, Hh, N = 16, 4, 48
    oracle = SpatialSelfAttention(E, Hh, attn_backend="manual").double()
    x = torch.randn(2, N, E, dtype=torch.float64)
    ref = oracle(x)
    n = N // p; s = slice(rank * n, (rank + 1) * n)
    for strat in ("ring", "ulysses"):
        layer = DistributedSpatialSelfAttention(E, Hh, attn_backend="manual", strategy=strat).double()
        layer.load_state_dict(oracle.state_dict())
        y = layer(x[:, s])
        R[f"{strat}_first"] = (y - ref[:, s]).abs().max().item()
        try:
            blob = pickle.dumps(layer); l2 = pickle.loads(blob)
            R[f"{strat}_pickle"] = (l2(x[:, s]) - ref[:, s]).abs().max().item()
        except Exception as e:
            R[f"{strat}_pickle"] = "ERR " + type(e).__name__ + ": " + str(e)[:200]
        try:
            buf = io.BytesIO(); torch.save(layer, buf); buf.seek(0)
            l3 = torch.load(buf, weights_only=False)
            R[f"{strat}_torchsave"] = (l3(x[:, s]) - ref[:, s]).abs().max().item()
        except Exception as e:
            R[f"{strat}_torchsave"] = "ERR " + type(e).__name__ + ": " + str(e)[:200]
        try:
            l4 = copy.deepcopy(layer)
            with torch.no_grad():
                l4.out_proj.weight.mul_(2)  # a copy that differs must not fool the original's fingerprint
            y4 = l4(x[:, s]); y1 = layer(x[:, s])
            R[f"{strat}_deepcopy_orig_again"] = (y1 - ref[:, s]).abs().max().item()
        except Exception as e:
            R[f"{strat}_deepcopy"] = "ERR " + type(e).__name__ + ": " + str(e)[:200]
    return R

if __name__ == "__main__":
    res = run_ranks(cases, int(sys.argv[1]), timeout=300.0)
    for name in res[0]:
        print(name, [rr[name] for rr in res])
