"""Run a workflow: convert once, validate every stage against the plan, run stages, write reports.

A stage that fails is recorded with its name and reason; the stages before it keep their packages
and the report says which stage failed and why. ``report.json``/``report.md`` are rewritten
atomically after every stage, so a crash leaves the report of everything finished.
"""
from __future__ import annotations

import json
import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from torch import nn

from ..data import Dataset
from ..model.package import atomic_output, load_package, make_output_folder
from .config import BUILTIN_DATA, Workflow, load_workflow
from .stages import StageContext, StageOutcome, check_stage, method_of, run_stage

logger = logging.getLogger(__name__)


@dataclass
class StageResult:
    """One stage as reported: status ok | failed | skipped, with its figures or its error."""

    name: str
    kind: str
    method: str
    status: str
    seconds: float = 0.0
    outcome: Optional[StageOutcome] = None
    error: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "method": self.method, "status": self.status,
                               "seconds": round(self.seconds, 2)}
        if self.error:
            out["error"] = self.error
        o = self.outcome
        if o is not None:
            inv = o.inventory
            out.update(package=str(o.package), metric=o.metric, torch_metric=o.torch_metric,
                       runtime_metric=o.runtime_metric,
                       weight_bytes=inv.total_bytes, bits_per_weight=round(inv.bits_per_weight, 4),
                       max_relative_diff={k: float(f"{v:.3g}") for k, v in o.max_relative_diff.items()},
                       notes=o.notes, extra=o.extra,
                       weights=[{"name": w.name, "torch_name": w.torch_name, "compression": w.compression,
                                 "bytes": w.bytes} for w in inv.weights])
        return out


@dataclass
class WorkflowResult:
    """Everything a run measured; ``ok`` is False when a stage failed."""

    name: str
    out: Path
    metric: str
    baseline: dict[str, float]
    fp16_bytes: int
    stages: list[StageResult] = field(default_factory=list)
    plan: dict[str, Any] = field(default_factory=dict)
    measured: bool = False  # stages were also measured on their packages by the package runtime

    @property
    def ok(self) -> bool:
        return all(s.status == "ok" for s in self.stages)

    @property
    def failed(self) -> Optional[StageResult]:
        return next((s for s in self.stages if s.status == "failed"), None)

    def metrics(self) -> dict[str, float]:
        """Stage name -> metric of every finished stage."""
        return {s.name: s.outcome.metric for s in self.stages if s.outcome is not None}

    def to_dict(self) -> dict[str, Any]:
        failed = self.failed
        return {"name": self.name, "metric": self.metric, "plan": self.plan, "baseline": self.baseline,
                "fp16_weight_bytes": self.fp16_bytes, "ok": self.ok, "measured_on_package": self.measured,
                "failed_stage": failed.name if failed else None, "stages": [s.to_dict() for s in self.stages]}

    def summary(self) -> str:
        """A Markdown table: metric (in % for accuracy-like metrics, see :mod:`coreml_opt.units`) and size before and
        per stage; with ``measured``, also each package's metric run by the package runtime."""
        from ..units import format_metric, is_fraction

        def show(value: float | None) -> str:
            return format_metric(value, is_fraction(self.metric))

        on = " on package |" if self.measured else ""
        lines = [f"# workflow {self.name}", "", f"metric: {self.metric} (measured in PyTorch on the weights each "
                 "package holds" + ("; 'on package': the package itself, run by the package runtime" if self.measured
                                    else "") + ")", "",
                 f"| stage | method | status | metric |{on} torch model | weight bytes | bits/w |",
                 "|---|---|---|---|" + ("---|" if on else "") + "---|---|---|",
                 f"| fp32 (PyTorch) | - | ok | {show(self.baseline['fp32'])} |{' - |' if on else ''} - | - | 32 |",
                 f"| fp16 package | - | ok | {show(self.baseline['fp16'])} |"
                 + (f" {show(self.baseline['fp16_package'])} |" if 'fp16_package' in self.baseline else
                    (" - |" if on else "")) + f" - | {self.fp16_bytes} | 16 |"]
        for s in self.stages:
            o = s.outcome
            if o is None:
                lines.append(f"| {s.name} | {s.method} | {s.status} | - |{' - |' if on else ''} - | - | - |")
                continue
            pm = f" {show(o.runtime_metric)} |" if on else ""
            lines.append(f"| {s.name} | {s.method} | {s.status} | {show(o.metric)} |{pm} {show(o.torch_metric)} | "
                         f"{o.inventory.total_bytes} | {o.inventory.bits_per_weight:.2f} |")
        for s in self.stages:
            for note in (s.outcome.notes if s.outcome else []):
                lines.append(f"\n- {s.name}: {note}")
        failed = self.failed
        if failed:
            lines.append(f"\n**stage {failed.name} failed**: {failed.error}")
            lines.append("earlier stages' packages are kept in " + str(self.out))
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        """report.json and report.md in the output folder, each written atomically."""
        for name, text in (("report.json", json.dumps(self.to_dict(), indent=2, default=str)),
                           ("report.md", self.summary())):
            with atomic_output(self.out / name) as tmp:
                tmp.write_text(text)


