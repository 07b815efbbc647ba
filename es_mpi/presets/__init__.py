"""Named configs shipped with es-mpi: `es-mpi train --preset NAME`.

A preset is a TOML file here, with the keys of a `--config` file; its first line is a
comment describing it (shown by `es-mpi train --help`). Relative paths in a preset
(`task_data`) are relative to this directory, as in any config file (es_mpi.config.
load_toml), so they resolve the same from a git checkout and from an installed wheel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from es_mpi.config import load_toml
from es_mpi.errors import EsError

PRESET_DIR = Path(__file__).parent


def names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def path(name: str) -> Path:
    found = PRESET_DIR / f"{name}.toml"
    if not found.is_file():
        raise EsError(f"unknown preset {name!r}; choose one of {', '.join(names())}")
    return found


def description(name: str) -> str:
    """The preset's first line, without its comment sign."""
    first = path(name).read_text().splitlines()[0] if path(name).stat().st_size else ""
    return first.lstrip("#").strip()


def load(name: str) -> dict[str, Any]:
    """The preset's settings, its relative paths made absolute (load_toml)."""
    return load_toml(path(name))


def help_text() -> str:
    """The presets and their descriptions, for `es-mpi train --help`."""
    width = max(len(n) for n in names())
    return "\n".join(f"  {n:<{width}}  {description(n)}" for n in names())
