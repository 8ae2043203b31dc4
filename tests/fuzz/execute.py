"""Rank side of the fuzzer: run many cases in ONE process group, report each, survive failures.

:func:`fuzz_rank` is the ``run_ranks`` function. For each case it appends a ``("start", i)`` and
then a ``("done", i, outcome)`` record to its own file (so the parent learns everything even if
the rank is killed), then meets its peers at a barrier on a ``FileStore`` of its own: a store
outside the process group, so the barrier cannot pair with a collective a failed case left
behind. When the ranks' outcomes differ (some raised, some returned) or one hit an
:class:`~hpattn_dist.comm.ExchangeError`, the group may hold an unmatched collective: every rank
raises :class:`GroupBroken` and the parent starts a fresh group for the remaining cases. A case
still running after :data:`CASE_LIMIT_S` (a hang outside the library's bounded waits) makes the
rank write its stacks and exit; the parent reports it the same way.

Legend: as in :mod:`tests.fuzz.data`.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import io
import os
import pickle
import threading
import time
import traceback
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from tests.fuzz.data import (
    build_leaves, functional_fields, gen, layer_fields, layer_params,
    local_slice, offsets, x_leaf,
)
from tests.fuzz.space import HANGS

EXCHANGE_TIMEOUT_S = 10.0  # "raise on every rank within 10 s"
HANG_TIMEOUT_S = 2.0  # known hangs (space.HANGS): the outcome is the same, sooner
COMPILE_TIMEOUT_S = 30.0  # a compiled call's first agreement waits for the slowest rank's compile
CASE_LIMIT_S = 90.0  # the watchdog: a compile case on a loaded machine stays far below
HANG_LIMIT_S = 12.0  # the watchdog for known hangs (space.HANGS), some of which no timeout bounds
_BARRIER_S = CASE_LIMIT_S + 30.0


def limits(case: dict) -> tuple[float, float]:
    """``(exchange timeout, watchdog)`` of a case. A known hang fails as soon as a peer gives
    up; a compiled one waits out compile skew (10 s) so that its fix can show as a pass."""
    hangs = case["known_defect"] in HANGS
    if case["family"] == "compile":
        return (EXCHANGE_TIMEOUT_S if hangs else COMPILE_TIMEOUT_S), CASE_LIMIT_S
    return (HANG_TIMEOUT_S, HANG_LIMIT_S) if hangs else (EXCHANGE_TIMEOUT_S, CASE_LIMIT_S)


class GroupBroken(RuntimeError):
    """The process group may hold an unmatched collective after a case: start a new one."""


# --------------------------------------------------------------------------------------------
# The loop


class RankContext:
    """What the cases of one group share: hybrid sub-groups (built once, collectively)."""

    def __init__(self, rank: int, world: int, workdir: str) -> None:
        self.rank, self.world, self.workdir = rank, world, workdir
        self._hybrid: dict[int, Any] = {}

    def build_hybrid(self) -> None:
        from hpattn_dist.mesh import build_hybrid_groups

        for u in range(1, self.world + 1):
            if self.world % u == 0 and self.world > 1:
                self._hybrid[u] = build_hybrid_groups(None, u)

    def hybrid(self, u: int):
        return self._hybrid[u]


def fuzz_rank(rank: int, world: int, cases: list[dict], workdir: str, attempt: int) -> int:
    """Run ``cases`` in order; see the module docstring. Returns the number of cases run."""
    import warnings

    from hpattn_dist.comm import set_exchange_timeout

    warnings.simplefilter("ignore")  # kernel fallbacks warn once per call site: noise here
    store = dist.FileStore(os.path.join(workdir, f"barrier{attempt}"), world)
    records = open(os.path.join(workdir, f"rank{rank}.records"), "ab")  # noqa: SIM115
    ctx = RankContext(rank, world, workdir)
    if not any(c.get("isolated") for c in cases):
        ctx.build_hybrid()
    for case in cases:
        i = case["index"]
        _write(records, ("start", i))
        timeout, limit = limits(case)
        set_exchange_timeout(timeout)
        watchdog = threading.Timer(limit, _hung, (records, i, limit))
        watchdog.daemon = True
        watchdog.start()
        outcome = run_case(case, rank, world, ctx)
        _write(records, ("done", i, outcome))
        store.set(f"{i}/{rank}", _summary(outcome))
        store.wait([f"{i}/{r}" for r in range(world)], datetime.timedelta(seconds=_BARRIER_S))
        watchdog.cancel()
        summaries = {store.get(f"{i}/{r}").decode() for r in range(world)}
        if len(summaries) > 1 or any(s.startswith("raised:ExchangeError") for s in summaries):
            raise GroupBroken(f"case {case['id']}: ranks ended differently ({sorted(summaries)}); "
                              "the group may hold an unmatched collective")
    records.close()
    return len(cases)


def _summary(outcome: dict) -> str:
    return "ok" if outcome["status"] == "ok" else f"raised:{outcome['type']}"


def _write(f: io.BufferedWriter, record: tuple) -> None:
    f.write(pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL))
    f.flush()


def _hung(records: io.BufferedWriter, index: int, limit: float) -> None:
    buf = io.StringIO()
    with open(records.name + ".stacks", "w+") as f:
        faulthandler.dump_traceback(file=f, all_threads=True)
        f.seek(0)
        buf.write(f.read())
    _write(records, ("hung", index, f"still running after {limit:g} s; stacks:\n{buf.getvalue()}"))
    os._exit(86)


def run_case(case: dict, rank: int, world: int, ctx: RankContext) -> dict:
    """One case on this rank: ``{"status": "ok", "result": ...}`` or the exception raised."""
    start = time.monotonic()
    try:
        with _piece_bytes(case.get("piece_bytes")):
            result = _RUNNERS[case["family"]](case, rank, world, ctx)
        return {"status": "ok", "result": result, "seconds": time.monotonic() - start}
    except Exception as err:  # noqa: BLE001 - every exception is an outcome to judge
        return {"status": "raised", "type": type(err).__name__, "message": str(err),
                "traceback": traceback.format_exc(limit=-8), "seconds": time.monotonic() - start}


@contextlib.contextmanager
def _piece_bytes(size: Optional[int]):
    """The local executor's CPU piece size set to ``size`` for one case, forward and backward
    (Note [fused local draws] in :mod:`.space`); None leaves it."""
    from hpattn_dist.local import execute

    if size is None:
        yield
        return
    saved = execute.CPU_CALL_BYTES
    execute.CPU_CALL_BYTES = size
    try:
        yield
    finally:
        execute.CPU_CALL_BYTES = saved


def _mine(case: dict, rank: int) -> Optional[dict]:
    p = case.get("perturb")
    return p if p is not None and p["rank"] == rank else None


# --------------------------------------------------------------------------------------------
# Functional families: attn, cross, local, nonfinite


def _call_functional(case: dict, strategy: str, q, k, v, ctx: RankContext, **kw) -> Tensor:
    from hpattn_dist import (
        healpix_local_attention, hybrid_attention, ring_attention, ring_cross_attention, ulysses_attention,
    )
    from hpattn_dist.strategies import auto_attention, sharded_attention

    family = case.get("base", case["family"])
    u = case.get("U", 1) if strategy == "hybrid" else None
    if family == "attn":
        if strategy == "ring":
            return ring_attention(q, k, v, **kw)
        if strategy == "ulysses":
            return ulysses_attention(q, k, v, **kw)
        if strategy == "auto":
            return auto_attention(q, k, v, **kw)
        if case.get("entry") == "functional" and ctx.world > 1 and u in ctx._hybrid:
            groups = ctx.hybrid(u)
            return hybrid_attention(q, k, v, ulysses_group=groups.ulysses_group, ring_group=groups.ring_group, **kw)
        return sharded_attention("hybrid", q, k, v, ulysses_degree=u, **kw)
    if family == "cross":
        window = {"window_nside": case["window"], "mode": case["mode"]} if case["window"] else {}
        if strategy == "ring":
            return ring_cross_attention(q, k, v, **window, **kw)
        return sharded_attention(strategy, q, k, v, cross=True, ulysses_degree=u, **window, **kw)
    if family == "local":
        if case["entry"] == "local":
            return healpix_local_attention(q, k, v, window_nside=case["window"], mode=case["mode"], **kw)
        return sharded_attention(strategy, q, k, v, window_nside=case["window"], mode=case["mode"],
                                 ulysses_degree=u, **kw)
    raise AssertionError(family)


def run_functional(case: dict, rank: int, world: int, ctx: RankContext) -> dict:
    fields = functional_fields(case)
    pert = _mine(case, rank)
    kind = pert["kind"] if pert else None
    cross = case.get("base", case["family"]) == "cross"
    q_b = offsets(case["sizes"])[rank]
    k_b = offsets(case["ksizes"] if cross else case["sizes"])[rank]
    values = {"q": local_slice(fields["q"], q_b, 2), "k": local_slice(fields["k"], k_b, 2),
              "v": local_slice(fields["v"], k_b, 2)}
    dtype = getattr(torch, case["dtype"])
    device = "cpu"
    lay_case = case
    if kind == "dtype":
        dtype = torch.float32 if dtype == torch.float64 else torch.float64
    elif kind == "meta":
        device = "meta"
    elif kind in ("heads", "batch", "head_dim"):
        g = gen(pert["seed"])
        for r, t in values.items():
            b, h, n, d = t.shape
            shape = (b + (kind == "batch"), h + (kind == "heads"), n, d + (kind == "head_dim"))
            values[r] = torch.randn(*shape, generator=g, dtype=torch.float64)
        lay_case = {**case, "layout": {r: "contig" for r in "qkv"}}
    elif kind == "layout":
        lay_case = {**case, "layout": pert["layout"]}
    grads = case["grads"]
    if kind == "partial_grad":
        grads = "q"
    elif kind == "frozen":
        grads = ""
    leaves, views, _ = build_leaves(values, lay_case, dtype, device, grads)
    if case["hook"] and views["q"].requires_grad:
        views["q"].register_hook(lambda g: g * 2.0)

    mask = local_slice(fields["mask"], k_b, 1)
    if kind == "mask_one_rank":
        mask = torch.ones(values["k"].shape[0], values["k"].shape[2], dtype=torch.bool) if mask is None else None
    bias = local_slice(fields["bias"], k_b, -1)
    if bias is not None:
        bias = bias.to(dtype).clone().requires_grad_(case["bias_grad"] and kind not in ("partial_grad", "frozen"))
    if device == "meta":
        mask = None if mask is None else mask.to("meta")
        bias = None if bias is None else bias.detach().to("meta")
    kw = {"backend": case["backend"], "dropout_p": case["dropout_p"], "scale": case["scale"],
          "key_mask": mask, "key_bias": bias, "dropout_seed": case["dropout_seed"]}
    strategy = case.get("strategy", "ring")
    if kind == "scale":
        kw["scale"] = (case["scale"] or case["d"] ** -0.5) * 1.5
    elif kind == "strategy":
        strategy = pert["strategy"]
    elif kind == "backend":
        kw["backend"] = pert["backend"]
    elif kind == "dropout_p":
        kw["dropout_p"] = round(case["dropout_p"] + 0.2, 3)
    elif kind == "dropout_seed":
        kw["dropout_seed"] = (pert["seed"] % (2**31 - 1))
    elif kind in ("window", "mode"):
        case = {**case, kind: pert[kind]}
    torch.manual_seed(case["rng_seed"])
    no_grad = case["no_grad"] or kind == "no_grad_mode"
    with torch.no_grad() if no_grad else contextlib.nullcontext():
        out = _call_functional(case, strategy, views["q"], views["k"], views["v"], ctx, **kw)
    if out.requires_grad:
        if case["loss"] == "weighted":
            (out * local_slice(fields["w"], q_b, 2).to(out.dtype)).sum().backward()
        else:
            out.sum().backward()
    return {"out": out.detach(), "grads": _leaf_grads(leaves, lay_case),
            "bias_grad": None if bias is None or bias.grad is None else bias.grad,
            "needs": {n: t.requires_grad for n, t in leaves.items()}, "backward": out.requires_grad}


def _leaf_grads(leaves: dict[str, Tensor], case: dict) -> dict[str, Any]:
    """Each leaf's gradient as the parent compares it (Note [fuzz layouts]): role layouts mapped
    to the view's ``[B, H, n, D]`` (plus the largest |gradient| outside the view), shared and
    expanded leaves as they are."""
    from tests.fuzz.data import layout_of

    out = {}
    for name, leaf in leaves.items():
        g = leaf.grad
        lay = layout_of(case, name[0]) if name in "qkv" else "packed"
        if lay in ("alias_qk", "alias_qkv"):
            lay = case["layout"]["q"]
        out[name] = None if g is None else map_grad(g, lay)
    return out


def map_grad(g: Tensor, lay: str) -> tuple[Tensor, float]:
    """``(gradient of the view, max |gradient| of the leaf outside the view)``."""
    if lay == "strided":
        spare = g[..., 1::2]
        return g[..., ::2], float(spare.abs().max()) if spare.numel() else 0.0
    if lay == "transposed":
        return g.transpose(2, 3), 0.0
    if lay == "heads_last":
        return g.transpose(1, 2), 0.0
    return g, 0.0  # contig, expanded ([1, H, n, D]), packed ([B, n, 3|2, H, D])


# --------------------------------------------------------------------------------------------
# Layer families: layer, layer_cross, layer_local, ckpt, compile


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))``, then ``+ mlp(norm2(.))``, the MLP with a dropout."""

    def __init__(self, attn: nn.Module, e: int, p: float) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(e), attn, nn.LayerNorm(e)
        self.mlp = nn.Sequential(nn.Linear(e, 2 * e), nn.GELU(), nn.Dropout(p), nn.Linear(2 * e, e))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def build_layer(case: dict, strategy: Optional[str] = None) -> nn.Module:
    """The distributed layer (or block) of ``case`` with :func:`layer_params`, float64."""
    from hpattn_dist import (
        DistributedLocalSpatialSelfAttention, DistributedSpatialCrossAttention, DistributedSpatialSelfAttention,
    )

    strategy = strategy or case["strategy"]
    u = case.get("U", 1) if strategy == "hybrid" else None
    common = {"dropout": case["attn_dropout"], "bias": case["bias_params"], "attn_backend": case["backend"]}
    e, h = case["e"], case["h"]
    if case["family"] == "layer_cross":
        window = {"window_nside": case["window"], "mode": case["mode"]} if case["window"] else {}
        layer = DistributedSpatialCrossAttention(e, h, kv_dim=case["kv_dim"], **common, strategy=strategy,
                                                 ulysses_degree=u, healpix_field=case["healpix_field"], **window)
    elif case["family"] == "layer_local":
        layer = DistributedLocalSpatialSelfAttention(e, h, **common, window_nside=case["window"], mode=case["mode"])
    else:
        layer = DistributedSpatialSelfAttention(e, h, **common, strategy=strategy, ulysses_degree=u,
                                                healpix_field=case["healpix_field"])
    module = Block(layer, e, case.get("mlp_dropout", 0.0)) if case.get("block") else layer
    module = module.double()
    params = layer_params(case)
    with torch.no_grad():
        for name, p in module.named_parameters():
            key = name[len("attn."):] if case.get("block") and name.startswith("attn.") else name
            p.copy_(params[key])
    return module


