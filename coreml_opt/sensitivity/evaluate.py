"""Evaluation for sweeps and plans: data + metric -> a callable ``model -> float``.

Proxy metrics (PSNR, SQNR, KL, top-1 agreement, cosine) compare against the outputs of the
uncompressed model: the BN-folded fp32 model, as conversion sees it. ``accuracy`` needs labels. A
user metric ``package.module:fn`` is called as ``fn(model)`` and needs no data.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from ..data import Dataset, load_dataset
from ..errors import DataError, ModelError
from ..metrics import Metric, MetricError, check_finite_value, get_metric, import_metric_fn
from ..metrics import drop as metric_drop
from ..model.convert import example_inputs, fold_batchnorm, load_factory
from ..model.inputs import InputSpec, single_input
from .suffix import first_tensor

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 512
DATA_FREE_SAMPLES = 64


def resolve_data(data: Any, input_shape: Union[tuple[int, ...], InputSpec, None] = None,
                 model: Optional[nn.Module] = None) -> Optional[Dataset]:
    """A Dataset from a folder, an .npz, a ``package.module:fn`` returning data, a tensor or a DataLoader.

    ``None`` with an ``input_shape`` (or one InputSpec) gives seeded data-free inputs: uniform floats, or
    token ids below ``model``'s smallest embedding vocabulary for an ``int32`` input."""
    if data is None:
        if input_shape is None:
            return None
        spec = single_input(input_shape)
        gen = torch.Generator().manual_seed(0)
        return Dataset(spec.samples(model if model is not None else nn.Module(), DATA_FREE_SAMPLES, gen), None,
                       "random token ids" if spec.is_integer else "random inputs")
    if isinstance(data, str) and ":" in data and not os.path.exists(data):
        from ..imports import call_without_arguments

        value = call_without_arguments(load_factory_fn(data), data,
                                       lambda text, problem, fix: DataError(f"data {text!r}", problem, fix))
        if isinstance(value, tuple) and len(value) == 2:
            return Dataset(value[0], value[1], source=data)
        return load_dataset(value)
    return load_dataset(data)


def load_factory_fn(path: str) -> Callable[[], Any]:
    """Import ``package.module:fn`` or ``file.py:fn`` for data factories (one-line DataError naming the fix)."""
    from ..imports import import_callable

    return import_callable(path, lambda text, problem, fix: DataError(f"data {text!r}", problem, fix),
                           example="coreml_opt.sensitivity.examples:digits_heldout")


def resolve_model(model: Union[nn.Module, str]) -> tuple[nn.Module, Optional[str]]:
    """(module, factory string or None) from an nn.Module or ``package.module:factory``."""
    if isinstance(model, str):
        return load_factory(model), model
    if not isinstance(model, nn.Module):
        raise ModelError(repr(model)[:60], "is not a torch.nn.Module", "pass a module or package.module:factory")
    return model, None


def run_batches(model: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Model outputs per batch (eval mode, no grad); the first tensor when the model returns several."""
    with torch.no_grad():
        return [first_tensor(model(x)) for x in batches]


class Evaluator:
    """Scores a model on fixed data with one metric; ``evaluator(model) -> float``."""

    def __init__(self, metric: Union[str, Callable[[nn.Module], float]], data: Optional[Dataset],
                 reference_model: Optional[nn.Module] = None, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        self.user_fn: Optional[Callable[[nn.Module], float]] = None
        self.metric: Optional[Metric] = None
        if callable(metric):
            self.user_fn, self.name = metric, getattr(metric, "__qualname__", repr(metric))
        elif isinstance(metric, str) and ":" in metric:
            self.user_fn, self.name = import_metric_fn(metric), metric
        else:
            self.metric = get_metric(str(metric))
            self.name = self.metric.name
        self.data = data
        self.batch_size = batch_size
        self.batches: list[torch.Tensor] = []
        self.reference: Optional[torch.Tensor] = None
        if self.metric is not None:
            if data is None:
                raise DataError(f"metric {self.name}", "needs evaluation data", "pass --data FOLDER|FILE.npz")
            if self.metric.needs_labels and data.y is None:
                raise DataError(data.source, f"has no labels, which metric {self.name} needs",
                                "add labels.csv (or y in the .npz), or use a proxy metric such as top1")
            self.batches = [x for x, _ in data.batches(batch_size)]
            if reference_model is not None:
                self.reference = torch.cat(run_batches(reference_model.eval(), self.batches))

    @property
    def higher_is_better(self) -> bool:
        return True if self.metric is None else self.metric.higher_is_better

    @property
    def unit(self) -> str:
        return "" if self.metric is None else self.metric.unit

    @property
    def data_hash(self) -> str:
        return "none" if self.data is None else self.data.content_hash

    def drop(self, baseline: float, value: float) -> float:
        """How much worse ``value`` is than ``baseline`` (positive = worse)."""
        return metric_drop(baseline, value, self.higher_is_better)

    def score(self, outputs: list[torch.Tensor]) -> float:
        """Metric of per-batch outputs (built-in metrics only)."""
        assert self.metric is not None
        labels = None if self.data is None else self.data.y
        return float(self.metric.score(torch.cat(outputs), self.reference, labels))

    def __call__(self, model: nn.Module) -> float:
        """The metric of ``model`` on this evaluator's data."""
        if self.user_fn is not None:
            from ..imports import call_user

            return check_finite_value(self.name, call_user(
                self.user_fn, self.name, lambda text, problem, fix: MetricError(f"metric {text!r}", problem, fix), model))
        was_training = model.training
        model.eval()
        try:
            return self.score(run_batches(model, self.batches))
        finally:
            model.train(was_training)


def make_evaluator(model: Union[nn.Module, str], data: Any, metric: Union[str, Callable[[nn.Module], float]] = "top1",
                   batch_size: int = DEFAULT_BATCH_SIZE,
                   input_shape: Union[tuple[int, ...], Sequence[str], None] = None) -> Evaluator:
    """A reusable ``callable(model) -> float``; proxies compare against ``fold_batchnorm(model)`` in fp32.

    ``input_shape`` is a shape or one ``NAME:SHAPE[:DTYPE]`` input (``single_input``)."""
    module, _ = resolve_model(model)
    spec = single_input(input_shape) if input_shape else None
    dataset = resolve_data(data, spec, module) if not (callable(metric) or ":" in str(metric)) or data else None
    example = example_inputs(module, [spec]) if spec else (dataset.x[:1] if dataset is not None else None)
    return Evaluator(metric, dataset, fold_batchnorm(module, example), batch_size)
