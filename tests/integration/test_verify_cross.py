"""verify's cross-grid cases: pass at world 1 and 2 for every backend and dtype (an encoder and a
decoder), and fail when an error is injected (the check can fail)."""

from __future__ import annotations

import torch

from hpattn_dist.tools.verify import VerifyConfig, load_field
from hpattn_dist.tools.verify_cases import run_oracle_cases
from hpattn_dist.tools.verify_cross import cross_cases
from tests.harness import run_ranks
from tests.integration.test_verify_local import cli_case_labels, family_rows

SOURCES = (4, 1)  # queries on nside 2: an encoder (4 -> 2) and a decoder (1 -> 2)


def _run(rank: int, world_size: int, inject_error: float) -> list[tuple[str, bool]]:
    return family_rows(cross_cases, 2, inject_error, source_nsides=SOURCES)


def test_cross_cases_pass_at_world_1_and_2() -> None:
    for world_size in (1, 2):
        for rows in run_ranks(_run, world_size, 0.0, timeout=120):
            assert len(rows) == len(SOURCES) * 2 * 3 and all(ok for _, ok in rows), rows


def test_cross_cases_fail_with_an_injected_error() -> None:
    rows = _run(0, 1, 0.5)  # above every dtype's tolerance
    assert rows and not any(ok for _, ok in rows), rows


def test_cli_verify_runs_cross_nsides(tmp_path) -> None:
    assert cli_case_labels(tmp_path, "--cross-nsides", "4,1") == ["ring", "cross:4", "cross:1"]


def _run_window(rank: int, world_size: int, inject_error: float) -> list[tuple[str, bool]]:
    cfg = VerifyConfig(nside=2, batch=2, embed_dim=8, num_heads=2, backends=("manual",),
                       dtypes=("float64", "float32"), inject_error=inject_error, cross_nsides=SOURCES,
                       cross_window="neighbourhood:1")
    x = load_field(cfg)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return [(r.strategy, r.passed) for r in run_oracle_cases(cfg, cross_cases(cfg, x), g)]


def test_cross_window_rows_pass_and_fail_with_an_injected_error() -> None:
    """One process (the sharded windowed layer runs at P = 2..5 in tests/distributed/test_cross_window.py)."""
    rows = _run_window(0, 1, 0.0)
    labels = [label for label, _ in rows]
    assert labels == ["cross:4"] * 2 + ["cross:4:nbhd:1"] * 2 + ["cross:1"] * 2 + ["cross:1:nbhd:1"] * 2
    assert all(ok for _, ok in rows), rows
    assert not any(ok for _, ok in _run_window(0, 1, 0.5))