def load_data(source: Any) -> Dataset:
    """A Dataset from a built-in name (digits-train, digits-test), a folder, an .npz, a function or a DataLoader."""
    if isinstance(source, str) and source in BUILTIN_DATA:
        from ..zoo import digits_split

        x_tr, y_tr, x_te, y_te = digits_split()
        return Dataset(x_tr, y_tr, source) if source == "digits-train" else Dataset(x_te, y_te, source)
    from ..evaluation import resolve_data

    return resolve_data(source)


def _auto_plan(workflow: Workflow, out_dir: Path, progress: bool) -> dict[str, Any]:
    """The optional first step of a workflow: sensitivity sweep, then the planner's optimal plan under
    the budget; the plan replaces ``workflow.plan`` (and is saved as plan.yaml with the rest)."""
    from ..planning import plan_from_sweep
    from ..sensitivity import analyse

    sweep_options = dict(workflow.auto_plan["sensitivity"])
    source = sweep_options.pop("data", workflow.eval_data)
    data = load_data(source) if isinstance(source, str) and source in BUILTIN_DATA else source
    sweep_dir = out_dir / "sensitivity"
    # Compensated rungs (+gptq, +bc) only where every stage can ship them: data_free stages that name the
    # calibration data their statistics are collected on (calibration and fine-tuning stages compress themselves)
    sweep_options.setdefault("compensate", all(s.kind == "data_free" and "data" in s.options for s in workflow.stages))
    analyse(workflow.model, workflow.input_shape, data, target=workflow.target, out_dir=sweep_dir, progress=progress,
            **sweep_options)
    model = workflow.model if not isinstance(workflow.model, str) else None
    chosen = plan_from_sweep(sweep_dir, model=model, data=data, **workflow.auto_plan["budget"])
    plan = chosen.plan
    plan.target = workflow.target
    workflow.plan = plan
    logger.info("auto plan: %s", chosen.summary().replace("\n", "; "))
    return {"sweep": str(sweep_dir), "budget": chosen.budget, "bits_per_weight": round(chosen.bits_per_weight, 4),
            "predicted_drop": chosen.predicted_drop, "measured_drop": chosen.measured_drop}


def measure_on_package(evaluator: Any, package: Path, notes: list[str]) -> Optional[float]:
    """``evaluator`` on the package itself (package runtime); None, with a note saying why, when the runtime
    cannot run it (e.g. a W8A8 package's activation quantization ops)."""
    from ..measure import measure_with
    from ..model.check import runtime_reason

    try:
        return measure_with(evaluator, package)
    except Exception as exc:  # an op the runtime lacks, or its own limits: never fail a stage that succeeded
        why = runtime_reason(exc)
    notes.append(f"not measured on the package: {why}")
    logger.warning("%s: not measured on the package: %s", package, why)
    return None


