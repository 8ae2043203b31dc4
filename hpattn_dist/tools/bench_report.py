"""``hpattn-dist bench`` reports: the fixed-width tables of every mode and the scaling plot.

Reads the records :mod:`hpattn_dist.tools.bench` measures (dicts, as in its JSON); measures
nothing. matplotlib is imported only to plot (the ``[plot]`` extra).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from hpattn_dist.precision import DTYPES
from hpattn_dist.strategies.auto import choose_strategy

__all__ = ["NOISY_RATIO", "check_plot_target", "format_tables", "implementation_name", "is_noisy",
           "plot_scaling", "scaling_figure"]


def _ms(seconds: float, width: int) -> str:
    """Milliseconds in ``width`` columns: one decimal while it fits, none above."""
    text = f"{seconds * 1e3:.1f}"
    return (text if len(text) <= width else f"{seconds * 1e3:.0f}").rjust(width)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


NOISY_RATIO = 2.0
"""A run whose median time exceeds its minimum by this factor is reported as unreliable."""

_STRATEGY_NAMES = {"ring": "ring", "ulysses": "Ulysses", "auto": "auto"}


def implementation_name(record: dict[str, Any]) -> str:
    """What a user calls the implementation of a scaling record (not the JSON's internal name)."""
    impl = record.get("impl")
    if impl == "oracle":
        return "1-process layer"
    if impl == "deepspeed_ulysses":
        return "DeepSpeed-Ulysses"
    strategy = str(record.get("strategy"))
    if strategy.startswith("hybrid:U"):
        return f"hpattn hybrid U{strategy[len('hybrid:U'):]}"
    if strategy == "auto" and "num_heads" in record and "world_size" in record:
        choice = choose_strategy(record["num_heads"], record["world_size"],
                                 dtype=DTYPES.get(record.get("dtype"), torch.float32))
        what = choice.strategy if choice.strategy != "hybrid" else f"hybrid U{choice.ulysses_degree}"
        return f"hpattn auto={_STRATEGY_NAMES.get(what, what)}"
    return f"hpattn {_STRATEGY_NAMES.get(strategy, strategy)}"


def is_noisy(record: dict[str, Any]) -> bool:
    """Whether a timed record's median exceeds its minimum by more than :data:`NOISY_RATIO`."""
    return any(record.get(f"{k}_s", 0) > NOISY_RATIO * record[f"{k}_min_s"] > 0
               for k in ("fwd", "fwd_bwd") if f"{k}_min_s" in record)


def _opt(r: dict[str, Any], key: str, fmt: str = ".2f") -> str:
    """An optional number of a record, or ``-`` where the record has none."""
    return format(r[key], fmt) if r.get(key) is not None else "-"


def _noisy_flag(r: dict[str, Any]) -> str:
    return " !" if is_noisy(r) else ""


class _Columns:
    """The columns of a fixed-width table, ``(title, format spec)`` each: a cell is formatted by its
    column's spec, a title aligned as the cells (left for a ``<`` spec, else right) in its width."""

    def __init__(self, *columns: tuple[str, str]) -> None:
        self.columns = columns

    def head(self) -> list[str]:
        """The title line and its rule."""
        titles = " ".join(format(title, ("<" if spec[0] == "<" else ">") + re.match(r"[<>]?(\d+)", spec)[1])
                          for title, spec in self.columns)
        return [titles, "-" * len(titles)]

    def row(self, *cells: Any) -> str:
        """The first ``len(cells)`` columns of a row."""
        return " ".join(format(cell, spec) for cell, (_, spec) in zip(cells, self.columns))


def format_tables(records: Sequence[dict[str, Any]], mode: str) -> str:
    """Fixed-width tables of the records of one mode."""
    lines = []
    if mode == "scaling":
        table = _Columns(("nside", ">5"), ("P", ">2"), ("thr", ">3"), ("implementation", "<19"), ("kernel", "<14"),
                         ("fwd ms", ">7"), ("f+b ms", ">7"), ("(min)", ">6"), ("eff f", ">5"), ("eff fb", ">6"),
                         ("vs DS", ">5"), ("MiB peak", ">8"), ("MiB sent", ">8"))
        lines += table.head()
        noisy = []
        for r in records:
            lead = (r["nside"], r["world_size"], r.get("threads_per_rank", 0), implementation_name(r))
            if "skipped" in r:
                lines.append(table.row(*lead) + f" skipped: {r['skipped']}")
                continue
            noisy += [r] if is_noisy(r) else []
            lines.append(table.row(
                *lead, r.get("kernel", ""), _ms(r["fwd_s"], 7), _ms(r["fwd_bwd_s"], 7), _ms(r["fwd_bwd_min_s"], 6),
                _opt(r, "efficiency_fwd"), _opt(r, "efficiency_fwd_bwd"), _opt(r, "speed_vs_peer_fwd_bwd"),
                _mib(max(r["peak_mem_bytes_per_rank"])), _mib(max(r["bytes_per_rank"]))) + _noisy_flag(r))
        lines.append("N = 12 nside^2; thr = threads per rank; times: median (and minimum) over the "
                     "repeats,\neach repeat the slowest rank's; eff = t(single-process layer, same "
                     "total threads) / t;\nvs DS = t(DeepSpeed-Ulysses) / t; MiB peak / sent: the "
                     "largest rank's")
        if noisy:
            lines.append(
                f"WARNING: {len(noisy)} row(s) marked ! have a median more than {NOISY_RATIO:g}x their "
                "minimum:\nthe machine was busy (other processes, more ranks than cores), so those "
                "times are not\nreliable; rerun on a quiet machine or with more --repeats")
    elif mode == "emulation":
        table = _Columns(("nside", ">5"), ("N", ">6"), ("P", ">2"), ("thr", ">3"), ("kernel", "<15"),
                         ("fused fwd ms", "12.1f"), ("blocks fwd ms", "13.1f"), ("ratio fwd", "9.3f"),
                         ("fused f+b ms", "12.1f"), ("blocks f+b ms", "13.1f"), ("ratio f+b", "9.3f"))
        lines += table.head()
        lines += [table.row(r["nside"], r["npix"], r["blocks"], r["threads"], r["kernel"], r["fused_fwd_s"] * 1e3,
                            r["blocked_fwd_s"] * 1e3, r["ratio_fwd"], r["fused_fwd_bwd_s"] * 1e3,
                            r["blocked_fwd_bwd_s"] * 1e3, r["ratio_fwd_bwd"]) for r in records]
        lines.append("ratio = t(one fused call on N) / t(P x P block calls + merge); target >= 0.9")
    elif mode == "masks":
        table = _Columns(("nside", ">5"), ("N", ">6"), ("P", ">2"), ("land on", "<9"), ("land", ">5.0%"),
                         ("kernel", "<15"), ("fwd ms", "8.1f"), ("f+b ms", "8.1f"), ("t fwd", "6.3f"),
                         ("t f+b", "6.3f"), ("fwd MiB sent per rank", "<27"), ("bytes", ">6"), ("scores", "6.3f"))
        lines += table.head()
        for r in records:
            sav = r["savings_vs_no_land"]
            lines.append(table.row(
                r["nside"], r["npix"], r["world_size"], "rank 0" if r["scenario"] == "one_rank" else "all",
                r["land_fraction"], r["kernel"], r["fwd_s"] * 1e3, r["fwd_bwd_s"] * 1e3, sav["fwd_time_ratio"],
                sav["fwd_bwd_time_ratio"], "/".join(f"{b / 2**20:.2f}" for b in r["fwd_bytes_per_rank"]),
                _opt(sav, "fwd_bytes_ratio", ".3f"), sav["scores_ratio"]))
        lines.append("ring_attention with a batch-shared land mask; t / bytes (forward, all ranks) / "
                     "scores (B H N_r sum of kept keys) relative to 0% land; times are medians, "
                     "each repeat the slowest rank's")
    elif mode == "local":
        lines += _local_tables(records)
    elif mode == "cross":
        lines += _cross_tables(records)
    else:
        table = _Columns(("nside", ">5"), ("N", ">6"), ("P", ">2"), ("peak MiB/rank (max)", ">19"),
                         ("inputs MiB", ">10"), ("N_r x N scores MiB", ">18"), ("N x N scores MiB", ">16"),
                         ("tile bound MiB", ">14"))
        lines += table.head()
        lines += [table.row(r["nside"], r["npix"], r["world_size"], _mib(max(r["peak_mem_bytes_per_rank"])),
                            _mib(r["inputs_bytes_per_rank"]), _mib(r["local_score_rows_bytes"]),
                            _mib(r["full_score_matrix_bytes"]), _mib(r["score_tile_bound_bytes"])) for r in records]
        lines.append("peak = growth of the resident set during ring fwd+bwd (manual kernel); "
                     "scores in the accumulation dtype")
    return "\n".join(lines)


def _local_tables(records: Sequence[dict[str, Any]]) -> list[str]:
    """The local mode's tables: the layers (local on P ranks, the global ring, local in one
    process), then the attention alone against FlexAttention."""
    lines: list[str] = []
    layers = [r for r in records if r["impl"] in ("local", "ring", "local_single")]
    if layers:
        table = _Columns(("nside", ">5"), ("window", ">6"), ("P", ">2"), ("thr", ">3"), ("implementation", "<26"),
                         ("fwd ms", ">7"), ("f+b ms", ">7"), ("(min)", ">6"), ("eff fb", ">6"), ("vs ring", ">7"),
                         ("MiB peak", ">8"), ("MiB sent", ">8"))
        lines += table.head()
        names = {"local": "local", "ring": "global ring", "local_single": "local, 1 process"}
        for r in layers:
            name = names[r["impl"]] + ("" if r["impl"] == "ring" else f" ({r['mode']})")
            lines.append(table.row(
                r["nside"], r["window_nside"], r["world_size"], r["threads_per_rank"], name, _ms(r["fwd_s"], 7),
                _ms(r["fwd_bwd_s"], 7), _ms(r["fwd_bwd_min_s"], 6), _opt(r, "efficiency_fwd_bwd"),
                _opt(r, "speed_vs_ring_fwd_bwd"), _mib(max(r["peak_mem_bytes_per_rank"])),
                _mib(max(r["bytes_per_rank"]))) + _noisy_flag(r))
        lines.append("window = window_nside (nside / 8); eff fb = t(local, 1 process, same total threads) / "
                     "t(local); vs ring = t(global ring) / t(local);\ntimes: median (and minimum) "
                     "of forward+backward, each repeat the slowest rank's; MiB peak / sent: the "
                     "largest rank's; ! = median > 2x minimum (busy machine)")
    attention = [r for r in records if r["impl"] in ("attention", "flex")]
    if attention:
        if lines:
            lines.append("")
        table = _Columns(("nside", ">5"), ("window", ">6"), ("mode", "<13"), ("thr", ">3"), ("implementation", "<28"),
                         ("fwd min", ">8"), ("fwd med", ">8"), ("fwd cpu", ">8"), ("vs flex", ">7"), ("(cpu)", ">6"),
                         ("f+b min", ">8"), ("f+b/f", "6.2f"), ("(cpu)", ">6"))
        lines += table.head()
        for r in attention:
            name = f"FlexAttention, block {r['block_size']}" if r["impl"] == "flex" else "healpix_local_attention"
            lead = (r["nside"], r["window_nside"], r["mode"], r["threads"], name)
            if "error" in r:
                lines.append(table.row(*lead) + f" did not build ({r['error'].split(':')[0]})")
                continue
            times = (_ms(r["fwd_min_s"], 8), _ms(r["fwd_s"], 8), _ms(r["fwd_cpu_min_s"], 8))
            against = () if r["impl"] == "flex" else (
                _opt(r, "speed_vs_flex_fwd"), _opt(r, "speed_vs_flex_fwd_cpu"), _ms(r["fwd_bwd_min_s"], 8),
                r["fwd_bwd_over_fwd"], _opt(r, "fwd_bwd_over_fwd_cpu"))
            lines.append(table.row(*lead, *times, *against))
        lines.append("the attention alone on [B, H, N, D] in one process, runs alternating; ms: minimum, "
                     "median and CPU-time minimum of the forward; vs flex = t(FlexAttention,\nits faster "
                     "block size) / t(ours) from the forward minima (wall, cpu); f+b/f = our forward+backward "
                     "over our forward (minima); FlexAttention compiles no backward on CPU")
    return lines


def _cross_tables(records: Sequence[dict[str, Any]]) -> list[str]:
    """The cross mode's two tables: time and memory, then bytes (and, with a window, savings)."""
    def grids(r: dict[str, Any]) -> str:
        return f"{r['case'][:3]} {r['nside_k']}->{r['nside_q']}"

    def name(r: dict[str, Any]) -> str:
        return "1 process, window" if r.get("impl") == "windowed_single" else implementation_name(r)

    table = _Columns(("case", "<10"), ("window", "<16"), ("P", ">2"), ("thr", ">3"), ("implementation", "<17"),
                     ("fwd ms", ">7"), ("f+b ms", ">7"), ("(min)", ">6"), ("eff f", ">5"), ("eff fb", ">6"),
                     ("MiB peak", ">8"), ("/1 proc", ">7"), ("QxK MiB", ">8"))
    lines = table.head()
    for r in records:
        lead = (grids(r), r["window"], r.get("world_size", 0), r.get("threads_per_rank", 0), name(r))
        if "skipped" in r:
            lines.append(table.row(*lead) + f" skipped: {r['skipped']}")
            continue
        lines.append(table.row(
            *lead, _ms(r["fwd_s"], 7), _ms(r["fwd_bwd_s"], 7), _ms(r["fwd_bwd_min_s"], 6), _opt(r, "efficiency_fwd"),
            _opt(r, "efficiency_fwd_bwd"), _mib(max(r["peak_mem_bytes_per_rank"])), _opt(r, "peak_mem_vs_single"),
            _mib(r["full_score_matrix_bytes"])) + _noisy_flag(r))
    lines.append("case: source nside -> target nside (enc = data -> latent, dec = latent -> data); "
                 "thr = threads per rank;\ntimes: median (and minimum) over the repeats, each repeat "
                 "the slowest rank's; eff = t(1 process, same total\nthreads) / t: the 1-process layer "
                 "(SpatialCrossAttention), or with a window the windowed layer on one\nprocess "
                 "(Note [windowed baseline] in bench.py); MiB peak: the largest rank's growth of memory "
                 "during\nforward+backward; /1 proc = that / the 1-process row's; QxK MiB: one Nq x Nk "
                 "score matrix\n(accumulation dtype), never built; ! = median > 2x minimum (busy machine)")

    table = _Columns(("case", "<10"), ("window", "<16"), ("implementation", "<17"), ("fwd MiB/rank", ">13"),
                     ("bwd MiB/rank", ">13"), ("= closed form", ">13"), ("bytes skip", ">10"), ("blocks skip", ">11"),
                     ("pairs skip", ">10"))
    lines += ["", *table.head()]
    for r in records:
        if r.get("impl") != "hpattn_dist" or "skipped" in r:
            continue
        expected = r.get("expected_bytes_per_rank")
        if any(e is None for e in expected):
            match = "-"
        else:
            match = "yes" if [e["forward"] for e in expected] == r["fwd_bytes_per_rank"] and \
                [e["backward"] for e in expected] == r["bwd_bytes_per_rank"] else "NO"
        loc = r.get("locality") or {}
        lines.append(table.row(
            grids(r), r["window"], name(r), "/".join(_mib(b) for b in r["fwd_bytes_per_rank"]),
            "/".join(_mib(b) for b in r["bwd_bytes_per_rank"]), match, _opt(loc, "fwd_bytes_skipped", ".1%"),
            _opt(loc, "blocks_skipped", ".1%"), _opt(loc, "pairs_skipped", ".1%")))
    lines.append("bytes sent per rank (rank 0/rank 1/...), shape handshakes excluded; = closed form: "
                 "forward and backward\nequal, on every rank, expected_cross_bytes (no window) or "
                 "windowed_cross_bytes (the halo of\nhpattn_dist.local.window_traffic) in "
                 "hpattn_dist/tools/bench.py; with a window, skipped: bytes =\nthe dense ring's forward "
                 "bytes not sent (counted), blocks = cell blocks and pairs = (query, key)\npairs not "
                 "computed (window_traffic)")
    return lines


def check_plot_target(path: Path, mode: str) -> None:
    """Refuse a ``--plot`` request BEFORE the benchmark runs: only the scaling mode is plotted,
    matplotlib must import, and ``path`` must be a writable ``.png`` in an existing folder.

    Raises:
        ValueError: naming what is wrong and how to fix it.
    """
    if mode != "scaling":
        raise ValueError(f"--plot draws the scaling mode only (time and efficiency over nside), "
                         f"not --mode {mode}; drop --plot or use --json")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'hpattn-dist[plot]' (or "
                         "pip install matplotlib), or drop --plot") from None
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"--plot {path}: the plot is a PNG, give a path ending in .png")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"--plot {path}: the folder {folder} does not exist")
    if path.is_dir() or not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"--plot {path}: cannot write there")


