"""The fuzzer's inputs, built alike on the ranks and in the parent from a case's numbers.

Every tensor of a case is a function of ``case["data_seed"]``: the full fields in float64, which
each rank slices and the parent's reference reads whole. Layouts turn values into the tensors a
user would pass (Note [fuzz layouts]); parameters of the layer families are drawn here too, so the
parent never builds the module under test.

Note [fuzz layouts]
~~~~~~~~~~~~~~~~~~~
A layout builds, from values ``[B, H, n, D]``, a LEAF tensor (what gets ``.grad``) and the VIEW
passed to the library: ``contig`` (the leaf itself), ``strided`` (``leaf[..., ::2]`` of a
``[B, H, n, 2D]`` leaf), ``transposed`` (a ``[B, H, D, n]`` leaf viewed as ``[B, H, n, D]``),
``heads_last`` (a ``[B, n, H, D]`` leaf, the projections' layout), ``expanded`` (a ``[1, H, n, D]``
leaf expanded over B: the values are generated constant over B). Shared buffers: ``alias_qk``
(q is k), ``alias_qkv`` (q is k is v), ``packed`` (q, k, v, or k and v, views of one
``[B, n, 3|2, H, D]`` leaf). The parent builds the SAME layout on the full field, so rank and
reference leaves are compared directly, concatenated along their pixel dim (the unused half of a
strided leaf must get a zero gradient too).

Legend: B batch, H heads, N / Nk pixels (queries / keys), n a shard's pixels, D head dim,
E embed dim, P ranks.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

ROLE_LAYOUTS = ("contig", "strided", "transposed", "heads_last", "expanded")
SHARED_LAYOUTS = ("alias_qk", "alias_qkv", "packed")

# Pixel dim of each layout's leaf.
_PIXEL_DIM = {"contig": 2, "strided": 2, "transposed": 3, "heads_last": 1, "expanded": 2, "packed": 1}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def default_generator_seed_draw(rng_seed: int) -> int:
    """The dropout seed a call draws from the default generator just after
    ``torch.manual_seed(rng_seed)``: Note [position-keyed dropout] (one 31-bit ``randint``)."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=gen(rng_seed)).item())


def offsets(sizes: list[int]) -> list[tuple[int, int]]:
    out, acc = [], 0
    for s in sizes:
        out.append((acc, acc + s))
        acc += s
    return out


# --------------------------------------------------------------------------------------------
# Layouts


def layout_of(case: dict, role: str) -> str:
    """The layout of role ``q``, ``k`` or ``v`` (a shared layout names the buffer)."""
    lay = case["layout"]
    shared = lay.get("shared")
    if shared == "alias_qkv" or (shared == "alias_qk" and role in "qk"):
        return shared
    if shared == "packed" and role in lay.get("packed_roles", "qkv"):
        return "packed"
    return lay[role]


def build_leaves(values: dict[str, Tensor], case: dict, dtype: torch.dtype, device: str = "cpu",
                 grads: str = "qkv") -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, int]]:
    """``(leaves, views, pixel_dims)`` for roles q, k, v of ``values`` ``[B, H, n, D]`` (float64).

    Leaves are named after the roles they carry (``"q"`` for q is k, ``"kv"`` for packed k and
    v); a leaf requires grad when one of its roles is in ``grads`` (set before its views are taken).
    """
    leaves: dict[str, Tensor] = {}
    views: dict[str, Tensor] = {}
    dims: dict[str, int] = {}
    lay = case["layout"]
    shared = lay.get("shared")
    if shared in ("alias_qk", "alias_qkv"):
        roles = "qkv" if shared == "alias_qkv" else "qk"
        leaf, view = _role_leaf(values["q"], lay["q"], dtype, device, any(r in grads for r in roles))
        leaves["q"], dims["q"] = leaf, _PIXEL_DIM[lay["q"]]
        for r in roles:
            views[r] = view
    elif shared == "packed":
        roles = lay.get("packed_roles", "qkv")
        stacked = torch.stack([values[r] for r in roles], dim=0)  # [3|2, B, H, n, D]
        leaf = stacked.permute(1, 3, 0, 2, 4).contiguous().to(device=device, dtype=dtype)  # [B, n, 3, H, D]
        leaf.requires_grad_(any(r in grads for r in roles))
        name = roles
        leaves[name], dims[name] = leaf, 1
        for i, r in enumerate(roles):
            views[r] = leaf[:, :, i].transpose(1, 2)
    for r in "qkv":
        if r in views:
            continue
        leaf, view = _role_leaf(values[r], lay[r], dtype, device, r in grads)
        leaves[r], views[r], dims[r] = leaf, view, _PIXEL_DIM[lay[r]]
    return leaves, views, dims


