"""The docstrings' reStructuredText markup as Markdown: one conversion for the API pages (a griffe
extension, ``mkdocs.yml``) and the Notes page (:mod:`notes`).

The docstrings are written for readers of the source (``:func:`x``` roles, ``Note [name]``
headings underlined with ``~``, simple tables, ``::`` before literal blocks). Markdown would show a
role as text, open a code fence at a ``~~~`` underline and run a table's rows together, so each is
rewritten into its Markdown form here and nowhere else; the sources stay as they are.
"""

from __future__ import annotations

import re

try:
    import griffe
except ImportError:  # the docs extra is absent: the conversion (and the Notes collector) still work
    griffe = None

_ROLE = re.compile(r":(?:func|class|mod|meth|data|attr|obj|exc|py:\w+):`(~?)([^`]+)`")
_NOTE_HEADING = re.compile(r"^(?P<indent>[ \t]*)(?P<title>Note \[[^\]]+\])[ \t]*\n(?P=indent)~{3,}[ \t]*$", re.M)
_TABLE_RULE = re.compile(r"^[ \t]*=+(?:[ \t]+=+)+[ \t]*$")


def _role(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def _fence_tables(text: str) -> str:
    """A simple table (three ``=== ===`` rules) becomes a fenced text block, aligned as written."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        if _TABLE_RULE.match(lines[i]):
            rules = [j for j in range(i, len(lines)) if _TABLE_RULE.match(lines[j])][:3]
            if len(rules) == 3:
                indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
                out += [indent + "```text", *lines[i: rules[2] + 1], indent + "```"]
                i = rules[2] + 1
                continue
        out.append(lines[i])
        i += 1
    return "\n".join(out)


_NOTE_REF = re.compile(r"(?<![\[\w])Note \[([^\]\n]+)\](?!\])")


def note_anchor(name: str) -> str:
    """The anchor of ``Note [name]`` on the Notes page (``docs/notes.md``)."""
    return "note-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def link_notes(text: str) -> str:
    """Every ``Note [name]`` outside code becomes a cross-reference to the Notes page."""
    out, fence = [], False
    for line in text.split("\n"):
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
        if fence or line.lstrip().startswith("#") or line.startswith("    "):
            out.append(line)
            continue
        parts = line.split("`")  # even parts lie outside inline code
        out.append("`".join(_NOTE_REF.sub(lambda m: f"[Note \\[{m[1]}\\]][{note_anchor(m[1])}]", p) if i % 2 == 0
                            else p for i, p in enumerate(parts)))
    return "\n".join(out)


def rst_to_markdown(text: str) -> str:
    """The Markdown form of a docstring's reStructuredText markup (see the module docstring)."""
    text = _ROLE.sub(_role, text)
    text = _NOTE_HEADING.sub(lambda m: f"{m['indent']}**{m['title']}**", text)
    text = re.sub(r"(\S)::[ \t]*$", r"\1:", text, flags=re.M)
    text = re.sub(r"^[ \t]*::[ \t]*\n", "", text, flags=re.M)
    return link_notes(_fence_tables(text))


if griffe is not None:

    class RstMarkup(griffe.Extension):
        """Rewrites every docstring with :func:`rst_to_markdown` before mkdocstrings renders it."""

        def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
            if obj.docstring is not None:
                obj.docstring.value = rst_to_markdown(obj.docstring.value)