def scaling_figure(reports: Sequence[dict[str, Any]]) -> Any:
    """The matplotlib Figure of scaling records: forward+backward time (left) and efficiency
    against the single-process layer (right) over nside; one line per implementation and world
    size, told apart by marker (implementation) and line style (world size) as well as colour.

    Raises:
        ValueError: no timed scaling record in ``reports`` (nothing to draw).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator

    times: dict[tuple, dict[int, float]] = {}
    effs: dict[tuple, dict[int, float]] = {}
    meta: dict[str, Any] = {}
    for report in reports:
        for r in report.get("records", []):
            if r.get("impl") not in ("oracle", "hpattn_dist", "deepspeed_ulysses") or "fwd_bwd_s" not in r:
                continue
            key = (implementation_name(r), r["world_size"], r.get("threads_per_rank", 1))
            times.setdefault(key, {})[r["nside"]] = r["fwd_bwd_s"] * 1e3  # oracle: once per nside
            if "efficiency_fwd_bwd" in r:
                effs.setdefault(key, {})[r["nside"]] = r["efficiency_fwd_bwd"]
            meta = {k: r.get(k) for k in ("batch", "embed_dim", "num_heads", "dtype")}
            meta["device"] = report.get("device", "cpu")
    if not times:
        raise ValueError("--plot: the run produced no timed scaling record (every case skipped?), "
                         "so there is nothing to draw")
    names = sorted({k[0] for k in times}, key=lambda n: (n != "1-process layer", n))
    # line style by TOTAL threads, so a P-rank line and the 1-process baseline it is measured
    # against (P x threads_per_rank threads) share it
    def total_threads(key: tuple) -> int:
        return key[2] if key[0] == "1-process layer" else key[1] * key[2]

    markers = dict(zip(names, "osD^vP*Xh<>"))
    styles = dict(zip(sorted({total_threads(k) for k in times}), ["-", "--", ":", "-."] * 4))
    colours = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    nsides = sorted({n for line in times.values() for n in line})

    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(11, 4.6))
    for key in sorted(times, key=lambda k: (names.index(k[0]), k[1])):
        name, world, threads = key
        oracle = name == "1-process layer"
        plural = "s" if threads > 1 else ""
        label = (f"{name}, {threads} thread{plural}" if oracle
                 else f"{name}, {world} ranks x {threads} thread{plural}")
        style = {"marker": markers[name], "color": colours[name],
                 "linestyle": styles[total_threads(key)], "linewidth": 2.4 if oracle else 1.4}
        pts = sorted(times[key].items())
        ax_t.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
        if key in effs:
            pts = sorted(effs[key].items())
            ax_e.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
    for ax in (ax_t, ax_e):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(nsides))
        ax.set_xticklabels([f"{n}\n(N={12 * n * n:,})" for n in nsides])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("nside (N = 12 nside\u00b2 pixels)")
        ax.grid(True, which="major", alpha=0.3)
        if len(nsides) == 1:
            ax.set_xlim(nsides[0] / 1.5, nsides[0] * 1.5)
    ax_t.set_yscale("log")
    ax_t.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax_t.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax_t.yaxis.set_minor_formatter(NullFormatter())
    ax_t.set_ylabel("forward + backward time per call [ms]")
    ax_t.set_title("Time (median; lower is better)")
    ax_e.axhline(1.0, color="grey", linewidth=1, linestyle=(0, (4, 4)))
    ax_e.set_ylabel("efficiency = t(1-process layer) / t")
    ax_e.set_title("Efficiency vs 1 process, same total threads (1 = ideal)")
    if len(styles) > 1:
        ax_t.text(0.02, 0.98, "line style: total threads\n" + ", ".join(
            f"{n}: {'solid' if st == '-' else {'--': 'dashed', ':': 'dotted', '-.': 'dash-dot'}[st]}"
            for n, st in styles.items()), transform=ax_t.transAxes, va="top", fontsize=8)
    if not effs:
        ax_e.text(0.5, 0.5, "no single-process baseline\n(run without --no-oracle)",
                  ha="center", va="center", transform=ax_e.transAxes)
    handles, labels = ax_t.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(
        f"hpattn-dist bench: attention layer, B={meta.get('batch')}, E={meta.get('embed_dim')}, "
        f"H={meta.get('num_heads')}, {meta.get('dtype')}, {meta.get('device')}")
    rows = -(-len(labels) // min(3, len(labels)))
    fig.tight_layout(rect=(0, 0.06 * rows + 0.02, 1, 1))
    return fig


def plot_scaling(reports: Sequence[dict[str, Any]], path: Path) -> None:
    """Write :func:`scaling_figure` of ``reports`` to the PNG ``path``.

    Raises:
        ValueError: matplotlib is not installed (``pip install hpattn-dist[plot]``), or nothing to
            draw (no timed scaling record): no file is written then.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("--plot needs matplotlib (pip install 'hpattn-dist[plot]')") from None
    import matplotlib.pyplot as plt

    fig = scaling_figure(reports)
    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
