"""The simulation registry: one handler per spec type, torchao style.

``simulate(spec, weight)`` casts the weight to fp16 values (what conversion stores) and dispatches
on the spec's type. Adding a spec kind means registering one handler with :func:`register_handler`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..errors import SpecError
from ..spec import Spec, parse_spec, reader_problem
from .finite import check_finite
from .numerics import to_fp16_values

logger = logging.getLogger(__name__)

KMEANS_MODES = ("exact", "fast")
Handler = Callable[[Spec, torch.Tensor, str, str], "SimResult"]
_HANDLERS: dict[type, Handler] = {}


@dataclass
class SimResult:
    """A simulated weight: decompressed values (float32 holding fp16 values) and its parameters.

    ``skipped`` names why coremltools would leave this weight uncompressed (then ``weight`` is
    what it really emits, usually the fp16 weight).
    """

    weight: torch.Tensor
    params: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None


def register_handler(spec_type: type) -> Callable[[Handler], Handler]:
    """Decorator: make ``fn(spec, w16, op_type, kmeans)`` the simulation of ``spec_type``."""

    def wrap(fn: Handler) -> Handler:
        _HANDLERS[spec_type] = fn
        return fn

    return wrap


def handler_for(spec: Spec) -> Handler:
    """The registered handler for ``spec``'s type."""
    try:
        return _HANDLERS[type(spec)]
    except KeyError:
        raise SpecError(str(spec), f"no simulation registered for {type(spec).__name__}",
                        "register one with coreml_opt.simulate.register_handler") from None


def skipped(w16: torch.Tensor, reason: str, spec: Spec) -> SimResult:
    """coremltools skips the weight: it keeps its fp16 values. Logged, since users rarely notice."""
    logger.warning("coremltools would not compress a weight of shape %s with %s: %s",
                   tuple(w16.shape), spec, reason)
    return SimResult(w16, {}, reason)


def simulate(spec: Spec | str, weight: torch.Tensor, op_type: str = "linear", *,
             kmeans: str = "exact") -> SimResult:
    """Decompressed weight and compressed parameters coremltools 9 emits for ``spec`` on ``weight``.

    Raises :class:`~.finite.NonFiniteWeightError` when the fp16 weight or its compression holds NaN/inf
    (``spec`` none passes any weight through)."""
    spec = parse_spec(spec)
    if kmeans not in KMEANS_MODES:
        raise SpecError(f"kmeans={kmeans!r}", "is not a k-means mode", f"use one of {KMEANS_MODES}")
    if not isinstance(weight, torch.Tensor):
        weight = torch.as_tensor(np.asarray(weight))
    w16 = to_fp16_values(weight)
    if spec.is_none:
        return handler_for(spec)(spec, w16, op_type, kmeans)
    if problem := reader_problem(spec, tuple(w16.shape), op_type):
        return skipped(w16, problem, spec)
    check_finite(weight.detach(), spec, "holds")
    check_finite(w16, spec, "fp16")
    result = handler_for(spec)(spec, w16, op_type, kmeans)
    check_finite(result.weight, spec, "produced")
    return result


def simulate_weight(spec: Spec | str, weight: np.ndarray | torch.Tensor, op_type: str = "linear",
                    kmeans: str = "exact") -> np.ndarray | torch.Tensor:
    """Just the decompressed weight, of the same kind as given (numpy in, numpy out)."""
    if isinstance(weight, torch.Tensor):
        return simulate(spec, weight, op_type, kmeans=kmeans).weight
    result = simulate(spec, torch.from_numpy(np.ascontiguousarray(weight)), op_type, kmeans=kmeans)
    return result.weight.cpu().numpy()
