"""``hpattn-dist bench`` reports: the plot (inspected as matplotlib objects), the refusals of a
``--plot`` that cannot be drawn (before anything is measured), and the scaling table."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from hpattn_dist.tools import bench
from hpattn_dist.tools.bench import BenchConfig
from hpattn_dist.tools.bench_report import check_plot_target, format_tables, plot_scaling, scaling_figure


def _record(impl, strategy, world, nside, fb_ms, *, eff=None, threads=1, min_ms=None):
    rec = {"impl": impl, "strategy": strategy, "world_size": world, "threads_per_rank": threads,
           "nside": nside, "npix": 12 * nside**2, "batch": 1, "embed_dim": 128, "num_heads": 4,
           "dtype": "float32", "kernel": "sdpa:cpu_flash", "fwd_s": fb_ms / 3e3, "fwd_bwd_s": fb_ms / 1e3,
           "fwd_min_s": fb_ms / 3e3, "fwd_bwd_min_s": (min_ms or fb_ms) / 1e3,
           "peak_mem_bytes_per_rank": [2**20] * world, "bytes_per_rank": [2**21] * world}
    if eff is not None:
        rec["efficiency_fwd"] = rec["efficiency_fwd_bwd"] = eff
    return rec


def _report():
    records = []
    for nside, base in ((8, 90.0), (16, 400.0)):
        records.append(_record("oracle", None, 1, nside, base, threads=2))
        records.append(_record("hpattn_dist", "auto", 2, nside, base / 1.2, eff=1.2))
        records.append(_record("hpattn_dist", "ring", 2, nside, base / 0.9, eff=0.9))
        records.append(_record("deepspeed_ulysses", "ulysses", 2, nside, base / 1.1, eff=1.1))
    records.append({"impl": "hpattn_dist", "strategy": "hybrid", "world_size": 2, "nside": 8, "npix": 768,
                    "skipped": "no Ulysses degree"})
    return {"device": "cpu", "records": records}


def test_figure_has_title_labels_units_and_user_names():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    fig = scaling_figure([_report()])
    try:
        ax_t, ax_e = fig.axes
        assert "hpattn-dist bench" in fig._suptitle.get_text() and "E=128" in fig._suptitle.get_text()
        assert ax_t.get_title() and ax_e.get_title()
        assert "[ms]" in ax_t.get_ylabel() and "nside" in ax_t.get_xlabel()
        assert "efficiency" in ax_e.get_ylabel()
        fig.canvas.draw()
        ticks = [t.get_text() for t in ax_t.get_xticklabels()]
        assert ticks == ["8\n(N=768)", "16\n(N=3,072)"], ticks
        y_ticks = [t.get_text() for t in ax_t.get_yticklabels() if t.get_text()]
        assert y_ticks and not any("^" in t or "$" in t for t in y_ticks), y_ticks
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert labels == ["1-process layer, 2 threads", "DeepSpeed-Ulysses, 2 ranks x 1 thread",
                          "hpattn auto=Ulysses, 2 ranks x 1 thread", "hpattn ring, 2 ranks x 1 thread"]
        markers = [line.get_marker() for line in ax_t.get_lines()]
        assert len(set(markers)) == len(markers) == 4  # not told apart by colour alone
        # the efficiency panel: one line per distributed implementation, the records' values
        eff = {line.get_label(): list(line.get_ydata()) for line in ax_e.get_lines() if line.get_label()[0] != "_"}
        assert eff["hpattn ring, 2 ranks x 1 thread"] == [0.9, 0.9]
        assert "1-process layer, 2 threads" not in eff
    finally:
        plt.close(fig)


def test_plot_with_nothing_to_draw_raises_and_writes_no_file(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "empty.png"
    emulation = {"records": [{"impl": "ring_emulation", "nside": 8, "blocks": 2}]}
    with pytest.raises(ValueError, match="nothing to draw"):
        plot_scaling([emulation], out)
    assert not out.exists()
    plot_scaling([_report()], out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_target_is_checked_before_running(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="scaling mode only"):
        check_plot_target(tmp_path / "x.png", "emulation")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
        with pytest.raises(ValueError, match=r"needs matplotlib: pip install 'hpattn-dist\[plot\]'"):
            check_plot_target(tmp_path / "x.png", "scaling")
    pytest.importorskip("matplotlib")
    check_plot_target(tmp_path / "ok.png", "scaling")
    with pytest.raises(ValueError, match="does not exist"):
        check_plot_target(tmp_path / "no" / "such" / "x.png", "scaling")
    with pytest.raises(ValueError, match="ending in .png"):
        check_plot_target(tmp_path / "x.pdf", "scaling")


def test_cli_bench_refuses_a_plot_without_matplotlib_before_measuring(tmp_path, monkeypatch):
    def measured(*_a, **_k):
        raise AssertionError("the benchmark ran before --plot was checked")

    monkeypatch.setattr(bench, "run_scaling", measured)
    args = SimpleNamespace(plot=tmp_path / "scaling.png", json_path=None)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
        with pytest.raises(ValueError, match="needs matplotlib"):
            bench.cli_bench(BenchConfig(), args, torch.device("cpu"))
    pytest.importorskip("matplotlib")
    args.plot = tmp_path / "missing-folder" / "scaling.png"  # a bad path fails before the run too
    with pytest.raises(ValueError, match="does not exist"):
        bench.cli_bench(BenchConfig(), args, torch.device("cpu"))


def test_scaling_table_is_narrow_names_implementations_and_warns_when_noisy():
    records = _report()["records"]
    records[2] = _record("hpattn_dist", "ring", 2, 8, 300.0, eff=0.3, min_ms=100.0)  # median 3x min
    text = format_tables(records, "scaling")
    assert max(len(line) for line in text.splitlines()) <= 110
    assert "hpattn auto=Ulysses" in text and "DeepSpeed-Ulysses" in text and "deepspeed_ulysses" not in text
    flagged = [line for line in text.splitlines() if line.endswith(" !")]
    assert len(flagged) == 1 and "hpattn ring" in flagged[0]
    assert "WARNING: 1 row(s)" in text
    assert "WARNING" not in format_tables(_report()["records"], "scaling")
