"""The space the fuzzer draws from: families of calls, one-rank perturbations, expectations.

A case is a plain dict (printable, picklable): its ``family`` names what runs on the ranks
(:mod:`tests.fuzz.execute`) and what the parent compares it with (:mod:`tests.fuzz.judge`).
Case ``i`` of seed ``s`` is drawn from ``random.Random(f"{s}:{i}")`` alone, so any case can be
drawn again by its two numbers (``python -m tests.fuzz --seed s --case i``). The first
:data:`WITNESSES` indices are fixed witnesses: a case of each defect issue 23 and this fuzzer
found (open or fixed) and of each expensive family, so that every run holds them whatever the
seed (Note [differential fuzzer] in ``tests/fuzz/__init__.py``).

Every case says what it expects: ``"exact"`` (every rank returns, and the gathered result equals
the float64 single-device reference), ``"raise"`` (every rank raises a clear error whose message
matches ``match``, naming the problem) or ``"exact_or_raise"`` (either, where both are honest
answers, e.g. ranks that chose different strategies for the same maths).

Legend: P ranks (``world``), N / Nk pixels (queries / keys), B batch, H heads, D head dim,
E embed dim, U Ulysses degree, W window nside.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Optional

from tests.fuzz.data import ROLE_LAYOUTS

FAMILIES = ("attn", "cross", "local", "layer", "layer_cross", "layer_local", "idx_flow", "ckpt",
            "grad_sync", "nonfinite", "compile", "reinit")

# Relative weights of the families for a drawn (non-witness) case.
_WEIGHTS = {"attn": 30, "cross": 14, "local": 12, "layer": 12, "layer_cross": 8, "layer_local": 7,
            "idx_flow": 5, "ckpt": 4, "grad_sync": 4, "nonfinite": 3, "compile": 0.6, "reinit": 0.3}
_WORLDS = {1: 10, 2: 35, 3: 25, 4: 30}
PERTURB_P = 0.3  # share of multi-rank cases with one rank perturbed

STRATEGIES = ("ring", "ulysses", "hybrid", "auto")


class Draw:
    """``random.Random`` plus forced choices (a witness pins some of a family's draws)."""

    def __init__(self, rng: random.Random, force: Optional[dict] = None) -> None:
        self.rng, self.force = rng, dict(force or {})

    def pick(self, key: str, options: Any, weights: Optional[list] = None) -> Any:
        if key in self.force:
            return self.force[key]
        options = list(options)
        return self.rng.choices(options, weights=weights)[0]

    def chance(self, key: str, p: float) -> bool:
        if key in self.force:
            return bool(self.force[key])
        return self.rng.random() < p

    def integer(self, key: str, lo: int, hi: int) -> int:
        if key in self.force:
            return self.force[key]
        return self.rng.randint(lo, hi)

    def real(self, key: str, lo: float, hi: float) -> float:
        if key in self.force:
            return self.force[key]
        return round(self.rng.uniform(lo, hi), 4)

    def seed(self) -> int:
        return self.rng.randrange(2**31 - 1)


# --------------------------------------------------------------------------------------------
# Shared draws


def split(d: Draw, n: int, world: int, key: str = "split") -> list[int]:
    """A contiguous split of ``n`` pixels over ``world`` ranks: even, random (empty shards
    included), one empty rank, or everything on one rank."""
    style = d.pick(key, ["even", "random", "one_empty", "one_rank"], [35, 40, 15, 10])
    if style == "even" or world == 1:
        return [n // world + (r < n % world) for r in range(world)]
    if style == "one_rank":
        r = d.integer(f"{key}_rank", 0, world - 1)
        return [n if i == r else 0 for i in range(world)]
    if style == "one_empty":
        r = d.integer(f"{key}_rank", 0, world - 1)
        rest = [n // (world - 1) + (i < n % (world - 1)) for i in range(world - 1)]
        return rest[:r] + [0] + rest[r:]
    cuts = d.force.get(f"{key}_cuts") or sorted(d.rng.randint(0, n) for _ in range(world - 1))
    bounds = [0, *cuts, n]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def _divisors(p: int) -> list[int]:
    return [u for u in range(1, p + 1) if p % u == 0]


def heads_for(d: Draw, strategy: str, world: int, u: int) -> int:
    """H: usually one the strategy can split (a multiple of P for Ulysses, of U for hybrid)."""
    need = world if strategy == "ulysses" else u if strategy == "hybrid" else 1
    if need > 1 and not d.chance("indivisible_heads", 0.12):
        return need * d.integer("head_mult", 1, 2 if need <= 2 else 1)
    return d.integer("h", 1, 4)


def ulysses_degree(d: Draw, world: int) -> int:
    inner = [u for u in _divisors(world) if 1 < u < world]
    return d.pick("U", inner or _divisors(world))


def layout(d: Draw, cross: bool) -> dict:
    """Note [fuzz layouts]: per-role layouts, or a shared buffer."""
    style = d.pick("layout_style", ["contig", "mixed", "shared"], [45, 35, 20])
    lay = {r: "contig" for r in "qkv"}
    if style == "contig":
        return lay
    for r in "qkv":
        lay[r] = d.pick(f"layout_{r}", ROLE_LAYOUTS)
    if style == "shared":
        if cross:
            lay.update(shared="packed", packed_roles="kv")
        else:
            lay["shared"] = d.pick("shared", ["alias_qk", "alias_qkv", "packed"])
    return lay


def dtype(d: Draw) -> str:
    return d.pick("dtype", ["float64", "float32"], [75, 25])


def nside_pixels(nside: int) -> int:
    return 12 * nside * nside


# --------------------------------------------------------------------------------------------
# Functional families


def _attention_options(d: Draw, case: dict, bias_ok: bool = True) -> None:
    """Backend, scale, mask, bias, dropout, grads, loss, hooks: shared by the functional families."""
    case["dtype"] = dtype(d)
    case["backend"] = d.pick("backend", ["auto", "manual", "sdpa"], [50, 30, 20])
    case["scale"] = None if d.chance("default_scale", 0.6) else d.real("scale", 0.05, 2.0)
    case["mask"] = d.pick("mask", [None, "random", "shared"], [60, 25, 15])
    case["mask_keep"] = d.real("mask_keep", 0.0, 1.0)
    case["bias"] = d.pick("bias", [None, "bn", "bhn"], [75, 12, 13]) if bias_ok else None
    case["bias_grad"] = case["bias"] is not None and d.chance("bias_grad", 0.5)
    case["dropout_p"] = 0.0 if d.chance("no_dropout", 0.8) else d.pick("dropout_p", [0.1, 0.3, 0.6])
    case["dropout_seed"] = d.seed() if d.chance("explicit_seed", 0.7) else None
    case["rng_seed"] = d.seed()
    case["grads"] = d.pick("grads", ["qkv", "q", "kv", "v", ""], [75, 8, 8, 5, 4])
    case["loss"] = d.pick("loss", ["weighted", "sum"], [70, 30])
    case["no_grad"] = d.chance("no_grad", 0.05)
    case["hook"] = d.chance("hook", 0.1)


def draw_attn(d: Draw, world: int) -> dict:
    strategy = d.pick("strategy", STRATEGIES, [35, 20, 15, 30])
    u = ulysses_degree(d, world) if strategy == "hybrid" else 1
    case = {"family": "attn", "strategy": strategy, "U": u,
            "entry": d.pick("entry", ["functional", "sharded"]) if strategy == "hybrid" else "functional",
            "h": heads_for(d, strategy, world, u)}
    case["n"] = d.pick("n_range", [d.rng.randint(0, world + 1), d.rng.randint(1, 40), d.rng.randint(40, 120)],
                       [15, 60, 25])
    case["sizes"] = split(d, case["n"], world)
    case["b"] = d.pick("b", [0, 1, 2, 3], [4, 40, 40, 16])
    case["d"] = d.pick("d", [1, 2, 3, 4, 8, 16])
    case["layout"] = layout(d, cross=False)
    _attention_options(d, case)
    case["data_seed"] = d.integer("data_seed", 0, 2**31 - 2)
    head_parallel = strategy in ("ulysses", "hybrid")
    need = world if strategy == "ulysses" else u
    if head_parallel and world > 1 and case["h"] % need:
        expect(case, "raise", r"not divisible|divisible by")
    return case


def draw_cross(d: Draw, world: int) -> dict:
    windowed = d.chance("windowed", 0.45)
    case = {"family": "cross", "window": None, "mode": "neighbourhood"}
    if windowed:
        strategy = d.pick("strategy", ["ring", "auto", "ulysses"], [60, 30, 10])
        nq, nk = d.pick("nside_q", [1, 2, 4], [30, 50, 20]), d.pick("nside_k", [1, 2, 4], [30, 50, 20])
        case.update(nside_q=nq, nside_k=nk, n=nside_pixels(nq), nk=nside_pixels(nk),
                    window=d.pick("window", [w for w in (1, 2, 4) if w <= min(nq, nk)]),
                    mode=d.pick("mode", ["cell", "neighbourhood"]))
    else:
        strategy = d.pick("strategy", STRATEGIES, [45, 20, 10, 25])
        case["n"] = d.pick("n_range", [d.rng.randint(0, world + 1), d.rng.randint(1, 40)], [20, 80])
        case["nk"] = d.pick("nk_range", [d.rng.randint(0, world + 1), d.rng.randint(1, 40)], [20, 80])
    u = ulysses_degree(d, world) if strategy == "hybrid" else 1
    case.update(strategy=strategy, U=u, h=heads_for(d, strategy, world, u))
    case["sizes"] = split(d, case["n"], world)
    case["ksizes"] = split(d, case["nk"], world, key="ksplit")
    case["b"] = d.pick("b", [0, 1, 2], [4, 50, 46])
    case["d"] = d.pick("d", [1, 2, 4, 8])
    case["layout"] = layout(d, cross=True)
    _attention_options(d, case)
    case["data_seed"] = d.integer("data_seed", 0, 2**31 - 2)
    case["piece_bytes"] = piece_bytes(d) if windowed else None
    if windowed and strategy == "ulysses":
        expect(case, "raise", r"head-parallel")
    elif strategy in ("ulysses", "hybrid") and world > 1 and case["h"] % (world if strategy == "ulysses" else u):
        expect(case, "raise", r"not divisible|divisible by")
    return case


# What a case of the fused CPU kernel forces (Note [fused local draws]).
_FUSED = {"backend": "auto", "mask": None, "bias": None, "no_dropout": True}


def piece_bytes(d: Draw) -> Optional[int]:
    """The rank's ``CPU_CALL_BYTES`` for a windowed case (Note [fused local draws]): None keeps the
    library's, else 1 .. 2**14 bytes, log-uniform, so that a square group's backward runs in
    pieces of 1 row up to a few rows, the last one often shorter."""
    return None if d.chance("default_pieces", 0.4) else int(2 ** d.real("piece_log2", 0.0, 14.0))


def draw_local(d: Draw, world: int) -> dict:
    """Windowed self-attention (``healpix_local_attention`` or ``sharded_attention``).

    Note [fused local draws]
        A window group of squares (side >= 4 cells: window_nside >= 4, mode="neighbourhood") runs
        the fused CPU kernel when the call has no key bias, mask or dropout, its backward in
        cache-sized pieces (Note [cache-sized calls] in ``hpattn_dist/local/execute.py``), and its
        zero blocks where three faces meet go through the column fixes. Seed 23's 320 cases held
        square groups in 3 cases (window 4 at nside 4 only), one of them on the fused kernel, and
        the library's piece size (2 MiB) never splits a fuzz-sized group (one piece, whatever the
        draw). So a share of the cases forces the fused kernel (:data:`_FUSED`), nside 8 gives
        squares of cells of 4 pixels (window 4) and groups cut from faces of 8 x 8 cells (window
        8), with shards that cut them, and :func:`piece_bytes` sets the piece size on the ranks
        (:func:`.execute.run_case`).
    """
    nside = d.pick("nside", [1, 2, 4, 8], [20, 40, 25, 15])
    case = {"family": "local", "nside": nside, "n": nside_pixels(nside),
            "window": d.pick("window", [w for w in (1, 2, 4, 8) if w <= nside]),
            "mode": d.pick("mode", ["cell", "neighbourhood"]),
            "entry": d.pick("entry", ["local", "sharded"], [70, 30])}
    case["strategy"] = d.pick("strategy", ["ring", "auto", "ulysses"], [45, 45, 10]) if case["entry"] == "sharded" \
        else "ring"
    case["h"] = d.integer("h", 1, 3)
    case["sizes"] = split(d, case["n"], world)
    case["b"] = d.pick("b", [0, 1, 2], [4, 50, 46])
    case["d"] = d.pick("d", [1, 2, 4, 8])
    case["layout"] = layout(d, cross=False)
    case["fused"] = d.chance("fused", 0.35)
    _attention_options(Draw(d.rng, {**_FUSED, **d.force}) if case["fused"] else d, case)
    case["data_seed"] = d.integer("data_seed", 0, 2**31 - 2)
    case["piece_bytes"] = piece_bytes(d)
    if case["strategy"] == "ulysses":
        expect(case, "raise", r"head-parallel")
    return case


def draw_nonfinite(d: Draw, world: int) -> dict:
    """A functional case (global, cross or windowed; masks, key biases and dropout as drawn) with one
    NaN or infinity in q, k, v or the key bias (Note [non-finite inputs] in hpattn_dist/masks.py)."""
    base = d.pick("base", ["attn", "cross", "local"], [45, 20, 35])
    force = {"no_grad": False, "hook": False, "indivisible_heads": False, **d.force}
    draw = {"attn": draw_attn, "cross": draw_cross, "local": draw_local}[base]
    case = draw(Draw(d.rng, force), world)
    case["family"], case["base"] = "nonfinite", base
    role = d.pick("nonfinite_role", ["q", "k", "v"] + (["bias"] if case["bias"] is not None else []))
    if case["b"] == 0 or case["n"] == 0 or case.get("nk", 1) == 0:
        case["b"] = max(case["b"], 1)
        if case["n"] == 0:
            case["n"] = 1
            case["sizes"] = split(d, 1, world)
        if case.get("nk", 1) == 0:
            case["nk"] = 1
            case["ksizes"] = split(d, 1, world, key="ksplit")
    length = case["n"] if role == "q" or base != "cross" else case["nk"]
    at = (d.rng.randrange(4), d.rng.randrange(4), d.rng.randrange(length), d.rng.randrange(16))
    case["nonfinite"] = (role, d.pick("nonfinite_value", ["nan", "inf", "-inf"]), d.force.get("nonfinite_at", at))
    return case


# --------------------------------------------------------------------------------------------
# Layer families


def _layer_options(d: Draw, case: dict) -> None:
    case["dtype"] = d.pick("dtype", ["float64", "float32"], [85, 15])
    case["backend"] = d.pick("backend", ["auto", "manual", "sdpa"], [50, 30, 20])
    case["bias_params"] = d.chance("bias_params", 0.8)
    case["attn_dropout"] = 0.0 if d.chance("no_dropout", 0.75) else d.pick("dropout_p", [0.2, 0.5])
    case["train"] = d.chance("train", 0.7)
    case["rng_seed"] = d.seed()
    case["mask"] = d.pick("mask", [None, "random"], [70, 30])
    case["mask_keep"] = d.real("mask_keep", 0.0, 1.0)
    case["x_layout"] = d.pick("x_layout", ["contig", "strided", "transposed", "expanded"], [55, 15, 15, 15])
    case["x_grad"] = d.chance("x_grad", 0.9)
    case["loss"] = d.pick("loss", ["weighted", "sum"], [70, 30])
    case["no_grad"] = d.chance("no_grad", 0.05)
    case["hook"] = d.pick("hook", [None, "forward", "pre", "output"], [85, 5, 5, 5])
    case["data_seed"] = d.integer("data_seed", 0, 2**31 - 2)


def draw_layer(d: Draw, world: int) -> dict:
    strategy = d.pick("strategy", STRATEGIES, [30, 20, 15, 35])
    u = ulysses_degree(d, world) if strategy == "hybrid" else 1
    h = heads_for(d, strategy, world, u)
    case = {"family": "layer", "strategy": strategy, "U": u, "h": h, "d": d.integer("d", 1, 3)}
    case["e"] = case["h"] * case["d"]
    case["healpix_field"] = d.chance("healpix_field", 0.7)
    case["n"] = nside_pixels(d.pick("nside", [1, 2], [60, 40])) if case["healpix_field"] else \
        d.integer("n", 1, 30)
    case["sizes"] = split(d, case["n"], world)
    case["b"] = d.pick("b", [1, 2], [50, 50])
    _layer_options(d, case)
    if strategy in ("ulysses", "hybrid") and world > 1 and h % (world if strategy == "ulysses" else u):
        expect(case, "raise", r"not divisible|divisible by")
    return case


def draw_layer_cross(d: Draw, world: int) -> dict:
    windowed = d.chance("windowed", 0.4)
    strategy = d.pick("strategy", ["ring", "auto"] if windowed else STRATEGIES,
                      [60, 40] if windowed else [35, 20, 10, 35])
    u = ulysses_degree(d, world) if strategy == "hybrid" else 1
    h = heads_for(d, strategy, world, u)
    case = {"family": "layer_cross", "strategy": strategy, "U": u, "h": h, "d": d.integer("d", 1, 3),
            "window": None, "mode": "neighbourhood"}
    case["e"] = h * case["d"]
    case["healpix_field"] = windowed or d.chance("healpix_field", 0.6)
    if case["healpix_field"]:
        nq, nk = d.pick("nside_q", [1, 2], [50, 50]), d.pick("nside_k", [1, 2, 4], [40, 40, 20])
        case.update(n=nside_pixels(nq), nk=nside_pixels(nk))
        if windowed:
            case.update(window=d.pick("window", [w for w in (1, 2) if w <= min(nq, nk)]),
                        mode=d.pick("mode", ["cell", "neighbourhood"]))
    else:
        case.update(n=d.integer("n", 1, 30), nk=d.integer("nk", 1, 30))
    case["kv_dim"] = d.pick("kv_dim", [case["e"], case["e"] + 1, 2])
    case["sizes"] = split(d, case["n"], world)
    case["ksizes"] = split(d, case["nk"], world, key="ksplit")
    case["kv_is_q"] = d.chance("kv_is_q", 0.12)  # layer(x, x): one tensor as queries and keys
    if case["kv_is_q"]:
        case.update(nk=case["n"], ksizes=case["sizes"], kv_dim=case["e"])
    case["b"] = d.pick("b", [1, 2])
    case["kbias"] = d.pick("kbias", [None, "bn", "bhn"], [70, 15, 15])
    case["kbias_grad"] = case["kbias"] is not None and d.chance("kbias_grad", 0.5)
    _layer_options(d, case)
    if strategy in ("ulysses", "hybrid") and world > 1 and h % (world if strategy == "ulysses" else u):
        expect(case, "raise", r"not divisible|divisible by")
    return case


def draw_layer_local(d: Draw, world: int) -> dict:
    nside = d.pick("nside", [1, 2, 4, 8], [25, 45, 20, 10])
    case = {"family": "layer_local", "h": d.integer("h", 1, 3), "d": d.integer("d", 1, 3),
            "nside": nside, "n": nside_pixels(nside),
            "window": d.pick("window", [w for w in (1, 2, 4, 8) if w <= nside]),
            "mode": d.pick("mode", ["cell", "neighbourhood"]), "strategy": "ring", "U": 1}
    case["e"] = case["h"] * case["d"]
    case["healpix_field"] = True
    case["sizes"] = split(d, case["n"], world)
    case["b"] = d.pick("b", [1, 2])
    _layer_options(d, case)
    case["piece_bytes"] = piece_bytes(d)
    return case


def draw_ckpt(d: Draw, world: int) -> dict:
    """A pre-norm block (LayerNorm, attention, LayerNorm, MLP with ``nn.Dropout``) under
    ``checkpoint(..., context_fn=checkpoint_context_fn, preserve_rng_state=True)``."""
    force = {"no_grad": False, "hook": None, "x_grad": True, "train": True, "mask": None, "dtype": "float64",
             **d.force}
    case = draw_layer(Draw(d.rng, force), world)
    case["family"], case["block"] = "ckpt", True
    case["attn_dropout"] = d.pick("attn_dropout", [0.0, 0.3])
    case["mlp_dropout"] = d.pick("mlp_dropout", [0.0, 0.2])
    case["checkpoint"] = d.pick("checkpoint", ["policy", "plain"], [80, 20])
    return case


def draw_compile(d: Draw, world: int) -> dict:
    """The self layer under ``torch.compile`` (aot_eager or inductor), float64."""
    force = {"no_grad": False, "hook": None, "x_layout": "contig", "dtype": "float64", "mask": None,
             "no_dropout": True, "backend": "manual", **d.force}
    case = draw_layer(Draw(d.rng, force), world)
    case["family"] = "compile"
    case["compiler"] = d.pick("compiler", ["aot_eager", "inductor"], [60, 40])
    return case


def draw_idx_flow(d: Draw, world: int) -> dict:
    model = d.pick("model", ["conv", "conv_bn", "transformer", "pool_up", "vit"], [25, 25, 25, 10, 15])
    case = {"family": "idx_flow", "model": model, "b": d.pick("b", [1, 2]), "c_in": d.integer("c_in", 1, 3),
            "strategy": d.pick("strategy", ["auto", "ring", "ulysses"], [50, 30, 20]),
            "train": d.chance("train", 0.6), "data_seed": d.seed(), "dtype": "float64"}
    case["nside"] = {"transformer": d.pick("nside", [1, 2]), "vit": 4}.get(model, 2)
    if model == "transformer":
        case["c_in"] = 4  # embed dim of the block (2 heads)
    case["n"] = nside_pixels(case["nside"])
    case["sizes"] = split(d, case["n"], world)
    if model in ("transformer", "vit") and case["strategy"] == "ulysses" and 2 % world:
        expect(case, "raise", r"not divisible|divisible by|shard_bounds")  # (whichever is checked first)
    elif model != "transformer" and case["sizes"] != [case["n"] // world + (r < case["n"] % world)
                                                      for r in range(world)]:
        # A split other than shard_bounds: exact, or refused when the model's call checks the split.
        expect(case, "exact_or_raise", r"shard_bounds")
    return case


def draw_grad_sync(d: Draw, world: int) -> dict:
    """``sync_gradients`` over a few parameters whose local gradients are set by hand."""
    return {"family": "grad_sync", "data_seed": d.seed(), "shapes": [(3, 2), (4,), (2, 2, 2)][: d.integer("k", 1, 3)],
            "dtype": dtype(d)}


def draw_reinit(d: Draw, world: int) -> dict:
    """A hybrid layer, or a converted idx-flow model, used across ``destroy_process_group`` and
    a new ``init_process_group`` (runs in a group of its own)."""
    kind = d.pick("reinit", ["hybrid_layer", "converted"])
    return {"family": "reinit", "kind": kind, "isolated": True, "data_seed": d.seed(),
            "world_override": 4 if kind == "hybrid_layer" else 2}


_DRAWS: dict[str, Callable[[Draw, int], dict]] = {
    "attn": draw_attn, "cross": draw_cross, "local": draw_local, "layer": draw_layer,
    "layer_cross": draw_layer_cross, "layer_local": draw_layer_local, "idx_flow": draw_idx_flow,
    "ckpt": draw_ckpt, "grad_sync": draw_grad_sync, "nonfinite": draw_nonfinite, "compile": draw_compile,
    "reinit": draw_reinit,
}


# --------------------------------------------------------------------------------------------
# One-rank perturbations


def expect(case: dict, what: str, match: Optional[str] = None) -> None:
    case["expect"], case["match"] = what, match


# kind: (families, expectation, message pattern)
PERTURBATIONS: dict[str, tuple[tuple[str, ...], str, Optional[str]]] = {
    "dtype": (("attn", "cross", "local"), "raise", r"dtype"),
    "meta": (("attn", "cross", "local"), "raise", r"device|meta"),
    "scale": (("attn", "cross", "local", "layer", "layer_cross", "layer_local"), "raise", r"scale"),
    "strategy": (("attn", "cross", "layer", "layer_cross"), "exact_or_raise", r"signature|strateg"),
    "backend": (("attn", "cross", "local", "layer"), "exact_or_raise", r"backend"),
    "dropout_p": (("attn", "cross", "local"), "raise", r"dropout"),
    "dropout_seed": (("attn", "cross", "local"), "exact", None),
    "mask_one_rank": (("attn", "cross", "local"), "exact_or_raise", r"key_mask|mask"),
    "heads": (("attn", "cross", "local"), "raise", r"\bH\b|heads"),
    "batch": (("attn", "cross", "local", "layer"), "raise", r"\bB\b|batch"),
    "head_dim": (("attn", "cross", "local"), "raise", r"\bD\b|head dim"),
    "layout": (("attn", "cross", "local"), "exact", None),
    # (the windowed paths agree on which gradients are needed; the global ones take any mixture)
    "partial_grad": (("attn", "cross", "local"), "exact_or_raise", r"grad"),
    "frozen": (("attn", "cross", "local", "layer"), "exact_or_raise", r"grad"),
    "no_grad_mode": (("attn", "cross", "local", "layer", "layer_local"), "exact_or_raise", r"grad"),
    "window": (("local", "layer_local"), "raise", r"window"),
    "mode": (("local", "layer_local"), "raise", r"mode"),
    "dtype_layer": (("layer", "layer_cross", "layer_local"), "raise", r"dtype|float"),
    "dtype_input": (("layer", "layer_cross", "layer_local"), "raise", r"dtype|float|Half|Double"),
    "meta_layer": (("layer", "layer_cross", "layer_local"), "raise", r"device|meta"),
    "weights": (("layer", "layer_cross", "layer_local"), "raise", r"different parameters"),
    "weights_permuted": (("layer", "layer_cross", "layer_local"), "raise", r"different parameters"),
    "train_eval": (("layer", "layer_cross", "layer_local"), "raise", r"dropout|train"),
    "x_layout": (("layer", "layer_cross", "layer_local"), "exact", None),
    "full_field": (("layer", "layer_local"), "raise", r"HEALPix field"),
    "bn_train_eval": (("idx_flow",), "raise", r"train|eval|mode|batch_stats"),
    "grad_requires_grad": (("grad_sync",), "raise", r"requires_grad|gradient"),
    "grad_dtype": (("grad_sync",), "raise", r"dtype"),
    "grad_none": (("grad_sync",), "exact", None),
    "grad_extra_param": (("grad_sync",), "raise", r"parameter"),
}


# Kinds whose known defect hangs or crashes (each costs a timeout and a new group): drawn less
# often while the defect is open; their witnesses are in every run.
_PERTURB_WEIGHT = {"frozen": 0.3, "no_grad_mode": 0.3}


def _perturbations_for(case: dict) -> list[str]:
    fam = case["family"]
    kinds = [k for k, (fams, _, _) in PERTURBATIONS.items() if fam in fams]
    out = []
    for k in kinds:
        if k == "dropout_seed" and not case.get("dropout_p"):
            continue
        if k == "train_eval" and not case.get("attn_dropout"):
            continue
        if k == "full_field" and (not case.get("healpix_field") or case["n"] in case["sizes"]):
            continue  # (a rank that holds the whole field already passes it)
        if k in ("partial_grad", "frozen", "no_grad_mode") and (case.get("no_grad") or not case.get("grads", "x")):
            continue
        if k == "bn_train_eval" and case.get("model") != "conv_bn":
            continue
        if k in ("window", "mode") and not case.get("window"):
            continue
        if k == "layout" and (case["layout"].get("shared") or "expanded" in case["layout"].values()):
            continue  # leaves of another structure: compared per role only (Note [fuzz layouts])
        if k == "x_layout" and case.get("x_layout") == "expanded":
            continue
        if k == "heads" and case.get("strategy") in ("ulysses", "hybrid"):
            continue  # H + 1 is also indivisible there: either error names the problem
        out.append(k)
    return out


def _perturbed_values(d: Draw, case: dict, kind: str) -> dict:
    """What the perturbed rank passes instead, where that is a choice."""
    def other(options: tuple, current: Any) -> Any:
        return d.rng.choice([o for o in options if o != current])

    if kind == "layout":
        return {"layout": {r: other(("contig", "strided", "transposed", "heads_last"), case["layout"][r])
                           for r in "qkv"}}
    if kind == "x_layout":
        return {"x_layout": other(("contig", "strided", "transposed"), case["x_layout"])}
    if kind == "strategy":
        windowed = bool(case.get("window"))
        options = ("ring", "auto") if windowed else \
            ("ring", "ulysses", "auto") + (("hybrid",) if case.get("U", 1) > 1 else ())
        return {"strategy": other(options, case["strategy"])}
    if kind == "backend":
        return {"backend": other(("auto", "manual", "sdpa"), case["backend"])}
    if kind == "window":
        w = case["window"]
        return {"window": w * 2 if w * 2 <= case.get("nside", 1) else w // 2}
    if kind == "mode":
        return {"mode": other(("cell", "neighbourhood"), case["mode"])}
    return {}


def perturb(d: Draw, case: dict, world: int) -> None:
    """With probability :data:`PERTURB_P`, change one rank's call (``case["perturb"]``) and set the
    expectation from :data:`PERTURBATIONS`."""
    case.setdefault("perturb", None)
    if world < 2 or case.get("expect", "exact") != "exact" or not d.chance("perturbed", PERTURB_P):
        return
    kinds = _perturbations_for(case)
    if not kinds:
        return
    kind = d.pick("perturb_kind", kinds, [_PERTURB_WEIGHT.get(k, 1.0) for k in kinds])
    rank = d.integer("perturb_rank", 0, world - 1)
    case["perturb"] = {"kind": kind, "rank": rank, "seed": d.seed(), **_perturbed_values(d, case, kind)}
    _, what, match = PERTURBATIONS[kind]
    expect(case, what, match)


# --------------------------------------------------------------------------------------------
# Known defects (issue 23's and this fuzzer's, still open): their cases are strict xfails, not failures


KNOWN_DEFECTS: dict[str, tuple[str, Callable[[dict], bool]]] = {
    # None open. Found by this fuzzer (not in issue 23's list): minimal reproducers in
    # test_fuzz_findings.py; add an entry per open defect, "name": ("what", predicate).
}
"""Name -> (what, predicate). Remove an entry when its fix lands: its strict xfail then fails."""

HANGS: tuple[str, ...] = ()
"""Known defects that hang until the exchange timeout: run with a short one (Note [differential fuzzer])."""


def known_defect(case: dict) -> Optional[str]:
    for name, (_, predicate) in KNOWN_DEFECTS.items():
        if predicate(case):
            return name
    return None


# --------------------------------------------------------------------------------------------
# Witnesses and the draw


def _w(family: str, world: int, **force: Any) -> tuple[str, int, dict]:
    return family, world, force


WITNESSES: tuple[tuple[str, int, dict], ...] = (
    _w("attn", 2, strategy="ring", backend="auto", layout_style="mixed", layout_q="strided", layout_k="contig",
       layout_v="contig", bias=None, mask=None, no_dropout=True, grads="qkv", no_grad=False, n_range=24, b=2, d=8,
       split="even", perturbed=False, dtype="float64"),
    _w("ckpt", 2, attn_dropout=0.3, mlp_dropout=0.2, checkpoint="policy", strategy="ring", perturbed=False,
       dtype="float64", healpix_field=True, nside=1, split="even"),
    _w("attn", 2, strategy="ulysses", h=2, head_mult=1, indivisible_heads=False, perturbed=True,
       perturb_kind="scale", perturb_rank=1, n_range=12, split="even", b=1, d=4),
    _w("layer", 2, strategy="ring", perturbed=True, perturb_kind="weights_permuted", perturb_rank=1,
       healpix_field=True, nside=1, dtype="float64", split="even", h=2, d=2),
    _w("nonfinite", 2, base="attn", strategy="ring", nonfinite_role="q", nonfinite_value="-inf",
       nonfinite_at=(0, 0, 0, 1), n_range=1, split="one_rank", split_rank=0, b=1, h=1, d=3, perturbed=False,
       layout_style="contig", backend="manual", dtype="float32", default_scale=True, data_seed=2, mask=None,
       bias=None, no_dropout=True),
    _w("layer", 2, strategy="ring", perturbed=True, perturb_kind="dtype_input", perturb_rank=1, healpix_field=True,
       nside=1, dtype="float64", split="even"),
    _w("idx_flow", 2, model="conv_bn", train=True, perturbed=True, perturb_kind="bn_train_eval", perturb_rank=1,
       split="even"),
    _w("attn", 2, strategy="ring", perturbed=True, perturb_kind="meta", perturb_rank=1, n_range=12, split="even",
       b=1, d=2),
    _w("compile", 2, compiler="inductor", strategy="ring", split="one_empty", healpix_field=True, nside=1, h=2,
       d=2, perturbed=False),
    _w("grad_sync", 2, perturbed=True, perturb_kind="grad_requires_grad", perturb_rank=1, k=3),
    _w("reinit", 4, reinit="hybrid_layer"),
    _w("compile", 2, compiler="aot_eager", strategy="auto", split="random", healpix_field=True, nside=1,
       perturbed=False),
    _w("attn", 2, strategy="ring", perturbed=True, perturb_kind="frozen", perturb_rank=1, n_range=12, split="even",
       b=1, d=2, grads="qkv", no_grad=False),
    _w("local", 2, nside=2, window=1, perturbed=True, perturb_kind="window", perturb_rank=0, split="random"),
    _w("cross", 2, windowed=False, strategy="ulysses", h=2, head_mult=1, indivisible_heads=False, bias="bhn",
       bias_grad=True, grads="v", perturbed=True, perturb_kind="partial_grad", perturb_rank=1, no_grad=False,
       b=1, n_range=6, nk_range=9, split="random", ksplit="random"),
    _w("layer_local", 3, perturbed=True, perturb_kind="train_eval", perturb_rank=2, no_dropout=False,
       dropout_p=0.5, nside=2, window=1),
    _w("attn", 4, strategy="hybrid", U=2, h=2, head_mult=1, indivisible_heads=False, b=0, mask="random",
       entry="sharded", n_range=1, split="one_rank", split_rank=0, no_dropout=True, no_grad=False,
       grads="qkv", perturbed=False),
    _w("attn", 4, strategy="hybrid", U=2, h=2, head_mult=1, indivisible_heads=False, entry="functional", grads="q",
       no_grad=False, b=1, n_range=9, split="random", perturbed=False),
    # Note [fused local draws]: squares with zero blocks on the fused CPU kernel, the backward in
    # pieces of 3 rows resp. of 1 row, shards that cut squares and leave a rank groups of two
    # squares (U_r of 125 to 188 cells); then the column fixes under dropout (the manual kernel).
    _w("local", 2, nside=8, window=4, mode="neighbourhood", entry="local", fused=True, h=1, b=2, d=2,
       dtype="float64", grads="qkv", no_grad=False, hook=False, loss="weighted", layout_style="contig",
       split="random", split_cuts=[170], default_pieces=False, piece_log2=13.4, perturbed=False),
    _w("local", 3, nside=4, window=4, mode="neighbourhood", entry="sharded", strategy="auto", fused=True, h=2,
       b=1, d=4, dtype="float32", grads="qkv", no_grad=False, hook=False, split="random", split_cuts=[40, 170],
       default_pieces=False, piece_log2=0.0, perturbed=False),
    _w("local", 2, nside=8, window=4, mode="neighbourhood", entry="local", fused=False, backend="manual",
       bias=None, mask=None, no_dropout=False, dropout_p=0.3, h=1, b=1, d=2, dtype="float64", grads="qkv",
       no_grad=False, hook=False, split="even", default_pieces=True, perturbed=False),
    _w("local", 3, nside=8, window=8, mode="neighbourhood", entry="local", fused=True, h=1, b=1, d=2,
       dtype="float64", grads="qkv", no_grad=False, hook=False, split="random", split_cuts=[300, 520],
       default_pieces=True, perturbed=False),  # faces of 8 x 8 cells cut into quarters on ranks 1, 2
    _w("local", 1, nside=2, window=1, mode="cell", entry="local", fused=False, bias="bn", bias_grad=True, h=3,
       b=2, grads="qkv", no_grad=False, hook=False),  # in place (one list group), a one-head bias's gradient
    _w("local", 3, nside=4, window=2, mode="cell", entry="local", perturbed=True, perturb_kind="mode",
       perturb_rank=2, split="random"),
)

"""Case ``i < len(WITNESSES)`` of every seed: (family, world, forced draws), in the order of issue
23's items 1, 2, 3, 4, 5, 6a-d, 7a-b, then compile with aot_eager, fuzz-1, a window
perturbation, fuzz-3 (Ulysses cross, frozen keys on one rank, a learned bias on the other), a
training mode on one rank, fuzz-4 (hybrid, a key mask, B = 0), fuzz-7 (hybrid with explicit
groups, k and v frozen), four windowed cases of Note [fused local draws], a key bias's gradient
on the in-place path (a one-head bias: summed over heads) and a mode perturbation (the local
draws that held one at seed 23 changed with them)."""


def draw_case(seed: int, index: int) -> dict:
    """Case ``index`` of ``seed`` (a witness for the first indices)."""
    rng = random.Random(f"{seed}:{index}")
    if index < len(WITNESSES):
        family, world, force = WITNESSES[index]
    else:
        family = rng.choices(list(_WEIGHTS), weights=list(_WEIGHTS.values()))[0]
        world = rng.choices(list(_WORLDS), weights=list(_WORLDS.values()))[0]
        force = {}
    d = Draw(rng, force)
    case = _DRAWS[family](d, world)
    world = case.pop("world_override", world)
    case.update(id=f"{seed}:{index}", seed=seed, index=index, world=world)
    case.setdefault("expect", "exact")
    case.setdefault("match", None)
    case.setdefault("isolated", False)
    perturb(d, case, world)
    case["known_defect"] = known_defect(case)
    return case


def describe(case: dict) -> str:
    """One line naming the case's draws (the repr of the dict, stable keys first)."""
    head = ["id", "family", "world", "expect", "known_defect", "perturb"]
    rest = {k: v for k, v in case.items() if k not in head and k not in ("seed", "index", "match")}
    return ", ".join(f"{k}={case.get(k)!r}" for k in head) + ", " + ", ".join(f"{k}={v!r}" for k, v in rest.items())
