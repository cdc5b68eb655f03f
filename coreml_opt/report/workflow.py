"""Workflow ``report.json`` files (``coreml-opt run``) read as stages: metric, size and the package each wrote.

The reader follows coreml_opt.workflows' report (``stages`` with ``metric``, ``weight_bytes``,
``bits_per_weight``, ``package``, ``status``; top-level ``metric``, ``baseline``, ``plan``) and
tolerates near variants (a bare list of stages, ``bytes``/``accuracy`` keys).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .run_folder import RunFolder, _read_json

logger = logging.getLogger(__name__)

_METRIC_KEYS = ("metric", "accuracy", "measured_metric", "value")
_BYTES_KEYS = ("bytes", "weight_bytes", "bytes_after", "size_bytes", "size")
_PACKAGE_KEYS = ("package", "mlpackage", "output", "path")


_EXTRA_FIRST = ("method", "status", "torch_metric", "seconds", "error")


@dataclass
class Stage:
    """One workflow stage's result."""

    name: str
    metric: float | None
    metric_name: str | None
    bytes: int | None
    bits_per_weight: float | None
    package: str | None  # file name of the stage's .mlpackage
    package_label: str | None  # its path relative to the run folder
    source: str
    extra: dict[str, Any] = field(default_factory=dict)
    runtime_metric: float | None = None  # measured on the package itself by the package runtime (``--measure``)


@dataclass
class WorkflowRun:
    """One workflow report: its stages plus the baseline and plan it records."""

    path: Path
    name: str | None
    metric: str | None
    baseline: dict[str, float]
    fp16_bytes: int | None
    plan: dict[str, Any] | None
    stages: list[Stage]


def _first(item: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((item[k] for k in keys if item.get(k) is not None), None)


def _number(value: Any) -> float | None:
    if isinstance(value, dict):  # {"accuracy": 0.98} or {"value": ...}
        value = _first(value, _METRIC_KEYS) if _first(value, _METRIC_KEYS) is not None else next(
            (v for v in value.values() if isinstance(v, (int, float))), None)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _locate(package: str, report_path: Path, folder: RunFolder) -> Path:
    """A stage's package path as recorded (absolute, or relative to the report or the run folder), else its name
    beside the report (the folder may have moved since the run)."""
    for candidate in (Path(package), report_path.parent / package, folder.root / package,
                      report_path.parent / Path(package).name):
        if candidate.exists():
            return candidate
    return report_path.parent / Path(package).name


def read_workflow(path: Path, folder: RunFolder) -> WorkflowRun:
    """One workflow report.json: its stages, baseline (fp32/fp16 metric), fp16 bytes and plan."""
    doc = _read_json(path)
    top = doc if isinstance(doc, dict) else {}
    baseline = {k: float(v) for k, v in (top.get("baseline") or {}).items() if isinstance(v, (int, float))}
    plan = top.get("plan") if isinstance(top.get("plan"), dict) and top.get("plan") else None
    return WorkflowRun(path, top.get("name"), top.get("metric") if isinstance(top.get("metric"), str) else None,
                       baseline, top.get("fp16_weight_bytes"), plan, read_stages(path, folder))


def read_stages(path: Path, folder: RunFolder) -> list[Stage]:
    """Stages of one workflow report.json (a ``stages`` list, or a bare list of stage objects)."""
    doc = _read_json(path)
    stages = doc.get("stages") if isinstance(doc, dict) else doc
    metric_name = doc.get("metric") if isinstance(doc, dict) and isinstance(doc.get("metric"), str) else None
    out = []
    for index, item in enumerate(stages or []):
        if not isinstance(item, dict):
            continue
        name = str(item.get("name") or item.get("stage") or item.get("kind") or f"stage {index + 1}")
        package = _first(item, _PACKAGE_KEYS)
        package_path = _locate(package, path, folder) if isinstance(package, str) else None
        raw_bytes = _first(item, _BYTES_KEYS)
        params = item.get("params") or item.get("total_params")
        bpw = _number(item.get("bits_per_weight"))
        if bpw is None and isinstance(raw_bytes, (int, float)) and params:
            bpw = 8.0 * raw_bytes / params
        plain = {k: v for k, v in item.items() if isinstance(v, (str, int, float, bool)) and k not in
                 ("name", "stage", "kind", *_METRIC_KEYS, *_BYTES_KEYS, *_PACKAGE_KEYS, "bits_per_weight",
                  "runtime_metric")}
        extra = {k: plain[k] for k in sorted(plain, key=lambda k: (_EXTRA_FIRST + (k,)).index(k))}
        out.append(Stage(name, _number(_first(item, _METRIC_KEYS)), str(item.get("metric_name") or metric_name or "")
                         or None, int(raw_bytes) if isinstance(raw_bytes, (int, float)) else None, bpw,
                         package_path.name if package_path else None,
                         folder.relative(package_path) if package_path else None,
                         f"workflow {folder.relative(path)}", extra, _number(item.get("runtime_metric"))))
    return out
