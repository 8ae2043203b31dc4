"""Parent side of the fuzzer: the float64 single-device reference of each case, and the verdict.

References are independent of the code under test: :func:`tests.reference.reference_attention`
and :func:`tests.local_reference.reference_local_attention` (windows from healpy), projections
and norms from ``torch.nn.functional`` on the parameters of :func:`tests.fuzz.data.layer_params`,
and idx-flow's own unconverted model. Dropout masks come from ``tests/reference.py``'s definition;
the seed a call draws is rank 0's first ``randint`` after ``torch.manual_seed(case["rng_seed"])``
(:func:`~tests.fuzz.data.default_generator_seed_draw`).

A verdict is ``(ok, reason, worst)``: ``worst`` is the largest error over the allowed error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from tests.fuzz.data import (
    build_leaves, default_generator_seed_draw, functional_fields, gen, layer_fields, layer_params, local_slice,
    offsets,
)
from tests.fuzz.execute import (
    grad_sync_grads, idx_flow_fields, idx_flow_model, idx_flow_out_bounds, map_grad,
    limits, reinit_model,
)
from tests.local_reference import healpy_cross_window_mask, healpy_window_mask, reference_local_attention
from tests.reference import reference_attention

TOLERANCE = {"float64": 1e-10, "float32": 5e-5}
"""max |error| / max(1, max |reference|), per dtype."""

_UNCLEAR = ("ExchangeError", "DistBackendError", "KeyError", "AttributeError", "IndexError", "AssertionError")


@dataclass
class Verdict:
    ok: bool
    reason: str = ""
    worst: float = 0.0


def judge(case: dict, outcomes: list[dict]) -> Verdict:
    """The verdict on ``case`` from every rank's outcome (``status``: ok, raised, hung, crashed)."""
    world = case["world"]
    bad = [r for r, o in enumerate(outcomes) if o["status"] not in ("ok", "raised")]
    if bad:
        r = bad[0]
        return Verdict(False, f"rank {r} {outcomes[r]['status']}: {outcomes[r].get('message', '')[:3000]}")
    raised = [r for r, o in enumerate(outcomes) if o["status"] == "raised"]
    if raised and len(raised) < world:
        shown = "; ".join(f"rank {r}: {outcomes[r]['type']}: {outcomes[r]['message'][:400]}" for r in raised)
        return Verdict(False, f"only ranks {raised} of {world} raised ({shown})")
    if raised:
        if case["expect"] == "exact":
            o = outcomes[0]
            return Verdict(False, f"expected an exact result, every rank raised {o['type']}: {o['message'][:600]}"
                           f"\n{o.get('traceback', '')[-1500:]}")
        return _clear_raise(case, outcomes)
    if case["expect"] == "raise":
        return Verdict(False, f"expected every rank to raise ({case['match']!r}), every rank returned")
    try:
        return _COMPARE[case["family"]](case, [o["result"] for o in outcomes])
    except Exception as err:  # noqa: BLE001 - a malformed result is a failed case
        import traceback

        return Verdict(False, f"could not compare the results: {type(err).__name__}: {err}\n"
                       + traceback.format_exc(limit=-4))


def _clear_raise(case: dict, outcomes: list[dict]) -> Verdict:
    for r, o in enumerate(outcomes):
        if o["type"] in _UNCLEAR:
            return Verdict(False, f"rank {r} raised {o['type']} (not a clear error): {o['message'][:600]}")
        if case["match"] and not re.search(case["match"], o["message"], re.IGNORECASE):
            return Verdict(False, f"rank {r}'s error does not name the problem ({case['match']!r}): "
                           f"{o['type']}: {o['message'][:600]}")
        if o["seconds"] > limits(case)[0] + 1.0:
            return Verdict(False, f"rank {r} raised after {o['seconds']:.1f} s (> {limits(case)[0]:g} s)")
    return Verdict(True, f"raised on every rank: {outcomes[0]['type']}: {outcomes[0]['message'][:200]}")


# --------------------------------------------------------------------------------------------
# Comparison helpers


