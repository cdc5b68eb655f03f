"""Compatibility: ``evaluate_package`` (``coreml-opt eval``) lives in ``coreml_opt.evaluation.package``."""
from __future__ import annotations

from ..evaluation.package import DEFAULT_BATCH, EvalResult, evaluate_package

__all__ = ["DEFAULT_BATCH", "EvalResult", "evaluate_package"]
