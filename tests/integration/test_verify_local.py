"""verify's local-attention cases: pass at world 1 and 2 for every backend and dtype, and fail
when an error is injected (the check can fail). ``family_rows`` and ``cli_case_labels`` serve
``test_verify_cross.py`` too."""

from __future__ import annotations

from typing import Callable

import torch

from hpattn_dist.tools.verify import VerifyConfig, load_field
from hpattn_dist.tools.verify_cases import run_oracle_cases
from hpattn_dist.tools.verify_local import local_cases
from tests.harness import run_ranks

WINDOWS = ("neighbourhood:2", "cell:4")


def family_rows(cases: Callable, nside: int, inject_error: float, **which) -> list[tuple[str, bool]]:
    """``(row, passed)`` of every case of one verify family (``cases``, with its own selection
    ``which``) on a small field, backends manual and sdpa, dtypes float64, float32 and bfloat16."""
    cfg = VerifyConfig(nside=nside, batch=2, embed_dim=8, num_heads=2, backends=("manual", "sdpa"),
                       dtypes=("float64", "float32", "bfloat16"), inject_error=inject_error)
    x = load_field(cfg)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return [(f"{r.strategy} {r.backend} {r.dtype}", r.passed) for r in run_oracle_cases(cfg, cases(cfg, x, **which), g)]


def cli_case_labels(tmp_path, *flags: str) -> list[str]:
    """The case labels of ``hpattn-dist verify`` at nside 2 on 2 ranks (ring, manual, float64) with
    ``flags`` added; every case must pass and none be skipped."""
    import json

    from hpattn_dist.tools.cli import main

    out = tmp_path / "verify.json"
    rc = main(["verify", "--nside", "2", "--batch", "1", "--embed-dim", "8", "--heads", "2",
               "--nproc", "2", "--strategies", "ring", "--backends", "manual", "--dtypes", "float64",
               *flags, "--json", str(out)])
    assert rc == 0
    run = json.loads(out.read_text())  # one world size: the run's report itself
    assert run["world_size"] == 2 and all(c["passed"] and c["skipped"] is None for c in run["cases"])
    return [c["strategy"] for c in run["cases"]]


def _run(rank: int, world_size: int, inject_error: float) -> list[tuple[str, bool]]:
    return family_rows(local_cases, 4, inject_error, windows=WINDOWS)


def test_local_cases_pass_at_world_1_and_2() -> None:
    for world_size in (1, 2):
        for rows in run_ranks(_run, world_size, 0.0, timeout=120):
            assert len(rows) == len(WINDOWS) * 2 * 3 and all(ok for _, ok in rows), rows


def test_local_cases_fail_with_an_injected_error() -> None:
    rows = _run(0, 1, 0.5)  # above every dtype's tolerance
    assert rows and not any(ok for _, ok in rows), rows


def test_cli_verify_runs_local_windows(tmp_path) -> None:
    assert cli_case_labels(tmp_path, "--local-windows", "neighbourhood:1,cell:2") == ["ring", "nbhd:1", "cell:2"]