class _Errors:
    def __init__(self, case: dict) -> None:
        self.tol = TOLERANCE[case.get("dtype", "float64")]
        self.worst, self.first_bad = 0.0, ""
        self.nonfinite = bool(case.get("nonfinite"))

    def add(self, name: str, got: Optional[Tensor], want: Tensor) -> None:
        want = want.detach().double()
        got = torch.zeros_like(want) if got is None else got.detach().double()
        if tuple(got.shape) != tuple(want.shape):
            self._bad(name, f"shape {tuple(got.shape)}, reference {tuple(want.shape)}", float("inf"))
            return
        if self.nonfinite or not bool(torch.isfinite(want).all()):
            for test in (torch.isnan, torch.isposinf, torch.isneginf):
                if not torch.equal(test(got), test(want)):
                    self._bad(name, f"{test.__name__} pattern differs: {int(test(got).sum())} vs reference "
                              f"{int(test(want).sum())} of {want.numel()}", float("inf"))
                    return
            keep = torch.isfinite(want)
            got, want = got[keep], want[keep]
        if want.numel() == 0:
            return
        err = float((got - want).abs().max() / want.abs().max().clamp_min(1.0))
        if not err <= self.tol:  # NaN fails
            self._bad(name, f"error {err:.3g} > {self.tol:g}", err / self.tol if err == err else float("inf"))
        else:
            self.worst = max(self.worst, err / self.tol)

    def check_zero(self, name: str, value: float) -> None:
        if value != 0.0:
            self._bad(name, f"gradient outside the view: max |g| = {value:.3g}", float("inf"))

    def _bad(self, name: str, text: str, ratio: float) -> None:
        self.worst = max(self.worst, ratio)
        if not self.first_bad:
            self.first_bad = f"{name}: {text}"

    def verdict(self) -> Verdict:
        return Verdict(not self.first_bad, self.first_bad, self.worst)


def _rounded(t: Optional[Tensor], dtype: str) -> Optional[Tensor]:
    """The float64 values a rank holds after casting to ``dtype``."""
    return None if t is None else t.to(getattr(torch, dtype)).double()


def _key_bias(mask: Optional[Tensor], bias: Optional[Tensor]) -> Optional[Tensor]:
    if mask is None:
        return bias
    if bias is None:
        return torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    # A masked key is excluded whatever its bias holds (+inf + -inf would be NaN).
    return bias.masked_fill(~(mask if bias.dim() == 2 else mask[:, None, :]), float("-inf"))


def _dropout_seed(case: dict, rank0_seed: Optional[int]) -> int:
    return rank0_seed if rank0_seed is not None else default_generator_seed_draw(case["rng_seed"])


def _quiet_ranks(case: dict) -> set[int]:
    """Ranks that ran no backward by design (their loss rows are zero in the reference)."""
    p = case.get("perturb")
    return {p["rank"]} if p and p["kind"] in ("frozen", "no_grad_mode") else set()


# --------------------------------------------------------------------------------------------
# Functional families


