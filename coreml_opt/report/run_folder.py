"""Find what a run folder holds: a sensitivity sweep, plans, packages, workflow reports and plots.

A run folder is any folder the user points ``coreml-opt report`` at: a sweep output folder itself, or
a parent holding one, plan YAML (``coreml-opt plan -o``), the plan's ``--json`` output saved to a
file, ``.mlpackage`` files and workflow ``report.json`` files. Nothing is required; what is missing is
listed so the report can say so.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)

MAX_DEPTH = 3  # how deep below the run folder to look
_SKIP_DIRS = {"__pycache__", "node_modules", ".git", ".venv"}


@dataclass
class RunFolder:
    """Paths of everything found under ``root`` (each list sorted, most relevant first)."""

    root: Path
    sweep_dir: Path | None = None
    plans: list[Path] = field(default_factory=list)  # plan YAML files
    plan_jsons: list[Path] = field(default_factory=list)  # `coreml-opt plan --json` outputs saved to files
    packages: list[Path] = field(default_factory=list)  # .mlpackage folders
    workflow_reports: list[Path] = field(default_factory=list)  # workflow report.json files
    front_pngs: list[Path] = field(default_factory=list)  # Pareto plots written by `coreml-opt plan --front`

    def missing(self) -> list[str]:
        """One line for each kind of input the folder lacks."""
        out = []
        if self.sweep_dir is None:
            out.append("sensitivity sweep (a folder with sweep.json and trials.json): no heatmap, no re-plotted Pareto "
                       "front, no accuracy baseline")
        if not self.plans and not self.plan_jsons:
            out.append("plan (YAML from `coreml-opt plan -o`, or its `--json` output): no chosen plan to mark, no "
                       "per-layer specs")
        if not self.packages:
            out.append(".mlpackage: no measured inventory (sizes come from the sweep's byte model only)")
        if not self.workflow_reports:
            out.append("workflow report.json: no per-stage results")
        return out

    def describe(self) -> list[tuple[str, str]]:
        """(kind, path relative to root) for every input found."""
        rel = self.relative
        rows = [("sensitivity sweep", rel(self.sweep_dir))] if self.sweep_dir else []
        rows += [("plan", rel(p)) for p in self.plans] + [("plan result (JSON)", rel(p)) for p in self.plan_jsons]
        rows += [("package", rel(p)) for p in self.packages]
        rows += [("workflow report", rel(p)) for p in self.workflow_reports]
        rows += [("Pareto plot", rel(p)) for p in self.front_pngs]
        return rows

    def relative(self, path: Path | None) -> str:
        """``path`` relative to the run folder when inside it ('.' for the folder itself)."""
        if path is None:
            return "-"
        try:
            return str(Path(path).resolve().relative_to(self.root.resolve())) or "."
        except ValueError:
            return str(path)


def _walk(root: Path, depth: int = 0) -> Iterator[Path]:
    """Files and .mlpackage folders under ``root`` (packages are not entered), breadth first."""
    try:
        entries = sorted(root.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        logger.warning("cannot list %s: %s", root, exc)
        return
    subdirs = []
    for entry in entries:
        if entry.name.startswith(".") or entry.name in _SKIP_DIRS:
            continue
        if entry.is_dir() and entry.suffix == ".mlpackage":
            yield entry
        elif entry.is_dir():
            subdirs.append(entry)
        elif entry.is_file():
            yield entry
    if depth < MAX_DEPTH:
        for sub in subdirs:
            yield from _walk(sub, depth + 1)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_plan_json(doc: Any) -> bool:
    """True for the object `coreml-opt plan --json` prints (a solved plan and/or a front)."""
    return isinstance(doc, dict) and (("layers" in doc and "bits_per_weight" in doc) or
                                      isinstance(doc.get("front"), list))


def is_workflow_report(doc: Any) -> bool:
    """True for a workflow report.json: a mapping with a list of stages, or a list of stage mappings."""
    stages = doc.get("stages") if isinstance(doc, dict) else doc
    return isinstance(stages, list) and bool(stages) and all(isinstance(s, dict) for s in stages)


def _is_plan_yaml(path: Path) -> bool:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and bool({"global", "layers", "op_types", "skip"} & set(data))


def discover(root: str | os.PathLike) -> RunFolder:
    """Everything report-worthy under ``root`` (up to three folders deep)."""
    from ..errors import DataError

    root = Path(root)
    if not root.is_dir():
        raise DataError(str(root), "is not a folder", "pass the run folder (a sweep output folder or its parent)")
    found = RunFolder(root)
    sweeps: list[Path] = []
    for path in _walk(root):
        if path.suffix == ".mlpackage":
            found.packages.append(path)
        elif path.name == "sweep.json" and (path.parent / "trials.json").is_file():
            sweeps.append(path.parent)
        elif path.suffix in (".yaml", ".yml") and _is_plan_yaml(path):
            found.plans.append(path)
        elif path.suffix == ".json" and path.name not in ("sweep.json", "trials.json"):
            doc = _read_json(path)
            if is_plan_json(doc):
                found.plan_jsons.append(path)
            elif path.name == "report.json" and is_workflow_report(doc):
                found.workflow_reports.append(path)
        elif path.suffix == ".png" and ("front" in path.name or "pareto" in path.name.lower()):
            found.front_pngs.append(path)
    if len(sweeps) > 1:
        logger.warning("%d sweeps under %s; reporting the shallowest, %s", len(sweeps), root, sweeps[0])
    found.sweep_dir = sweeps[0] if sweeps else None
    # The most recently written plan first: it is most likely the one the packages were made with.
    for items in (found.plans, found.plan_jsons, found.workflow_reports):
        items.sort(key=lambda p: -p.stat().st_mtime)
    return found
