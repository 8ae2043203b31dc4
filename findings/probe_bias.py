"""Adversarial probes of key_bias through the registered ops (world 2/3, gloo, float64)."""
import sys, traceback
import torch
import torch.distributed as dist
from hpattn_dist import ring_attention, ulysses_attention
from hpattn_dist.strategies import sharded_attention
from tests.harness import run_ranks
from tests.reference import reference_attention

B, H, D = 2, 6, 8
NINF = float("-inf")

def data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = {x: torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for x in ("q", "k", "v", "dout")}
    d["bias"] = torch.randn(B, n, generator=g, dtype=torch.float64)
    d["biash"] = torch.randn(B, H, n, generator=g, dtype=torch.float64)
    mask = torch.rand(B, n, generator=g) > 0.3
    mask[0, :3] = False
    d["mask"] = mask
    return d

def sizes_of(n, p, sizes=None):
    return sizes or [n // p + (1 if r < n % p else 0) for r in range(p)]

def run_case(rank, p, c):
    n = c["n"]; sizes = sizes_of(n, p, c.get("sizes")); d = data(n, c.get("seed", 0))
    off = sum(sizes[:rank]); sl = slice(off, off + sizes[rank])
    for key, fn in c.get("edit", {}).items():
        d[key] = fn(d[key])
    q, k, v = (d[x][:, :, sl].clone().requires_grad_(c.get("qkv_grad", lambda r: True)(rank)) for x in "qkv")
    bias_full = d[c.get("bkind", "bias")]
    bias_loc = bias_full[..., sl].clone()
    make = c.get("make_bias")  # (rank, bias_loc) -> (leaf, bias_arg)
    leaf, barg = make(rank, bias_loc) if make else (bias_loc.requires_grad_(), None)
    barg = leaf if barg is None else barg
    kw = dict(backend="manual", key_bias=barg)
    kw.update(c.get("kw", {}))
    if c.get("use_mask"): kw["key_mask"] = d["mask"][:, sl]
    out = c["fn"](q, k, v, **kw)
    if not out.requires_grad:
        return dict(out=out.detach(), dq=None, dk=None, dv=None, dbias=None)
    if out.requires_grad: out.backward(d["dout"][:, :, sl])
    lg = None if (leaf is None or not leaf.requires_grad) else c.get("gmap", lambda g: g)(leaf.grad)
    return dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad, dbias=lg)

def ranks(rank, p, names, sizes):
    res = {}
    for name in names:
        c = dict(CASES[name], sizes=sizes)
        try:
            res[name] = run_case(rank, p, c)
        except Exception as e:
            res[name] = "ERR " + type(e).__name__ + ": " + str(e)[:300]
    return res

def reference(c, p):
    d = data(c["n"], c.get("seed", 0))
    for key, fn in c.get("edit", {}).items():
        d[key] = fn(d[key])
    bias = d[c.get("bkind", "bias")]
    if "ref_bias" in c: bias = c["ref_bias"](bias)
    q, k, v = (d[x].clone().requires_grad_() for x in "qkv")
    b = bias.clone().requires_grad_()
    bb = b
    if c.get("use_mask"):
        m = d["mask"]
        bb = b.masked_fill(~(m if b.dim() == 2 else m[:, None, :]), NINF)
    drop = None
    if c.get("kw", {}).get("dropout_p"):
        from hpattn_dist.kernels import DropoutSpec
        drop = DropoutSpec(c["kw"]["dropout_p"], c["kw"]["dropout_seed"])
    out = reference_attention(q, k, v, key_bias=bb, dropout=drop)
    out.backward(torch.where(torch.isnan(out), 0.0, 1.0) * d["dout"])
    return dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad, dbias=c.get("rgmap", lambda g: g)(b.grad))

def compare(c, p, res):
    sizes = sizes_of(c["n"], p, c.get("sizes")); ref = reference(c, p)
    if any(isinstance(r[c["name"]], str) for r in res):
        return "ERRORS: " + " | ".join(str(r[c["name"]])[:200] if isinstance(r[c["name"]], str) else "ok" for r in res)
    worst = {}
    for key in ("out", "dq", "dk", "dv", "dbias"):
        parts = [r[c["name"]][key] for r in res]
        if key in ("dq", "dk", "dv") and any(x is None for x in parts):
            worst[key] = "None on %s" % [i for i, x in enumerate(parts) if x is None]; continue
        if key == "dbias":
            if any(x is None for x in parts):
                worst[key] = "None on ranks %s" % [i for i, x in enumerate(parts) if x is None]
                parts = [x for x in parts if x is not None]
                continue
        got = torch.cat(parts, dim=-1 if key == "dbias" else 2)
        exp = ref[key]
        if key != "out":
            nanrows = torch.isnan(ref["out"]).any(-1)
            if nanrows.any():
                worst[key] = "skip(nan rows)"; continue
        same_nan = (torch.isnan(got) == torch.isnan(exp)).all().item()
        diff = (torch.nan_to_num(got, nan=0.) - torch.nan_to_num(exp, nan=0.)).abs().max().item()
        worst[key] = f"{diff:.1e}" + ("" if same_nan else " NAN-MISMATCH")
    return worst

