"""Reading the YAML files users write (plans, workflows, sweeps) with one-line errors."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .errors import CoreMLOptError


def read_yaml_mapping(path: str | os.PathLike, error: type[CoreMLOptError], kind: str,
                      allowed: set[str] | None = None) -> dict[str, Any]:
    """Load a YAML file holding a mapping; a missing file, bad syntax (with its line), a non-mapping or
    unknown keys raise ``error`` naming the file, the problem and the fix."""
    path = Path(path)
    if not path.is_file():
        raise error(str(path), "does not exist", f"check the path of the {kind} file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise error(str(path), f"is not valid YAML{where}", "fix the syntax") from None
    if not isinstance(data, dict):
        raise error(str(path), f"is not a mapping of {kind} fields", f"write `key: value` lines ({kind} file)")
    if allowed is not None and set(data) - allowed:
        raise error(str(path), f"has unknown field(s) {sorted(set(data) - allowed)}", f"use only {sorted(allowed)}")
    return data


def path_beside(value: str | os.PathLike, base: str | os.PathLike) -> Path:
    """A path named in a YAML file: absolute as written, relative resolved against ``base`` (the folder of
    the file that names it), never against the current directory; normalised (``a/b/../c`` -> ``a/c``), so
    printed paths read as the user would write them."""
    path = Path(os.path.expanduser(str(value)))
    return Path(os.path.normpath(path if path.is_absolute() else Path(base) / path))


def model_beside(value: Any, base: str | os.PathLike) -> Any:
    """A ``model:`` (or ``reference:``) value from a YAML file or sweep.json, resolved as :func:`data_beside` does."""
    return data_beside(value, base)


def data_beside(value: Any, base: str | os.PathLike, names: tuple[str, ...] = ()) -> Any:
    """A ``data:`` (or ``model:``) value from a YAML file or sweep.json: built-in ``names`` and
    ``package.module:fn`` factories as written; a path (a folder, an .npz, an .mlpackage), or the file of a
    ``path/to/file.py:fn`` factory, resolved beside the file (see :func:`path_beside`), never the cwd."""
    if not isinstance(value, str) or value in names:
        return value
    head, sep, fn = value.rpartition(":")
    if sep and head.endswith(".py"):
        return f"{path_beside(head, base)}:{fn}"
    if sep and not os.path.isabs(value):
        return value
    return str(path_beside(value, base))
