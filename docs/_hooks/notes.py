"""MkDocs hook: the front page, the Notes page and the floors table, read from the sources at build time.

The long reasoning of the library lives in ``Note [name]`` blocks beside the code it explains
(module and function docstrings, and ``# Note [name]`` comment blocks). ``docs/notes.md`` holds
the marker ``<!-- notes -->``; this hook replaces it with every Note of ``hpattn_dist/`` (then
those of ``tests/`` and ``launch/``), grouped by file, so the page never holds a second copy that could drift. Likewise ``<!-- floors -->``
becomes the table of the package's floors, read from ``FLOORS`` in
``tests/unit/test_import_floors.py``, the test that holds the imports to it; and
``<!-- readme -->`` (``docs/index.md``) becomes the README, the one front page.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from rst_markup import link_notes, note_anchor, rst_to_markdown  # noqa: E402  (beside this file)

MARKER = "<!-- notes -->"
_HEADING = re.compile(r"^(?P<indent>[ \t]*)(?P<comment># )?Note \[(?P<name>[^\]]+)\]"
                      r"(?:[ \t]*$|(?(comment):[ \t]+(?P<inline>\S.*)|(?!)))")
_REFERENCE = re.compile(r"Note \[([^\]]+)\]")
SOURCES = ("hpattn_dist", "tests", "launch")  # where Notes are defined, the library first
_UNDERLINE = re.compile(r"^[ \t]*(# )?~{3,}[ \t]*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _dedent(lines: list[str]) -> str:
    body = [line for line in lines if line.strip()]
    cut = min((_indent(line) for line in body), default=0)
    return "\n".join(line[cut:] for line in lines).strip("\n")


def _comment_body(lines: list[str], start: int, indent: str) -> list[str]:
    body = []
    for line in lines[start:]:
        if not (line.startswith(indent + "# ") or line.rstrip() == indent + "#"):
            break
        body.append(line[len(indent) + 2:])
    return body


def _docstring_body(lines: list[str], start: int, indent: int) -> list[str]:
    first = next((line for line in lines[start:] if line.strip()), "")
    nested = _indent(first) > indent  # the body is an indented block under the heading
    body = []
    for line in lines[start:]:
        text = line.strip()
        if text.startswith('"""') or (text and nested and _indent(line) <= indent) or (
                not nested and _HEADING.match(line) and _indent(line) == indent):
            break
        if text.endswith('"""'):
            body.append(line[: line.rindex('"""')])
            break
        body.append(line)
    return body


def collect_notes(package: Path) -> list[tuple[str, str, int, str, bool]]:
    """``(file, name, line, body, inline)`` of every Note under ``package``, in file order (a Note is a
    line ``Note [name]`` alone, optionally underlined with ``~``, or a comment ``# Note [name]``
    alone or followed by ``:`` and its first sentence)."""
    notes = []
    for path in sorted(package.rglob("*.py")):
        lines = path.read_text().split("\n")
        for i, line in enumerate(lines):
            match = _HEADING.match(line)
            if match is None:
                continue
            start = i + 1 + (i + 1 < len(lines) and bool(_UNDERLINE.match(lines[i + 1])))
            if match["comment"]:
                body = ([match["inline"]] if match["inline"] else []) + _comment_body(lines, start, match["indent"])
            else:
                body = _docstring_body(lines, start, _indent(line))
            rel = path.relative_to(package.parent).as_posix()
            notes.append((rel, match["name"], i + 1, _dedent(body), bool(match["inline"])))
    return notes


def all_notes(root: Path) -> list[tuple[str, str, int, str]]:
    """``(file, name, line, body)`` of every Note of :data:`SOURCES`; a comment that opens with a
    Note's name and a colon defines it only where no block of that name exists (elsewhere it is a
    comment on that Note)."""
    found = [note for source in SOURCES for note in collect_notes(root / source)]
    blocks = {name for _, name, _, _, inline in found if not inline}
    return [(rel, name, line, body) for rel, name, line, body, inline in found if not inline or name not in blocks]


def note_references(text: str) -> set[str]:
    """The names of the Notes ``text`` points to, also where a name is split over two lines of a
    comment or of two adjacent string literals."""
    joined = re.sub(r"[ \t]*\n[ \t]*(?:#[ \t]*)?", " ", text)
    joined = re.sub(r"[\"'][ \t]+[\"']", "", joined)
    return {re.sub(r"\s+", " ", name) for name in _REFERENCE.findall(joined)}


def render_notes(root: Path) -> str:
    out, current = [], None
    for rel, name, line, body in all_notes(root):
        if rel != current:
            out.append(f"## `{rel}`\n")
            current = rel
        out.append(f"### Note \\[{name}\\] {{#{note_anchor(name)}}}\n\n*line {line}*\n\n{rst_to_markdown(body)}\n")
    return "\n".join(out)




FLOORS_MARKER = "<!-- floors -->"


def render_floors(test_file: Path) -> str:
    """The ``FLOORS`` table of ``tests/unit/test_import_floors.py`` (its one statement) as Markdown."""
    tree = ast.parse(test_file.read_text())
    value = next(node.value for node in tree.body if isinstance(node, ast.AnnAssign)
                 and getattr(node.target, "id", None) == "FLOORS")
    rows = ["| floor | what | modules |", "| --- | --- | --- |"]
    for level, (what, names) in enumerate(ast.literal_eval(value)):
        modules = ", ".join(f"`hpattn_dist.{n}`" if n else "`hpattn_dist` (the public API)" for n in names)
        rows.append(f"| {level} | {what} | {modules} |")
    return "\n".join(rows)


README_MARKER = "<!-- readme -->"


def readme_for_site(readme: str) -> str:
    """The README as the site's front page: its links into ``docs/`` made relative to it."""
    return re.sub(r"\]\(docs/", "](", readme)


def on_page_markdown(markdown: str, page, config, files) -> str:
    root = Path(config["config_file_path"]).parent
    if README_MARKER in markdown:
        markdown = markdown.replace(README_MARKER, readme_for_site((root / "README.md").read_text()))
    if MARKER not in markdown:
        markdown = link_notes(markdown)  # the Notes page links its bodies itself
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, render_notes(root))
    if FLOORS_MARKER in markdown:
        markdown = markdown.replace(FLOORS_MARKER, render_floors(root / "tests" / "unit" / "test_import_floors.py"))
    return markdown
