"""The package's floors: every import of ``hpattn_dist`` points down or sideways, never up.

``FLOORS`` below is the one statement of the layering (docs/design.md points here). A module
belongs to the floor of the longest prefix that names it; it may import modules on its own floor
or below. Imports inside functions and under ``TYPE_CHECKING`` count: deferring an import hides
an arrow from the interpreter, not from the design. A second check keeps each floor free of
import circles (two modules that import each other, directly or through others).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, NamedTuple

import hpattn_dist

PACKAGE = "hpattn_dist"
ROOT = Path(hpattn_dist.__path__[0])

# Bottom up. A package name stands for all its modules unless a longer name says otherwise.
FLOORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundations: dtypes, input checks, masks, the merge, the shard plan, tracing",
     ("precision", "validation", "double_backward", "masks", "merge", "shard_plan", "tracing")),
    ("block kernels", ("kernels",)),
    ("communication", ("comm",)),
    ("geometry, groups, costs, replicated state, the oracle, the attention spec",
     ("healpix", "mesh", "replicas", "grad_sync", "swap_modules", "shutdown", "oracle", "cost_model",
      "local.windows", "io", "attention_spec")),
    ("the plans and the executors, global and windowed", ("strategies", "local")),
    ("the door: the public attention functions", ("strategies.api", "local.attention")),
    ("layers and model helpers", ("distributed_layer", "modules", "cross", "local.modules", "checkpoint")),
    ("integrations", ("integrations",)),
    ("tool pieces", ("tools.platform", "tools.config", "tools.tolerances", "tools.allocations",
                     "tools.bench_report")),
    ("what the checks and benchmarks share", ("tools.verify_cases", "tools.bench_config", "tools.bench_measure")),
    ("checks and benchmarks", ("tools",)),
    ("the verify and bench commands", ("tools.verify", "tools.bench")),
    ("the command line and the public API", ("tools.cli", "__main__", "")),
)

# Arrows up and circles that are still there, each with the change that removes it. The tests fail
# on a new one and on an entry here that no longer exists, so this list only shrinks.
PENDING_UP: dict[tuple[str, str], str] = {}
PENDING_CIRCLES: dict[frozenset[str], str] = {}


def _floor_table() -> dict[str, int]:
    table = {}
    for level, (_, names) in enumerate(FLOORS):
        for name in names:
            full = f"{PACKAGE}.{name}" if name else PACKAGE
            assert full not in table, f"{full} is on two floors"
            table[full] = level
    return table


_FLOOR_OF = _floor_table()


def floor_of(module: str) -> int:
    """The floor of the longest prefix in ``FLOORS`` that names ``module``."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        level = _FLOOR_OF.get(".".join(parts[:end]))
        if level is not None:
            return level
    raise AssertionError(f"{module} is on no floor: add it to FLOORS")


class Arrow(NamedTuple):
    source: str
    target: str
    line: int


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str, root: Path) -> bool:
    path = root.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def package_arrows(root: Path = ROOT) -> Iterator[Arrow]:
    """Every import of a package module by a package module, function-level ones included.

    ``from pkg import name`` points at ``pkg.name`` when that is a module, else at ``pkg``.
    """
    for path in sorted(root.rglob("*.py")):
        source = _module_name(path, root)
        package = source if path.name == "__init__.py" else source.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [f"{module}.{alias.name}" if _is_module(f"{module}.{alias.name}", root)
                           else module
                           for alias in node.names]
            else:
                continue
            for target in dict.fromkeys(targets):
                if target == PACKAGE or target.startswith(PACKAGE + "."):
                    yield Arrow(source, target, node.lineno)


def _is_facade_arrow(a: Arrow) -> bool:
    """A package's ``__init__`` re-exporting one of its own modules."""
    return a.target.startswith(a.source + ".")


def _effective_floors(arrows) -> dict[str, int]:
    """A package ``__init__`` stands as high as the highest of its own modules it re-exports."""
    floors: dict[str, int] = {}
    for a in arrows:
        if _is_facade_arrow(a):
            floors[a.source] = max(floors.get(a.source, floor_of(a.source)), floor_of(a.target))
    return floors


def arrows_up(arrows) -> list[Arrow]:
    """The arrows whose target stands on a higher floor than their source."""
    arrows = list(arrows)
    facade = _effective_floors(arrows)
    return [a for a in arrows
            if not _is_facade_arrow(a) and facade.get(a.target, floor_of(a.target)) > floor_of(a.source)]


def circles_within_floors(arrows) -> list[list[str]]:
    """Import circles among modules of one floor (a package ``__init__`` re-exporting its own
    modules is not a circle with them: arrows into a package's ``__init__`` from inside it are
    left out)."""
    graph: dict[str, set[str]] = {}
    for a in arrows:
        inside_own_package = a.source.startswith(a.target + ".")
        if a.source != a.target and not inside_own_package and not _is_facade_arrow(a) and floor_of(a.source) == floor_of(a.target):
            graph.setdefault(a.source, set()).add(a.target)
    circles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return circles


def test_every_module_is_on_a_floor():
    for path in ROOT.rglob("*.py"):
        floor_of(_module_name(path))


def test_no_import_points_up():
    up = [a for a in arrows_up(package_arrows()) if (a.source, a.target) not in PENDING_UP]
    assert up == [], "imports that point up a floor (tests/unit/test_import_floors.py FLOORS):\n" + "\n".join(
        f"  {a.source}:{a.line} -> {a.target} ({FLOORS[floor_of(a.source)][0]!r} -> "
        f"{FLOORS[floor_of(a.target)][0]!r})" for a in up)


def test_pending_arrows_still_exist():
    seen = {(a.source, a.target) for a in arrows_up(package_arrows())}
    assert set(PENDING_UP) <= seen, f"gone, remove from PENDING_UP: {set(PENDING_UP) - seen}"
    circles = {frozenset(c) for c in circles_within_floors(package_arrows())}
    gone = {c for c in PENDING_CIRCLES if not any(c >= found for found in circles)}
    assert not gone, f"gone, remove from PENDING_CIRCLES: {gone}"


def test_no_import_circle_within_a_floor():
    circles = [c for c in circles_within_floors(package_arrows())
               if not any(frozenset(c) <= pending for pending in PENDING_CIRCLES)]
    assert circles == [], "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_the_checks_see_function_level_and_relative_imports(tmp_path):
    # A made-up package: a foundation module importing a tool inside a function, relatively.
    pkg = tmp_path / PACKAGE
    (pkg / "tools").mkdir(parents=True)
    for name in ("__init__.py", "tools/__init__.py", "tools/cli.py"):
        (pkg / name).write_text("")
    (pkg / "precision.py").write_text("def f():\n    from .tools import cli\n")
    (pkg / "tools" / "verify_local.py").write_text("import hpattn_dist.tools.verify_cross\n")
    (pkg / "tools" / "verify_cross.py").write_text("from hpattn_dist.tools import verify_local\n")
    arrows = list(package_arrows(pkg))
    assert [(a.source, a.target) for a in arrows_up(arrows)] == [
        ("hpattn_dist.precision", "hpattn_dist.tools.cli")]
    assert circles_within_floors(arrows) == [
        ["hpattn_dist.tools.verify_cross", "hpattn_dist.tools.verify_local", "hpattn_dist.tools.verify_cross"]]
