"""The documentation: every Note a reader is pointed to exists, and the site builds without a
warning (``mkdocs build --strict``, only where the ``docs`` extra is installed)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_notes():
    """``docs/_hooks/notes.py``: the collector the Notes page is built with."""
    spec = importlib.util.spec_from_file_location("hpattn_dist_docs_notes", ROOT / "docs" / "_hooks" / "notes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


notes = _load_notes()


def _defined() -> list[str]:
    return [name for _, name, _, _ in notes.all_notes(ROOT)]


def test_collector_reads_each_form_of_note(tmp_path):
    (tmp_path / "m.py").write_text(
        '"""Module.\n\nNote [under lined]\n~~~~~~~~~~~~~~~~~~\nFirst body\nline two.\n"""\n\n'
        'def f():\n    """F.\n\n    Note [indented]\n        Nested body.\n\n    Args:\n        x: y.\n    """\n\n'
        '# Note [comment block]\n# Comment body.\nx = 1\n'
        '# Note [inline]: first sentence,\n# then more.\n')
    got = [(name, body) for _, name, _, body, _ in notes.collect_notes(tmp_path)]
    assert got == [("under lined", "First body\nline two."), ("indented", "Nested body."),
                   ("comment block", "Comment body."), ("inline", "first sentence,\nthen more.")]


def test_note_references_across_lines():
    text = '# see Note [one\n# two] and "Note [three " "four]" and Note [five]'
    assert notes.note_references(text) == {"one two", "three four", "five"}


def test_every_note_is_defined_once():
    names = _defined()
    assert sorted({n for n in names if names.count(n) > 1}) == []


def test_every_note_pointed_to_exists():
    texts = [*(ROOT / "hpattn_dist").rglob("*.py"), ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
    defined = set(_defined())
    dangling = {f"{name!r} ({path.relative_to(ROOT)})" for path in texts
                for name in notes.note_references(path.read_text()) if name not in defined}
    assert not dangling, f"Notes pointed to that no source defines: {sorted(dangling)}"


_DOCS_EXTRA = ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python")


@pytest.mark.skipif(any(importlib.util.find_spec(m.split(".")[0]) is None for m in _DOCS_EXTRA),
                    reason="the docs extra is not installed (pip install -e '.[docs]')")
def test_site_builds_without_warnings(tmp_path):
    site = tmp_path / "site"
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "WARNING" not in run.stderr, run.stderr
    page = (site / "notes" / "index.html").read_text()
    missing = [name for name in _defined() if f"Note [{name}]" not in page]
    assert not missing, f"Notes missing from the Notes page: {missing}"
    assert "Quick start" in (site / "index.html").read_text()  # the README is the front page
    api = (site / "api" / "functions" / "index.html").read_text()
    assert "ring_attention" in api and ":func:" not in api