def _perturb_layer(module: nn.Module, case: dict, pert: dict) -> None:
    layer = module.attn if case.get("block") else module
    kind = pert["kind"]
    if kind == "scale":
        layer.scale = layer.scale * 1.5
    elif kind == "backend":
        layer.attn_backend = pert["backend"]
    elif kind == "weights":
        with torch.no_grad():
            p = layer.out_proj.weight
            p.view(-1)[pert["seed"] % p.numel()] += 0.5
    elif kind == "weights_permuted":
        with torch.no_grad():
            if pert["seed"] % 2 and case["e"] > 1:  # (a 1 x 1 weight is its own transpose)
                w = layer.out_proj.weight
                w.copy_(w.t().clone())
            else:
                proj = layer.kv_proj if case["family"] == "layer_cross" else layer.qkv_proj
                e = case["e"]
                w = proj.weight
                first, second = w[:e].clone(), w[e:2 * e].clone()
                w[:e], w[e:2 * e] = second, first
    elif kind == "train_eval":
        layer.train(not case["train"])
    elif kind == "window":
        layer.window_nside = pert["window"]
    elif kind == "mode":
        layer.mode = pert["mode"]
    elif kind == "frozen":
        for p in module.parameters():
            p.requires_grad_(False)


def run_layer(case: dict, rank: int, world: int, ctx: RankContext) -> dict:
    from torch.utils.checkpoint import checkpoint

    from hpattn_dist import checkpoint_context_fn

    pert = _mine(case, rank)
    kind = pert["kind"] if pert else None
    fields = layer_fields(case)
    strategy = case["strategy"]
    if kind == "strategy":
        strategy = pert["strategy"]
    module = build_layer(case, strategy)
    module.train(case["train"])
    dtype = getattr(torch, case["dtype"])
    device = "cpu"
    x_dtype = dtype
    if kind == "dtype_layer":
        dtype = x_dtype = torch.float32 if dtype == torch.float64 else torch.float64
    elif kind == "dtype_input":
        x_dtype = torch.float32 if dtype == torch.float64 else torch.float64
    elif kind == "meta_layer":
        device = "meta"
    module = module.to(dtype=dtype, device=device)
    if pert:
        _perturb_layer(module, case, pert)
    q_b = offsets(case["sizes"])[rank]
    x_full = fields["x"]
    if kind == "batch":
        x_full = torch.randn(case["b"] + 1, case["n"], case["e"], generator=gen(pert["seed"]), dtype=torch.float64)
    x_local = x_full if kind == "full_field" else local_slice(x_full, q_b, 1)
    x_layout = case["x_layout"]
    if kind == "x_layout":
        x_layout = pert["x_layout"]
    leaf, x, _ = x_leaf(x_local, x_layout, x_dtype, device, case["x_grad"] and kind != "frozen")
    mask = kv_leaf = key_bias = None
    args: tuple = (x,)
    if case["family"] == "layer_cross":
        k_b = offsets(case["ksizes"])[rank]
        if case["kv_is_q"]:
            args = (x, x)
        else:
            kv_leaf = local_slice(fields["x_kv"], k_b, 1).to(device=device, dtype=x_dtype).clone()
            kv_leaf.requires_grad_(case["x_grad"] and kind != "frozen")
            args = (x, kv_leaf)
        if fields["mask"] is not None:
            mask = local_slice(fields["mask"], k_b, 1).to(device)
        if fields["bias"] is not None:
            key_bias = local_slice(fields["bias"], k_b, -1).to(device=device, dtype=x_dtype).clone()
            key_bias.requires_grad_(case["kbias_grad"] and kind != "frozen")
    elif fields["mask"] is not None:
        mask = (fields["mask"] if kind == "full_field" else local_slice(fields["mask"], q_b, 1)).to(device)
        if kind == "batch":
            mask = torch.ones(case["b"] + 1, mask.shape[1], dtype=torch.bool)
    layer = module.attn if case.get("block") else module
    hook = case.get("hook")
    if hook == "forward":
        layer.register_forward_hook(lambda m, i, o: o * 2.0)
    elif hook == "pre":
        layer.register_forward_pre_hook(lambda m, a: (a[0] * 0.5, *a[1:]))
    fn = module
    if case["family"] == "compile":
        from torch import _dynamo

        _dynamo.reset()
        fn = torch.compile(module, backend=case["compiler"])
    torch.manual_seed(case["rng_seed"])
    no_grad = case["no_grad"] or kind == "no_grad_mode"
    with torch.no_grad() if no_grad else contextlib.nullcontext():
        if case["family"] == "ckpt":
            ckpt_kw = {"context_fn": checkpoint_context_fn} if case["checkpoint"] == "policy" else {}
            y = checkpoint(fn, x, use_reentrant=False, preserve_rng_state=True, **ckpt_kw)
        else:
            kw = {"key_mask": mask} if mask is not None else {}
            if key_bias is not None:
                kw["key_bias"] = key_bias
            y = fn(*args, **kw)
    if hook == "output" and y.requires_grad:
        y.register_hook(lambda g: g * 3.0)
    if y.requires_grad:
        if case["loss"] == "weighted":
            (y * local_slice(fields["w"], q_b, 1).to(device=device, dtype=y.dtype)).sum().backward()
        else:
            y.sum().backward()
    x_grad = None if leaf.grad is None else _x_grad(leaf.grad, x_layout)
    return {"out": y.detach(), "x_grad": x_grad,
            "kv_grad": None if kv_leaf is None or kv_leaf.grad is None else kv_leaf.grad,
            "bias_grad": None if key_bias is None or key_bias.grad is None else key_bias.grad,
            "param_grads": {n: None if p.grad is None else p.grad for n, p in module.named_parameters()},
            "backward": y.requires_grad}


