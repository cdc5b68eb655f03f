"""Simulated compression: the exact weights coremltools 9 emits, computed in torch.

``simulate(spec, weight)`` gives the decompressed weight and compressed parameters;
``apply_spec``/``apply_plan`` put simulated weights into a model and restore it bit-identically;
``fast_lut_function(spec)`` hands the fast k-means to coremltools so the emitted model matches.
"""
from __future__ import annotations

from . import compensate, joint, palettize, prune, quantize  # noqa: F401  (register the handlers)
from .apply import apply_plan, apply_spec, infer_op_type
from .calibration import LayerStats, Statistics, active_statistics, collect_statistics, using_statistics
from .cache import SimCache, default_cache
from .finite import NonFiniteWeightError, check_finite, keeps_finite
from .core import KMEANS_MODES, SimResult, register_handler, simulate, simulate_weight
from .lut import fast_lut_function

__all__ = ["SimResult", "simulate", "simulate_weight", "apply_spec", "apply_plan", "fast_lut_function",
           "infer_op_type", "register_handler", "SimCache", "default_cache", "KMEANS_MODES",
           "NonFiniteWeightError", "check_finite", "keeps_finite", "LayerStats", "Statistics",
           "collect_statistics", "using_statistics", "active_statistics"]
