"""Compatibility: evaluation moved to ``coreml_opt.evaluation`` (one layer below sweeps, plans and workflows)."""
from __future__ import annotations

from ..evaluation import (DATA_FREE_SAMPLES, DEFAULT_BATCH_SIZE, Evaluator, load_factory_fn, make_evaluator,
                          resolve_data, resolve_model, run_batches)

__all__ = ["DATA_FREE_SAMPLES", "DEFAULT_BATCH_SIZE", "Evaluator", "load_factory_fn", "make_evaluator",
           "resolve_data", "resolve_model", "run_batches"]