def _x_grad(g: Tensor, lay: str) -> tuple[Tensor, float]:
    if lay == "strided":
        spare = g[..., ::2]
        return g[..., 1::2], float(spare.abs().max()) if spare.numel() else 0.0
    if lay == "transposed":
        return g.transpose(1, 2), 0.0
    return g, 0.0


# --------------------------------------------------------------------------------------------
# idx-flow, grad_sync, reinit


def idx_flow_model(case: dict) -> tuple[nn.Module, int, int]:
    """``(model in float64 with its lazy parameters created, N_in, N_out)``."""
    import idx_flow

    from tests.fuzz.tables import table

    torch.manual_seed(case["data_seed"] % 1000)
    model_kind, c = case["model"], case["c_in"]
    n = case["n"]
    if model_kind == "conv":
        idx, _ = table(2, 1, 4)
        model: nn.Module = idx_flow.SpatialConv(12, idx, filters=3)
    elif model_kind == "conv_bn":
        idx, _ = table(2, 2, 7)
        model = nn.Sequential(idx_flow.SpatialConv(48, idx, filters=3, bias=False), idx_flow.SpatialBatchNorm(3))
    elif model_kind == "transformer":
        model = idx_flow.SpatialTransformerBlock(c, 2, mlp_ratio=2.0, attn_backend="manual")
    elif model_kind == "vit":  # patch embedding nside 4 -> 2, one transformer block, a head
        idx, _ = table(4, 2, 4)
        model = idx_flow.SpatialViT(48, idx, embed_dim=4, depth=1, num_heads=2, mlp_ratio=2.0, output_dim=2,
                                    attn_backend="manual")
    else:  # pool_up
        down, _ = table(2, 1, 4)
        up, up_d = table(1, 2, 4)
        model = nn.Sequential(idx_flow.SpatialPooling(12, down, pool_type="max"),
                              idx_flow.SpatialUpsampling(48, up, up_d, interpolation="idw"))
    with torch.no_grad():
        n_out = model.eval()(torch.zeros(1, n, c)).shape[1]
    model = model.double()
    g = gen(case["data_seed"] + 3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model, n, n_out


def idx_flow_out_bounds(case: dict, n_out: int, world: int) -> list[tuple[int, int]]:
    """Each rank's output rows: ``shard_bounds(N_out, P)`` after an index-gather layer; a model
    of attention and per-pixel layers keeps its input's split."""
    from hpattn_dist.healpix import shard_bounds

    return offsets(case["sizes"]) if case["model"] == "transformer" else shard_bounds(n_out, world)


def idx_flow_fields(case: dict, n: int, n_out: int, c_out: int) -> tuple[Tensor, Tensor]:
    g = gen(case["data_seed"])
    return (torch.randn(case["b"], n, case["c_in"], generator=g, dtype=torch.float64),
            torch.randn(case["b"], n_out, c_out, generator=g, dtype=torch.float64))


def run_idx_flow(case: dict, rank: int, world: int, ctx: RankContext) -> dict:
    from hpattn_dist.integrations.idx_flow import convert_model

    model, n, n_out = idx_flow_model(case)
    convert_model(model, strategy=case["strategy"])
    pert = _mine(case, rank)
    model.train(case["train"] if not (pert and pert["kind"] == "bn_train_eval") else not case["train"])
    a, b = offsets(case["sizes"])[rank]
    c, d = idx_flow_out_bounds(case, n_out, world)[rank]
    x_full, _ = idx_flow_fields(case, n, n_out, 1)
    x = x_full[:, a:b].clone().requires_grad_(True)
    y = model(x)
    _, w = idx_flow_fields(case, n, n_out, y.shape[-1])
    (y * w[:, c:d]).sum().backward()
    return {"out": y.detach(), "x_grad": x.grad,
            "param_grads": {k: p.grad for k, p in model.named_parameters()},
            "buffers": {k: t.clone() for k, t in model.named_buffers() if t.is_floating_point()}}


def grad_sync_grads(case: dict, rank: int) -> list[Tensor]:
    g = gen(case["data_seed"] + 101 * rank)
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in case["shapes"]]


