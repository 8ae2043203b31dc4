"""The tools' TOML configuration: where the package's defaults are and how a table is read."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

__all__ = ["default_config_path", "load_section"]


def default_config_path(name: str) -> Optional[Path]:
    """The package's default ``<name>.toml`` (``hpattn_dist/tools/configs/``, shipped as package
    data), or None when there is none."""
    path = Path(__file__).resolve().parent / "configs" / f"{name}.toml"
    return path if path.is_file() else None


def load_section(path: Optional[Path], section: str, cls: type) -> dict[str, Any]:
    """Table ``[section]`` of the TOML file ``path`` as keyword arguments of dataclass ``cls``.

    Raises:
        ValueError: the file lacks the table, or the table has a key that ``cls`` does not know.
    """
    if path is None:
        return {}
    import tomllib

    with open(path, "rb") as f:
        data = tomllib.load(f)
    if section not in data:
        raise ValueError(f"config {path}: no [{section}] table")
    table = data[section]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ValueError(f"config {path}: unknown key(s) {unknown} in [{section}]; known: {sorted(known)}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