def run_workflow(workflow: Workflow | str | os.PathLike, out: str | os.PathLike | None = None,
                 progress: bool = True, measure: bool = False) -> WorkflowResult:
    """Run every stage of ``workflow`` (a Workflow or a YAML path); never raises for a failing stage.

    ``measure`` (or the workflow's ``eval: {measure: true}``) also scores each stage's package itself with the
    package runtime, beside the metric measured in PyTorch on its weights."""
    from ..model.convert import convert, example_inputs, fold_batchnorm, load_factory
    from ..evaluation import Evaluator
    from .export import package_weights_model
    from .torch_configs import bare_parameters, planned_modules

    if not isinstance(workflow, Workflow):
        workflow = load_workflow(workflow)
    out_dir = Path(out) if out is not None else workflow.out
    make_output_folder(out_dir)  # one line for an unwritable folder, before any work
    model = load_factory(workflow.model) if isinstance(workflow.model, str) else workflow.model
    if not isinstance(model, nn.Module):
        from ..errors import ModelError

        raise ModelError(repr(model)[:60], "is not a torch.nn.Module", "pass a module or package.module:factory")
    reference = fold_batchnorm(model, example_inputs(model, workflow.input_shape)).eval()
    base = out_dir / "fp16.mlpackage"
    convert(model, workflow.input_shape, target=workflow.target, output_path=base)
    inventory = load_package(base, load_weights=False).inventory
    auto = _auto_plan(workflow, out_dir, progress) if workflow.auto_plan else None
    specs = planned_modules(workflow.plan, inventory)
    bare = bare_parameters(workflow.plan, inventory)
    for stage in workflow.stages:  # plan/method mismatches fail now, before any stage runs
        check_stage(stage, specs, workflow.target, bare)
    workflow.plan.save(out_dir / "plan.yaml")
    eval_data = load_data(workflow.eval_data) if not (callable(workflow.metric) or ":" in str(workflow.metric)) else None
    evaluator = Evaluator(workflow.metric, eval_data, reference, workflow.eval_batch_size)
    ctx = StageContext(workflow.plan, specs, reference, base, workflow.input_shape, workflow.target, evaluator,
                       load_data, out_dir, workflow.seed, progress)
    result = WorkflowResult(workflow.name, out_dir, evaluator.name,
                            {"fp32": evaluator(reference), "fp16": evaluator(package_weights_model(base, reference))},
                            inventory.total_bytes, plan=workflow.plan.to_dict())
    if auto is not None:
        result.plan["auto_plan"] = auto
    result.measured = measure or workflow.measure
    if result.measured:
        notes: list[str] = []
        fp16_package = measure_on_package(evaluator, base, notes)
        if fp16_package is not None:
            result.baseline["fp16_package"] = fp16_package
    result.stages = [StageResult(s.name, s.kind, method_of(s, specs), "skipped") for s in workflow.stages]
    result.write()
    for stage, record in zip(workflow.stages, result.stages):
        start = time.perf_counter()
        logger.info("stage %s (%s)", stage.name, record.method)
        try:
            record.outcome = run_stage(stage, ctx)
            if result.measured:
                record.outcome.runtime_metric = measure_on_package(evaluator, record.outcome.package,
                                                                   record.outcome.notes)
            record.status = "ok"
        except KeyboardInterrupt:
            record.status, record.error = "failed", "interrupted"
            result.write()
            raise
        except Exception as exc:  # any failure: report it, keep earlier outputs, stop
            record.status = "failed"
            record.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            logger.error("stage %s failed: %s", stage.name, record.error)
            logger.debug("%s", traceback.format_exc())
        record.seconds = time.perf_counter() - start
        result.write()
        if record.status == "failed":
            break
    return result