def rank1_only(rank, b):
    return (b.requires_grad_(rank == 0), None)

CASES = {}
def add(name, **c):
    c["name"] = name; CASES[name] = c

for strat, fn in (("uly", ulysses_attention), ("ring", ring_attention)):
    add(f"{strat}_grad_rank0_only", n=13, fn=fn, make_bias=lambda r, b: (b.requires_grad_(r == 0), None))
    add(f"{strat}_bhn_transposed", n=13, fn=fn, bkind="biash",
        gmap=lambda g: g.transpose(1, 2), make_bias=lambda r, b: (lambda base: (base, base.transpose(1, 2)))(b.transpose(1, 2).contiguous().requires_grad_()))
    add(f"{strat}_bn_expanded_to_bhn", n=13, fn=fn, bkind="bias", ref_bias=lambda b: b[:, None, :].expand(B, H, -1), rgmap=lambda g: g.sum(1),
        make_bias=lambda r, b: (lambda base: (base, base[:, None, :].expand(B, H, -1)))(b.requires_grad_()))
    add(f"{strat}_bn_strided", n=13, fn=fn, gmap=lambda g: g[:, ::2] + 1e3 * g[:, 1::2].abs(),
        make_bias=lambda r, b: (lambda base: (base, base[:, ::2]))(torch.repeat_interleave(b, 2, dim=1).detach().requires_grad_()))
    add(f"{strat}_ninf_nan_bias", n=13, fn=fn,
        edit={"bias": lambda b: b.index_put((torch.tensor([0, 0, 1]), torch.tensor([1, 7, 3])), torch.tensor([NINF, float('nan'), NINF], dtype=torch.float64))})
    add(f"{strat}_inf_k_excluded", n=13, fn=fn,
        edit={"bias": lambda b: b.index_put((torch.tensor([0, 1]), torch.tensor([5, 11])), torch.tensor([NINF, NINF], dtype=torch.float64)),
              "k": lambda k: k.index_put((torch.tensor([0, 1]), torch.tensor([2, 0]), torch.tensor([5, 11]), torch.tensor([0, 3])), torch.tensor([float('inf'), float('nan')], dtype=torch.float64)),
              "v": lambda v: v.index_put((torch.tensor([0]), torch.tensor([1]), torch.tensor([5]), torch.tensor([2])), torch.tensor([float('inf')], dtype=torch.float64))})
    add(f"{strat}_f32_bias_rank1", n=13, fn=fn, ref_bias=lambda b: b,
        edit={"bias": lambda b: b.float().double()},
        make_bias=lambda r, b: (b.float().requires_grad_() if r == 1 else b.requires_grad_(), None))
    add(f"{strat}_shape_mix", n=13, fn=fn, bkind="biash",
        make_bias=lambda r, b: (b.requires_grad_() if r == 0 else b[:, 0].contiguous().requires_grad_(), None))
    add(f"{strat}_empty_shard", n=13, fn=fn, sizes=None)
    add(f"{strat}_bias_only_grad", n=13, fn=fn, qkv_grad=lambda r: False, use_mask=True)
    add(f"{strat}_rank1_bias_only_rank0_nothing", n=13, fn=fn, qkv_grad=lambda r: False,
        make_bias=lambda r, b: (b.requires_grad_(r == 1), None))
    add(f"{strat}_masked_nonfinite", n=13, fn=fn, use_mask=True,
        edit={"bias": lambda b: b.index_put((torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2])), torch.tensor([float('nan'), float('inf'), NINF], dtype=torch.float64)),
              "k": lambda k: k.index_put((torch.tensor([0, 0]), torch.tensor([0, 3]), torch.tensor([1, 2]), torch.tensor([0, 3])), torch.tensor([float('inf'), float('nan')], dtype=torch.float64))})
    add(f"{strat}_mask_drop", n=13, fn=fn, use_mask=True, kw=dict(dropout_p=0.3, dropout_seed=123))
    add(f"{strat}_mask_drop_bhn", n=13, fn=fn, bkind="biash", use_mask=True, kw=dict(dropout_p=0.3, dropout_seed=77))

def main(p):
    cases = {k: v for k, v in CASES.items()}
    if p == 3:
        for k in list(cases):
            cases[k] = dict(cases[k], sizes=[7, 0, 6])
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else list(cases)
    res = run_ranks(ranks, p, names, [7, 0, 6] if p == 3 else None, timeout=240.0)
    cases = {n: cases[n] for n in names}
    for name, c in cases.items():
        print(p, name, compare(c, p, res))

if __name__ == "__main__":
    # cases hold lambdas: run via fork harness? lambdas are not picklable, so case table is rebuilt on ranks
    main(int(sys.argv[1]))
