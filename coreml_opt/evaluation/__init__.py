"""Evaluation, one layer below sweeps, plans, workflows and reports: data + metric + a backend -> a number.

Backends map inputs to outputs: ``TorchBackend`` (an nn.Module, possibly with simulated weights) and
``PackageBackend`` (an .mlpackage run by ``coreml_opt.runtime``, weights replaceable per call), so a metric
or a data source is written once for both.
"""
from __future__ import annotations

from .backends import (PackageBackend, TorchBackend, backend_for, first_tensor, is_package, resolve_model,
                       run_batches)
from .data import DATA_FREE_SAMPLES, load_factory_fn, resolve_data
from .evaluator import DEFAULT_BATCH_SIZE, Evaluator, make_evaluator
from .package import EvalResult, evaluate_package

__all__ = ["DATA_FREE_SAMPLES", "DEFAULT_BATCH_SIZE", "EvalResult", "Evaluator", "PackageBackend", "TorchBackend",
           "backend_for", "evaluate_package", "first_tensor", "is_package", "load_factory_fn", "make_evaluator",
           "resolve_data", "resolve_model", "run_batches"]