def run_grad_sync(case: dict, rank: int, world: int, ctx: RankContext) -> dict:
    from hpattn_dist.grad_sync import sync_gradients

    dtype = getattr(torch, case["dtype"])
    pert = _mine(case, rank)
    kind = pert["kind"] if pert else None
    params = [nn.Parameter(torch.zeros(*s, dtype=dtype)) for s in case["shapes"]]
    for p, g in zip(params, grad_sync_grads(case, rank)):
        p.grad = g.to(dtype)
    if kind == "grad_requires_grad":
        params[0].requires_grad_(False)
    elif kind == "grad_dtype":
        other = torch.float32 if dtype == torch.float64 else torch.float64
        params[0] = nn.Parameter(params[0].detach().to(other))
        params[0].grad = grad_sync_grads(case, rank)[0].to(other)
    elif kind == "grad_none":
        params[0].grad = None
    elif kind == "grad_extra_param":
        extra = nn.Parameter(torch.zeros(2, dtype=dtype))
        extra.grad = torch.ones(2, dtype=dtype)
        params.append(extra)
    sync_gradients(params)
    return {"grads": [None if p.grad is None else p.grad for p in params[:len(case["shapes"])]]}


def reinit_model(case: dict) -> nn.Module:
    """A halo-exchanging convolution and a transformer block on nside 2 (idx-flow, float64)."""
    import idx_flow

    from tests.fuzz.tables import table

    torch.manual_seed(case["data_seed"] % 1000)
    idx, _ = table(2, 2, 7)
    model = nn.Sequential(idx_flow.SpatialConv(48, idx, filters=4),
                          idx_flow.SpatialTransformerBlock(4, 2, mlp_ratio=2.0, attn_backend="manual"))
    with torch.no_grad():
        model.eval()(torch.zeros(1, 48, 4))
    return model.double()


