"""Gather a run folder's results into one ``RunReport``: inventories, accuracy, plots, stages, guidance.

Sizes come from the packages found (the original and each compressed one); accuracy from the
sweep's baseline, the plan's measured metric (from its ``--json`` output, else measured now in
PyTorch with the simulation engine, which equals Core ML's stored weights) and workflow reports.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..model.inventory import Inventory, WeightInfo
from ..plan import Plan
from ..storage import predicted_bytes
from .guidance import Advice, UsedSpec, advise
from .run_folder import RunFolder, _read_json, discover
from .workflow import Stage, WorkflowRun, read_workflow

logger = logging.getLogger(__name__)


@dataclass
class Package:
    """A package found in the run folder and its inventory."""

    label: str
    path: Path
    inventory: Inventory
    _index: dict = field(default_factory=dict, init=False, repr=False)

    @property
    def compressed(self) -> bool:
        return any(w.is_compressed for w in self.inventory.weights)

    def weight_for(self, weight: WeightInfo) -> WeightInfo | None:
        """This package's copy of ``weight`` (an original's weight): by PyTorch name, else by Core ML name
        (packages exported from torch-side compression rename the consts but keep the torch names)."""
        if not self._index:
            self._index = {("t", w.torch_name): w for w in self.inventory.weights if w.torch_name}
            self._index.update({("c", w.name): w for w in self.inventory.weights})
        return self._index.get(("t", weight.torch_name)) or self._index.get(("c", weight.name))


@dataclass
class ResultRow:
    """One line of the before/after table: a model variant, its metric and its size."""

    label: str
    metric: float | None
    bytes: int | None
    bits_per_weight: float | None
    source: str
    package: str | None = None  # label of the package the row measures


@dataclass
class RunReport:
    """Everything the HTML and Markdown pages show."""

    folder: RunFolder
    sweep: dict[str, Any] | None = None
    trials: list = field(default_factory=list)
    heatmap_png: bytes | None = None
    plan: Plan | None = None
    plan_path: Path | None = None
    plan_result: dict[str, Any] | None = None
    original: Package | None = None
    original_derived: bool = False  # True: the fp16 sizes come from the compressed package's shapes
    compressed: list[Package] = field(default_factory=list)
    primary: Package | None = None  # the compressed package the summary describes
    specs: dict[str, str] = field(default_factory=dict)  # weight const name -> spec (from the plan)
    used: list[UsedSpec] = field(default_factory=list)  # what the guidance is derived from
    results: list[ResultRow] = field(default_factory=list)
    front_png: bytes | None = None
    front_note: str = ""
    plan_point: dict[str, Any] | None = None  # where the chosen plan sits on the Pareto plot
    layers_png: bytes | None = None
    workflows: list[WorkflowRun] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)
    advice: list[Advice] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what could not be done, and why

    @property
    def metric(self) -> str:
        return (self.sweep or {}).get("metric") or next((s.metric_name for s in self.stages if s.metric_name), None) \
            or (self.plan_result or {}).get("metric") or "metric"

    @property
    def fraction(self) -> bool:
        """Accuracy-like metric (shown in percent)."""
        from ..units import is_fraction

        return is_fraction(self.metric, (self.sweep or {}).get("unit"))

    @property
    def target(self) -> str | None:
        if self.plan is not None and self.plan.target:
            return self.plan.target
        package = self.primary or self.original
        return f"iOS{package.inventory.deployment_target}" if package else (self.sweep or {}).get("target")

    def before_after(self) -> tuple[ResultRow | None, ResultRow | None]:
        """The rows the summary header compares: the fp16 original and the primary compressed model."""
        before = next((r for r in self.results if r.label.startswith("original")), None)
        candidates = [r for r in self.results if r.bytes is not None and not r.label.startswith(("original", "fp32"))]
        primary = self.primary.label if self.primary else None
        after = next((r for r in candidates if primary and r.package == primary), candidates[-1] if candidates else None)
        return before, after


def fp16_view(inventory: Inventory) -> Inventory:
    """The inventory the model had before compression: same weights, fp16 bytes from the byte model."""
    ios18 = inventory.deployment_target >= 18
    weights = [replace(w, compression="fp16", bytes=predicted_bytes("none", w.shape, w.reader_type, ios18_ops=ios18,
                                                                     precision=w.dtype))
               for w in inventory.weights]
    return Inventory(weights, inventory.deployment_target, inventory.other_bytes)


def _load_packages(report: RunReport) -> None:
    from ..errors import CoreMLOptError
    from ..model.package import load_package

    for path in report.folder.packages:
        try:
            inventory = load_package(path, load_weights=False).inventory
        except CoreMLOptError as exc:
            report.notes.append(f"skipped {report.folder.relative(path)}: {exc}")
            continue
        package = Package(report.folder.relative(path), path, inventory)
        if package.compressed:
            report.compressed.append(package)
        elif report.original is None:
            report.original = package
    order = {s.package: i for i, s in enumerate(report.stages) if s.package}  # workflow stages in run order
    report.compressed.sort(key=lambda p: (order.get(p.path.name, len(order)), p.label))
    emitted = (report.plan_result or {}).get("emitted")
    by_name = {p.path.name: p for p in report.compressed}
    last_stage = next((s.package for s in reversed(report.stages) if s.package), None)
    report.primary = (by_name.get(Path(emitted).name) if emitted else None) \
        or (by_name.get(Path(last_stage).name) if last_stage else None) \
        or max(report.compressed, key=lambda p: p.path.stat().st_mtime, default=None)
    if report.original is None and report.primary is not None:
        report.original = Package(f"{report.primary.label} (fp16 sizes of its shapes)", report.primary.path,
                                  fp16_view(report.primary.inventory))
        report.original_derived = True


def _resolve_specs(report: RunReport) -> list[UsedSpec]:
    """The plan's spec for every weight of the model (by Core ML const name)."""
    from ..errors import CoreMLOptError
    from ..spec import parse_spec

    if report.plan is None:
        return []
    base = report.original.inventory if report.original else None
    if base is not None:
        try:
            resolved = report.plan.resolve(base)
        except CoreMLOptError as exc:
            report.notes.append(f"the plan does not fit the packages found ({exc}); specs shown as the plan names them")
        else:
            report.specs = {name: str(spec) for name, spec in resolved.items()}
            return [UsedSpec(w.torch_name or w.name, w.reader_type, w.shape, resolved[w.name]) for w in base.weights]
    layers = {row["layer"]: row for row in (report.sweep or {}).get("layers", [])}
    used = []
    for name, spec in report.plan.layers.items():
        row = layers.get(name, {})
        report.specs[row.get("coreml_name") or name] = str(spec)
        used.append(UsedSpec(name, row.get("op_type", "linear"), tuple(row.get("shape", ())), parse_spec(spec)))
    return used