def compare_functional(case: dict, results: list[dict]) -> Verdict:
    from hpattn_dist.kernels import DropoutSpec

    fields = functional_fields(case)
    dt = case["dtype"]
    family = case.get("base", case["family"])
    cross = family == "cross"
    q_bounds = offsets(case["sizes"])
    k_bounds = offsets(case["ksizes"] if cross else case["sizes"])
    pert = case.get("perturb")
    mask = fields["mask"]
    if pert and pert["kind"] == "mask_one_rank" and mask is not None:
        mask = mask.clone()
        a, b = k_bounds[pert["rank"]]
        mask[:, a:b] = True
    values = {r: _rounded(fields[r], dt) for r in "qkv"}
    leaves, views, _ = build_leaves(values, case, torch.float64)
    if case["hook"]:
        views["q"].register_hook(lambda g: g * 2.0)
    bias = _rounded(fields["bias"], dt)
    if bias is not None:
        bias.requires_grad_(True)
    seed0 = case["dropout_seed"]
    if pert and pert["kind"] == "dropout_seed" and pert["rank"] == 0:
        seed0 = pert["seed"] % (2**31 - 1)
    spec = DropoutSpec(case["dropout_p"], _dropout_seed(case, seed0)) if case["dropout_p"] > 0 else None
    key_bias = _key_bias(mask, bias)
    if family == "attn":
        ref = reference_attention(views["q"], views["k"], views["v"], scale=case["scale"], key_bias=key_bias,
                                  dropout=spec)
    else:
        if family == "local":
            allowed = healpy_window_mask(case["nside"], case["window"], case["mode"])
        elif case["window"]:
            allowed = healpy_cross_window_mask(case["nside_q"], case["nside_k"], case["window"], case["mode"])
        else:
            allowed = torch.ones(case["n"], case["nk"], dtype=torch.bool)
        ref = reference_local_attention(views["q"], views["k"], views["v"], allowed, key_bias=key_bias,
                                        dropout=spec, scale=case["scale"])
    errors = _Errors(case)
    for r, res in enumerate(results):
        errors.add(f"out rank {r}", res["out"], local_slice(ref, q_bounds[r], 2))
    backward = any(res["backward"] for res in results)
    if not backward or case["no_grad"] or not bool(torch.isfinite(ref).all()):
        # (the gradients flowing from a non-finite row are not specified: Note [non-finite inputs])
        return errors.verdict()
    dout = fields["w"].clone() if case["loss"] == "weighted" else torch.ones_like(fields["w"])
    quiet = _quiet_ranks(case)
    for r in quiet:
        a, b = q_bounds[r]
        dout[:, :, a:b] = 0
    (ref * dout).sum().backward()
    for name, leaf in leaves.items():
        lay = _leaf_layout(case, name)
        want, _ = map_grad(leaf.grad, lay)
        pixel_dim = 1 if lay == "packed" else 2
        bounds = k_bounds if name[0] in "kv" else q_bounds
        for r, res in enumerate(results):
            if r in quiet or not res["needs"].get(name, False):
                continue
            got = res["grads"][name]
            errors.add(f"grad {name} rank {r}", None if got is None else got[0],
                       local_slice(want, bounds[r], pixel_dim))
            if got is not None:
                errors.check_zero(f"grad {name} rank {r}", got[1])
    if bias is not None and case["bias_grad"]:
        for r, res in enumerate(results):
            if r not in quiet and not (pert and pert["kind"] == "partial_grad" and pert["rank"] == r):
                errors.add(f"key_bias grad rank {r}", res["bias_grad"], local_slice(bias.grad, k_bounds[r], -1))
    return errors.verdict()


def _leaf_layout(case: dict, name: str) -> str:
    lay = case["layout"]
    if name not in "qkv":
        return "packed"
    shared = lay.get("shared")
    if shared == "alias_qkv" or (shared == "alias_qk" and name in "qk"):
        return lay["q"]
    if shared == "packed" and name in lay.get("packed_roles", "qkv"):
        return "packed"
    return lay[name]


# --------------------------------------------------------------------------------------------
# Layer families


def _self_attention_ref(case: dict, p: dict[str, Tensor], x: Tensor, x_kv: Optional[Tensor],
                        key_bias: Optional[Tensor], spec: Any) -> Tensor:
    """The layer's function on the full field in float64, from its parameters."""
    b, n, e = x.shape
    h = case["h"]
    d = e // h
    if case["family"] == "layer_cross":
        nk = x_kv.shape[1]
        q = F.linear(x, p["q_proj.weight"], p.get("q_proj.bias")).reshape(b, n, h, d).transpose(1, 2)
        kv = F.linear(x_kv, p["kv_proj.weight"], p.get("kv_proj.bias")).reshape(b, nk, 2, h, d)
        k, v = (t.transpose(1, 2) for t in kv.unbind(2))
    else:
        qkv = F.linear(x, p["qkv_proj.weight"], p.get("qkv_proj.bias")).reshape(b, n, 3, h, d)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    if case["family"] == "layer_local":
        allowed = healpy_window_mask(case["nside"], case["window"], case["mode"])
        out = reference_local_attention(q, k, v, allowed, key_bias=key_bias, dropout=spec)
    elif case["family"] == "layer_cross" and case["window"]:
        nside_q, nside_k = round((n / 12) ** 0.5), round((x_kv.shape[1] / 12) ** 0.5)
        allowed = healpy_cross_window_mask(nside_q, nside_k, case["window"], case["mode"])
        out = reference_local_attention(q, k, v, allowed, key_bias=key_bias, dropout=spec)
    else:
        out = reference_attention(q, k, v, key_bias=key_bias, dropout=spec)
    return F.linear(out.transpose(1, 2).reshape(b, n, e), p["out_proj.weight"], p.get("out_proj.bias"))