def _role_leaf(t: Tensor, layout: str, dtype: torch.dtype, device: str, grad: bool) -> tuple[Tensor, Tensor]:
    t = t.to(device=device, dtype=dtype)
    if layout == "contig":
        leaf = t.clone().contiguous().requires_grad_(grad)
        return leaf, leaf
    if layout == "strided":
        b, h, n, d = t.shape
        leaf = t.new_zeros(b, h, n, 2 * d)
        leaf[..., ::2] = t
        leaf.requires_grad_(grad)
        return leaf, leaf[..., ::2]
    if layout == "transposed":
        leaf = t.transpose(2, 3).contiguous().requires_grad_(grad)
        return leaf, leaf.transpose(2, 3)
    if layout == "heads_last":
        leaf = t.transpose(1, 2).contiguous().requires_grad_(grad)
        return leaf, leaf.transpose(1, 2)
    if layout == "expanded":
        leaf = t[:1].clone().requires_grad_(grad)
        return leaf, leaf.expand(t.shape)
    raise AssertionError(layout)


# --------------------------------------------------------------------------------------------
# Functional families: full fields


def functional_fields(case: dict) -> dict[str, Any]:
    """Full float64 ``q [B, H, N, D]``, ``k, v [B, H, Nk, D]``, ``w`` (loss weights, q's shape),
    ``mask [B, Nk]`` or None, ``bias [B, Nk]`` / ``[B, H, Nk]`` or None."""
    g = gen(case["data_seed"])
    b, h, d = case["b"], case["h"], case["d"]
    n, nk = case["n"], case.get("nk", case["n"])
    vals = {}
    for role, length in (("q", n), ("k", nk), ("v", nk)):
        constant_b = layout_of(case, role) != "packed" and case["layout"].get(role) == "expanded"
        t = torch.randn(1 if constant_b else b, h, length, d, generator=g, dtype=torch.float64)
        vals[role] = t.expand(b, h, length, d) if constant_b else t
    shared = case["layout"].get("shared")
    if shared in ("alias_qk", "alias_qkv"):
        vals["k"] = vals["q"]
        if shared == "alias_qkv":
            vals["v"] = vals["q"]
    w = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    mask = None
    if case["mask"] is not None:
        rows = 1 if case["mask"] == "shared" else b
        mask = (torch.rand(rows, nk, generator=g, dtype=torch.float64) < case["mask_keep"]).expand(b, nk)
    bias = None
    if case["bias"] is not None:
        shape = (b, nk) if case["bias"] == "bn" else (b, h, nk)
        bias = 0.5 * torch.randn(*shape, generator=g, dtype=torch.float64)
    fields = {**vals, "w": w, "mask": mask, "bias": bias}
    if case.get("nonfinite"):
        role, value, (bi, hi, pi, di) = case["nonfinite"]
        t = fields[role].clone()
        if role == "bias":  # [B, Nk] or [B, H, Nk]
            t[(bi % b, pi) if t.dim() == 2 else (bi % b, hi % h, pi)] = float(value)
        else:
            t[bi % max(b, 1), hi % h, pi, di % d] = float(value)
        fields[role] = t
        aliased = {"alias_qk": "qk", "alias_qkv": "qkv"}.get(shared, "")
        if role in aliased:  # one tensor: the value is in each of its roles
            for r in aliased:
                fields[r] = t
    return fields


def local_slice(t: Optional[Tensor], bounds: tuple[int, int], dim: int) -> Optional[Tensor]:
    if t is None:
        return None
    return t.narrow(dim, bounds[0], bounds[1] - bounds[0])


# --------------------------------------------------------------------------------------------
# Layer families: parameters and inputs


