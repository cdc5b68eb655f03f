"""Workflows that end in an ``.mlpackage``: data-free, calibration and fine-tuning, all from one plan.

``run_workflow("workflows/digits-pal2.yaml")`` (or ``coreml-opt run``) converts the model, runs each
stage from the uncompressed model with the same plan, and writes ``<out>/<stage>.mlpackage`` plus
``report.json``/``report.md``; a failing stage is reported by name and earlier outputs are kept.
"""
from __future__ import annotations

from .config import StageConfig, Workflow, WorkflowError, load_workflow, parse_workflow
from .export import export_package, package_weights_model
from .runner import StageResult, WorkflowResult, load_data, run_workflow
from .stages import StageContext, StageOutcome
from .torch_configs import build_config, planned_modules
from .training import TrainConfig, distillation_loss, train

__all__ = ["Workflow", "StageConfig", "WorkflowError", "load_workflow", "parse_workflow", "run_workflow",
           "WorkflowResult", "StageResult", "StageContext", "StageOutcome", "load_data", "export_package",
           "package_weights_model", "build_config", "planned_modules", "TrainConfig", "distillation_loss", "train"]