def _mlp_masks(case: dict, world: int) -> Optional[Tensor]:
    """The MLP dropout's mask ``[B, N, 2E]`` (scaled keep mask) as the ranks drew it: each rank
    seeds the default generator with ``rng_seed``, the attention draws its seed proposal (when it
    drops), then ``nn.Dropout`` draws on the rank's ``[B, N_r, 2E]``."""
    p = case.get("mlp_dropout", 0.0)
    if not p:
        return None
    dtype = getattr(torch, case["dtype"])
    state = torch.get_rng_state()
    parts = []
    try:
        for n_r in case["sizes"]:
            torch.manual_seed(case["rng_seed"])
            if case["attn_dropout"] > 0:
                torch.randint(0, 2**31 - 1, (1,))
            parts.append(F.dropout(torch.ones(case["b"], n_r, 2 * case["e"], dtype=dtype), p, True).double())
    finally:
        torch.set_rng_state(state)
    return torch.cat(parts, dim=1)


def compare_layer(case: dict, results: list[dict]) -> Verdict:
    from hpattn_dist.kernels import DropoutSpec

    dt = case["dtype"]
    fields = layer_fields(case)
    params = {k: _rounded(v, dt).requires_grad_(True) for k, v in layer_params(case).items()}
    q_bounds = offsets(case["sizes"])
    k_bounds = offsets(case.get("ksizes", case["sizes"]))
    x_leaf = _rounded(fields["x"][:1] if case["x_layout"] == "expanded" else fields["x"], dt).requires_grad_(True)
    x = x_leaf.expand(fields["x"].shape)
    x_kv = None if fields["x_kv"] is None else _rounded(fields["x_kv"], dt).requires_grad_(True)
    if case.get("kv_is_q"):
        x_kv = x
    bias = None if fields["bias"] is None else _rounded(fields["bias"], dt).requires_grad_(True)
    train = case["train"]
    spec = None
    if train and case["attn_dropout"] > 0:
        spec = DropoutSpec(case["attn_dropout"], default_generator_seed_draw(case["rng_seed"]))
    attn_in = x
    if case.get("hook") == "pre":
        attn_in = x * 0.5
    if case.get("block"):
        e = case["e"]
        h1 = F.layer_norm(x, (e,), params["norm1.weight"], params["norm1.bias"])
        y = x + _self_attention_ref(case, params, h1, None, None, spec)
        h2 = F.layer_norm(y, (e,), params["norm2.weight"], params["norm2.bias"])
        m = F.gelu(F.linear(h2, params["mlp.0.weight"], params["mlp.0.bias"]))
        masks = _mlp_masks(case, case["world"])
        if masks is not None:
            m = m * masks
        y = y + F.linear(m, params["mlp.3.weight"], params["mlp.3.bias"])
    else:
        y = _self_attention_ref(case, params, attn_in, x_kv, _key_bias(fields["mask"], bias), spec)
    if case.get("hook") == "forward":
        y = y * 2.0
    if case.get("hook") == "output":
        y.register_hook(lambda g: g * 3.0)
    errors = _Errors(case)
    for r, res in enumerate(results):
        errors.add(f"out rank {r}", res["out"], local_slice(y, q_bounds[r], 1))
    if case["no_grad"] or not any(res["backward"] for res in results):
        return errors.verdict()
    dout = fields["w"].clone() if case["loss"] == "weighted" else torch.ones_like(fields["w"])
    quiet = _quiet_ranks(case)
    for r in quiet:
        a, b = q_bounds[r]
        dout[:, a:b] = 0
    (y * dout).sum().backward()
    for r, res in enumerate(results):
        if r in quiet or not case["x_grad"]:
            continue
        got = res["x_grad"]
        errors.add(f"x grad rank {r}", None if got is None else got[0], local_slice(x_leaf.grad, q_bounds[r], 1))
        if got is not None:
            errors.check_zero(f"x grad rank {r}", got[1])
        if x_kv is not None and not case.get("kv_is_q"):
            errors.add(f"x_kv grad rank {r}", res["kv_grad"], local_slice(x_kv.grad, k_bounds[r], 1))
    for r, res in enumerate(results):
        if bias is not None and case["kbias_grad"] and r not in quiet:
            errors.add(f"key_bias grad rank {r}", res["bias_grad"], local_slice(bias.grad, k_bounds[r], -1))
    for name, p in params.items():
        key = f"attn.{name}" if case.get("block") and not name.startswith(("norm", "mlp")) else name
        total = None
        for r, res in enumerate(results):
            g = res["param_grads"].get(key)
            if r in quiet or g is None:
                continue
            total = g.double() if total is None else total + g.double()
        errors.add(f"param grad {key} (sum over ranks)", total, p.grad)
    return errors.verdict()