def collect(root: str | os.PathLike, *, measure: bool = True, bits: tuple[float, ...] = (2, 3, 4, 5, 6, 8)) -> RunReport:
    """Read everything under ``root``; ``measure`` lets it evaluate plans in PyTorch where no file has the figure."""
    from ..errors import CoreMLOptError
    from .accuracy import fill_results
    from .plots import layer_bits_png

    report = RunReport(discover(root))
    found = report.folder
    if found.sweep_dir is not None:
        from ..sensitivity import load_sweep

        try:
            report.sweep, report.trials = load_sweep(found.sweep_dir)
        except CoreMLOptError as exc:
            report.notes.append(str(exc))
        heatmap = found.sweep_dir / "heatmap.png"
        report.heatmap_png = heatmap.read_bytes() if heatmap.is_file() else None
        if report.sweep is not None and report.heatmap_png is None:
            report.notes.append(f"{found.relative(found.sweep_dir)} has no heatmap.png (rerun the sweep to draw it)")
    if found.plan_jsons:
        report.plan_result = _read_json(found.plan_jsons[0])
    for path in found.plans:
        try:
            report.plan, report.plan_path = Plan.load(path), path
            break
        except CoreMLOptError as exc:
            report.notes.append(f"skipped plan {found.relative(path)}: {exc}")
    if report.plan is None and (report.plan_result or {}).get("layers"):
        report.plan = Plan.from_dict({"layers": report.plan_result["layers"], "target": (report.sweep or {}).get(
            "target")}, str(found.plan_jsons[0]))
        report.plan_path = found.plan_jsons[0]
    for path in found.workflow_reports:
        run = read_workflow(path, found)
        report.workflows.append(run)
        report.stages += run.stages
    if report.plan is None and any(run.plan for run in report.workflows):
        run = next(run for run in report.workflows if run.plan)
        try:
            report.plan, report.plan_path = Plan.from_dict(run.plan, str(run.path)), run.path
        except CoreMLOptError as exc:
            report.notes.append(f"the plan in {found.relative(run.path)} is unreadable: {exc}")
    _load_packages(report)
    used = report.used = _resolve_specs(report)
    if not used and report.primary is not None:
        report.notes.append("no plan found: guidance below covers the deployment target only")
    package = report.primary or report.original
    report.advice = advise(used, package.inventory.deployment_target if package else None,
                           report.plan.target if report.plan else None) if (used or package) else []
    fill_results(report, measure=measure, bits=bits)
    if report.original is not None:
        report.layers_png = layer_bits_png(report.original, report.compressed)
    return report
