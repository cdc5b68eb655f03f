"""Evaluation metrics: label accuracy and data-free proxies against the uncompressed model's outputs.

Every metric maps (outputs, reference outputs, labels) to one float. ``higher_is_better`` says the
direction; :func:`drop` turns any metric into "how much worse" so tables and plans need no special
cases (KL divergence, lower is better, drops by ``value - baseline``). PSNR and SQNR of identical
outputs are capped at :data:`MAX_DB` so results stay finite (JSON has no infinity). A NaN or inf in
the outputs or the reference raises :class:`MetricError`: ``min(200, nan)`` is 200, so a silent
score would read as "bit-identical" and plans would spend the whole budget on it.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .errors import DataError
from .nonfinite import nonfinite_count

MAX_DB = 200.0  # PSNR/SQNR of bit-identical outputs
_EPS = 1e-12

ScoreFn = Callable[[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]], float]


class MetricError(DataError):
    """A metric name or ``package.module:fn`` path that cannot be used."""


@dataclass(frozen=True)
class Metric:
    """A named score of model outputs; ``unit`` is "fraction" (shown as %), "dB", "nats" or ""."""

    name: str
    score: ScoreFn
    higher_is_better: bool = True
    needs_labels: bool = False
    unit: str = ""

    def drop(self, baseline: float, value: float) -> float:
        """How much worse ``value`` is than ``baseline`` (positive = worse), in the metric's units."""
        return drop(baseline, value, self.higher_is_better)


def drop(baseline: float, value: float, higher_is_better: bool = True) -> float:
    """``baseline - value`` for higher-is-better metrics, ``value - baseline`` otherwise."""
    return baseline - value if higher_is_better else value - baseline


def check_finite_value(metric: str, value: float) -> float:
    """``value`` as a float, or :class:`MetricError` when it is NaN or inf (a metric must stop, not guess)."""
    value = float(value)
    if not math.isfinite(value):
        raise MetricError(f"metric {metric}", f"gave {value}", "check the model and the data for NaN/inf values")
    return value


def _finite_only(name: str) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator: the score refuses NaN/inf in the outputs or the reference, and a non-finite result."""

    def wrap(fn: ScoreFn) -> ScoreFn:
        @functools.wraps(fn)
        def score(outputs: torch.Tensor, reference: Optional[torch.Tensor] = None,
                  labels: Optional[torch.Tensor] = None) -> float:
            named = (("the reference outputs (uncompressed model)", reference), ("the model's outputs", outputs))
            for what, t in named:
                if t is not None:
                    bad = nonfinite_count(t)
                    if bad:
                        raise MetricError(f"metric {name}", f"{what} hold {bad} NaN/inf values of {t.numel()}",
                                          "find where the model or the evaluation data makes NaN/inf and fix it")
            return check_finite_value(name, fn(outputs, reference, labels))

        return score

    return wrap


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(len(t), -1).to(torch.float64)


@_finite_only("accuracy")
def accuracy(outputs: torch.Tensor, reference: Optional[torch.Tensor], labels: Optional[torch.Tensor]) -> float:
    """Fraction of samples whose argmax output equals the label."""
    if labels is None:
        raise MetricError("metric accuracy", "needs labelled data", "add labels.csv / y, or use a proxy such as top1")
    return float((_flat(outputs).argmax(dim=1) == labels.reshape(-1)).to(torch.float64).mean())


@_finite_only("top1")
def top1_agreement(outputs: torch.Tensor, reference: torch.Tensor, labels: Optional[torch.Tensor] = None) -> float:
    """Fraction of samples whose argmax output equals the uncompressed model's argmax."""
    return float((_flat(outputs).argmax(dim=1) == _flat(reference).argmax(dim=1)).to(torch.float64).mean())


@_finite_only("psnr")
def psnr(outputs: torch.Tensor, reference: torch.Tensor, labels: Optional[torch.Tensor] = None) -> float:
    """Peak signal-to-noise ratio in dB; the peak is the reference's largest magnitude."""
    ref, out = _flat(reference), _flat(outputs)
    mse = float(((out - ref) ** 2).mean())
    peak = float(ref.abs().max())
    if mse == 0.0:
        return MAX_DB
    return min(MAX_DB, 10.0 * math.log10(max(peak * peak, _EPS) / mse))


@_finite_only("sqnr")
def sqnr(outputs: torch.Tensor, reference: torch.Tensor, labels: Optional[torch.Tensor] = None) -> float:
    """Signal-to-quantization-noise ratio in dB: reference energy over error energy."""
    ref, out = _flat(reference), _flat(outputs)
    noise = float(((out - ref) ** 2).sum())
    if noise == 0.0:
        return MAX_DB
    return min(MAX_DB, 10.0 * math.log10(max(float((ref ** 2).sum()), _EPS) / noise))


@_finite_only("kl")
def kl_divergence(outputs: torch.Tensor, reference: torch.Tensor, labels: Optional[torch.Tensor] = None) -> float:
    """Mean KL(softmax(reference) || softmax(outputs)) over samples, in nats (lower is better)."""
    ref_log = torch.log_softmax(_flat(reference), dim=1)
    out_log = torch.log_softmax(_flat(outputs), dim=1)
    return float((ref_log.exp() * (ref_log - out_log)).sum(dim=1).mean().clamp_min(0.0))


@_finite_only("cosine")
def cosine(outputs: torch.Tensor, reference: torch.Tensor, labels: Optional[torch.Tensor] = None) -> float:
    """Mean per-sample cosine similarity between outputs and reference outputs."""
    return float(torch.nn.functional.cosine_similarity(_flat(outputs), _flat(reference), dim=1, eps=_EPS).mean())


METRICS: dict[str, Metric] = {
    "accuracy": Metric("accuracy", accuracy, True, True, "fraction"),
    "top1": Metric("top1", top1_agreement, True, False, "fraction"),
    "psnr": Metric("psnr", psnr, True, False, "dB"),
    "sqnr": Metric("sqnr", sqnr, True, False, "dB"),
    "kl": Metric("kl", kl_divergence, False, False, "nats"),
    "cosine": Metric("cosine", cosine, True, False, "fraction"),
}
METRIC_HELP = "use one of " + ", ".join(METRICS) + " or package.module:fn (model -> float, higher is better)"


def get_metric(name: str) -> Metric:
    """The built-in metric called ``name`` (case-insensitive)."""
    metric = METRICS.get(str(name).strip().lower())
    if metric is None:
        raise MetricError(f"metric {name!r}", "is not a known metric", METRIC_HELP)
    return metric


def import_metric_fn(path: str) -> Callable[[torch.nn.Module], float]:
    """Import a user metric ``package.module:fn`` or ``file.py:fn`` (called as ``fn(model) -> float``, higher is
    better)."""
    from .imports import import_callable

    def error(text: str, problem: str, fix: str) -> MetricError:
        if problem.startswith("is not package.module"):
            problem, fix = "is neither a known metric nor package.module:fn", METRIC_HELP
        return MetricError(f"metric {text!r}", problem, fix)

    return import_callable(path, error)  # type: ignore[return-value]
