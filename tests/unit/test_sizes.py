"""Sizes a newcomer can hold: no module of the package over 700 lines, a README read in ten minutes.

The limits are issue 28's goals; a file that grows past them is split by job (as tools/bench*.py
and integrations/idx_flow/{reductions,dropouts}.py were), and the README's reference material
lives in docs/ (docs/guide, docs/api).
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_MODULE_LINES = 700
MAX_README_LINES = 400


def test_no_module_over_700_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "hpattn_dist").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}, f"modules over {MAX_MODULE_LINES} lines (split them by job): {long}"


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (> {MAX_README_LINES}): move reference material to docs/"