def run_reinit(case: dict, rank: int, world: int, ctx: RankContext) -> dict:
    """Build and call, destroy the default group, init a new one, call again (float64)."""
    from hpattn_dist import DistributedSpatialSelfAttention

    torch.manual_seed(case["data_seed"] % 1000)
    if case["kind"] == "hybrid_layer":
        model: nn.Module = DistributedSpatialSelfAttention(4, 2, attn_backend="manual", strategy="hybrid",
                                                           ulysses_degree=2, healpix_field=False).double()
        n = 10
    else:
        from hpattn_dist.integrations.idx_flow import convert_model

        model = convert_model(reinit_model(case))
        n = 48
    x_full = torch.randn(2, n, 4, generator=gen(case["data_seed"]), dtype=torch.float64)
    a, b = offsets([n // world + (r < n % world) for r in range(world)])[rank]
    outs = [model(x_full[:, a:b]).detach()]
    dist.destroy_process_group()
    dist.init_process_group("gloo", init_method="file://" + os.path.join(ctx.workdir, f"reinit{case['index']}"),
                            rank=rank, world_size=world)
    outs.append(model(x_full[:, a:b]).detach())
    return {"outs": outs, "params": {k: p.detach() for k, p in model.named_parameters()}, "n": n}


_RUNNERS = {
    "attn": run_functional, "cross": run_functional, "local": run_functional, "nonfinite": run_functional,
    "layer": run_layer, "layer_cross": run_layer, "layer_local": run_layer, "ckpt": run_layer,
    "compile": run_layer, "idx_flow": run_idx_flow, "grad_sync": run_grad_sync, "reinit": run_reinit,
}

__all__ = ["GroupBroken", "fuzz_rank", "run_case"]