def layer_params(case: dict) -> dict[str, Tensor]:
    """The layer's parameters (float64), by ``state_dict`` name."""
    g = gen(case["data_seed"] + 7)
    e, kv_dim = case["e"], case.get("kv_dim", case["e"])
    shapes = ({"q_proj": (e, e), "kv_proj": (2 * e, kv_dim), "out_proj": (e, e)}
              if case["family"] == "layer_cross" else {"qkv_proj": (3 * e, e), "out_proj": (e, e)})
    params = {}
    for name, shape in shapes.items():
        params[f"{name}.weight"] = torch.randn(*shape, generator=g, dtype=torch.float64) * shape[1] ** -0.5
        if case["bias_params"]:
            params[f"{name}.bias"] = 0.1 * torch.randn(shape[0], generator=g, dtype=torch.float64)
    if case.get("block"):
        f = 2 * e
        for name, shape in (("norm1", (e,)), ("norm2", (e,))):
            params[f"{name}.weight"] = 1 + 0.1 * torch.randn(*shape, generator=g, dtype=torch.float64)
            params[f"{name}.bias"] = 0.1 * torch.randn(*shape, generator=g, dtype=torch.float64)
        params["mlp.0.weight"] = torch.randn(f, e, generator=g, dtype=torch.float64) * e ** -0.5
        params["mlp.0.bias"] = 0.1 * torch.randn(f, generator=g, dtype=torch.float64)
        params["mlp.3.weight"] = torch.randn(e, f, generator=g, dtype=torch.float64) * f ** -0.5
        params["mlp.3.bias"] = 0.1 * torch.randn(e, generator=g, dtype=torch.float64)
    return params


def layer_fields(case: dict) -> dict[str, Optional[Tensor]]:
    """Full float64 ``x [B, N, E]`` (constant over B for an ``expanded`` layout), ``x_kv [B, Nk,
    kv_dim]`` (cross; ``x`` itself for ``kv_is_q``), ``w`` (loss weights), ``mask [B, Nk]`` and
    ``bias [B, Nk]`` / ``[B, H, Nk]`` (cross) or None."""
    g = gen(case["data_seed"])
    b, n, e = case["b"], case["n"], case["e"]
    rows = 1 if case["x_layout"] == "expanded" else b
    x = torch.randn(rows, n, e, generator=g, dtype=torch.float64).expand(b, n, e)
    x_kv = None
    nk = n
    if case["family"] == "layer_cross":
        nk = case["nk"]
        x_kv = torch.randn(b, nk, case["kv_dim"], generator=g, dtype=torch.float64)
        if case["kv_is_q"]:
            x_kv = x
    w = torch.randn(b, n, e, generator=g, dtype=torch.float64)
    mask = None
    if case["mask"] is not None:
        mask = torch.rand(b, nk, generator=g, dtype=torch.float64) < case["mask_keep"]
    bias = None
    if case.get("kbias") is not None:
        shape = (b, nk) if case["kbias"] == "bn" else (b, case["h"], nk)
        bias = 0.5 * torch.randn(*shape, generator=g, dtype=torch.float64)
    return {"x": x, "x_kv": x_kv, "w": w, "mask": mask, "bias": bias}


def x_leaf(x: Tensor, layout: str, dtype: torch.dtype, device: str = "cpu",
           grad: bool = False) -> tuple[Tensor, Tensor, int]:
    """``(leaf, view, pixel dim of the leaf)`` of a layer input ``[B, n, E]``."""
    x = x.to(device=device, dtype=dtype)
    if layout == "contig":
        leaf = x.clone().contiguous().requires_grad_(grad)
        return leaf, leaf, 1
    if layout == "strided":
        b, n, e = x.shape
        leaf = x.new_zeros(b, n, 2 * e)
        leaf[..., 1::2] = x
        leaf.requires_grad_(grad)
        return leaf, leaf[..., 1::2], 1
    if layout == "transposed":
        leaf = x.transpose(1, 2).contiguous().requires_grad_(grad)
        return leaf, leaf.transpose(1, 2), 2
    if layout == "expanded":
        leaf = x[:1].clone().requires_grad_(grad)
        return leaf, leaf.expand(x.shape), 1
    raise AssertionError(layout)