# --------------------------------------------------------------------------------------------
# idx-flow, grad_sync, reinit


def compare_idx_flow(case: dict, results: list[dict]) -> Verdict:
    model, n, n_out = idx_flow_model(case)
    model.train(case["train"])
    x_full, _ = idx_flow_fields(case, n, n_out, 1)
    x = x_full.clone().requires_grad_(True)
    y = model(x)
    _, w = idx_flow_fields(case, n, n_out, y.shape[-1])
    (y * w).sum().backward()
    errors = _Errors(case)
    out_bounds = idx_flow_out_bounds(case, n_out, case["world"])
    in_bounds = offsets(case["sizes"])
    for r, res in enumerate(results):
        errors.add(f"out rank {r}", res["out"], local_slice(y, out_bounds[r], 1))
        errors.add(f"x grad rank {r}", res["x_grad"], local_slice(x.grad, in_bounds[r], 1))
        for name, buf in model.named_buffers():
            if buf.is_floating_point():
                errors.add(f"buffer {name} rank {r}", res["buffers"].get(name), buf)
    for name, p in model.named_parameters():
        grads = [res["param_grads"].get(name) for res in results]
        total = sum(g.double() for g in grads if g is not None) if any(g is not None for g in grads) else None
        errors.add(f"param grad {name} (sum over ranks)", total, p.grad)
    return errors.verdict()


def compare_grad_sync(case: dict, results: list[dict]) -> Verdict:
    dtype = getattr(torch, case["dtype"])
    pert = case.get("perturb")
    errors = _Errors(case)
    for i in range(len(case["shapes"])):
        want = sum(grad_sync_grads(case, r)[i].to(dtype).double() for r in range(case["world"])
                   if not (pert and pert["kind"] == "grad_none" and r == pert["rank"] and i == 0))
        for r, res in enumerate(results):
            errors.add(f"grad {i} rank {r}", res["grads"][i], want)
    return errors.verdict()


def compare_reinit(case: dict, results: list[dict]) -> Verdict:
    errors = _Errors(case)
    n = results[0]["n"]
    x = torch.randn(2, n, 4, generator=gen(case["data_seed"]), dtype=torch.float64)
    bounds = offsets([n // case["world"] + (r < n % case["world"]) for r in range(case["world"])])
    if case["kind"] == "hybrid_layer":
        params = results[0]["params"]
        ref = _self_attention_ref({"family": "layer", "h": 2}, params, x, None, None, None)
    else:
        with torch.no_grad():
            ref = reinit_model(case)(x)
    for r, res in enumerate(results):
        for i, out in enumerate(res["outs"]):
            errors.add(f"out {'after' if i else 'before'} re-init rank {r}", out, local_slice(ref, bounds[r], 1))
    return errors.verdict()


_COMPARE = {
    "attn": compare_functional, "cross": compare_functional, "local": compare_functional,
    "nonfinite": compare_functional, "layer": compare_layer, "layer_cross": compare_layer,
    "layer_local": compare_layer, "ckpt": compare_layer, "compile": compare_layer,
    "idx_flow": compare_idx_flow, "grad_sync": compare_grad_sync, "reinit": compare_reinit,
}
