"""The simulation registry: one handler per spec type, torchao style.

``simulate(spec, weight)`` casts the weight to the package's precision (fp16 values unless the
package was converted in fp32) and dispatches on the spec's type. Adding a spec kind means registering one handler with :func:`register_handler`.
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
from .numerics import PRECISIONS, to_working_values, working_precision

logger = logging.getLogger(__name__)

KMEANS_MODES = ("exact", "fast")
Handler = Callable[[Spec, torch.Tensor, str, str], "SimResult"]
_HANDLERS: dict[type, Handler] = {}


@dataclass
class SimResult:
    """A simulated weight: decompressed values (float32 holding fp16, or fp32, values) and its parameters.

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
             kmeans: str = "exact", precision: str = "fp16") -> SimResult:
    """Decompressed weight and compressed parameters coremltools 9 emits for ``spec`` on ``weight``.

    ``precision`` is the stored precision of the const ("fp32" for a package converted with
    ``compute_precision=FLOAT32``): coremltools' passes compute in it and emit LUTs/scales in it.

    Raises :class:`~.finite.NonFiniteWeightError` when the weight or its compression holds NaN/inf
    (``spec`` none passes any weight through)."""
    spec = parse_spec(spec)
    if kmeans not in KMEANS_MODES:
        raise SpecError(f"kmeans={kmeans!r}", "is not a k-means mode", f"use one of {KMEANS_MODES}")
    if precision not in PRECISIONS:
        raise SpecError(f"precision={precision!r}", "is not a weight precision", f"use one of {sorted(PRECISIONS)}")
    if precision == "fp32" and kmeans == "fast":
        raise SpecError("kmeans=fast", "clusters fp16 values; it cannot simulate an fp32 weight",
                        "use kmeans=exact for fp32 packages")
    if not isinstance(weight, torch.Tensor):
        weight = torch.as_tensor(np.asarray(weight))
    with working_precision(precision):
        stored = to_working_values(weight)
        if spec.is_none:
            return handler_for(spec)(spec, stored, op_type, kmeans)
        if problem := reader_problem(spec, tuple(stored.shape), op_type):
            return skipped(stored, problem, spec)
        check_finite(weight.detach(), spec, "holds")
        if precision == "fp16":
            check_finite(stored, spec, "fp16")
        result = handler_for(spec)(spec, stored, op_type, kmeans)
        check_finite(result.weight, spec, "produced")
        return result


def simulate_weight(spec: Spec | str, weight: np.ndarray | torch.Tensor, op_type: str = "linear",
                    kmeans: str = "exact", precision: str = "fp16") -> np.ndarray | torch.Tensor:
    """Just the decompressed weight, of the same kind as given (numpy in, numpy out)."""
    if isinstance(weight, torch.Tensor):
        return simulate(spec, weight, op_type, kmeans=kmeans, precision=precision).weight
    result = simulate(spec, torch.from_numpy(np.ascontiguousarray(weight)), op_type, kmeans=kmeans,
                      precision=precision)
    return result.weight.cpu().numpy()
