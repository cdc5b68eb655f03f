"""A metric on fixed data as a callable ``model -> float``; the model is an nn.Module or any backend.

Proxy metrics (PSNR, SQNR, KL, top-1 agreement, cosine) compare against reference outputs: for a torch
model the BN-folded fp32 model, as conversion sees it. ``accuracy`` needs labels. A user metric
``package.module:fn`` is called as ``fn(model)`` and needs no data.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from ..data import Dataset
from ..errors import DataError
from ..metrics import Metric, MetricError, check_finite_value, get_metric, import_metric_fn
from ..metrics import drop as metric_drop
from .backends import resolve_model, run_batches
from .data import resolve_data
from .placement import exact_kernels, place_batches, place_module, resolve_device, wants_channels_last

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 512


class Evaluator:
    """Scores a model (an nn.Module or a backend ``x -> outputs``) on fixed data with one metric.

    Modules are moved to ``device`` and, for conv nets on 4-D inputs, to channels_last (see placement.py),
    in place, when first evaluated; the batches follow, so every module it scores runs the same kernels."""

    def __init__(self, metric: Union[str, Callable[[Any], float]], data: Optional[Dataset],
                 reference_model: Any = None, batch_size: int = DEFAULT_BATCH_SIZE, device: str = "cpu") -> None:
        self.device = resolve_device(device)
        self.channels_last: Optional[bool] = None  # decided by the first module placed, then fixed
        self.user_fn: Optional[Callable[[Any], float]] = None
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
                self.reference = torch.cat(self.outputs(reference_model)).cpu()

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

    def place(self, model: nn.Module) -> nn.Module:
        """``model`` moved in place to this evaluator's device and layout, in eval mode (the batches too)."""
        if self.channels_last is None:
            self.channels_last = wants_channels_last(model, self.batches)
            self.batches = place_batches(self.batches, self.device, self.channels_last)
        return place_module(model, self.device, self.channels_last)

    def outputs(self, model: Any) -> list[torch.Tensor]:
        """Per-batch outputs of a module (placed first) or a backend, in inference mode, on the device."""
        if isinstance(model, nn.Module):
            self.place(model)
        elif self.channels_last is None:  # a backend takes the batches as they are
            self.channels_last = False
        with exact_kernels(self.device):
            return run_batches(model, self.batches)

    def score(self, outputs: list[torch.Tensor]) -> float:
        """Metric of per-batch outputs (built-in metrics only), computed on the CPU."""
        assert self.metric is not None
        labels = None if self.data is None else self.data.y
        reference = self.reference.cpu() if self.reference is not None else None
        return float(self.metric.score(torch.cat([out.cpu() for out in outputs]), reference, labels))

    def __call__(self, model: Any) -> float:
        """The metric of ``model`` (a module, or a backend) on this evaluator's data."""
        if self.user_fn is not None:
            from ..imports import call_user

            return check_finite_value(self.name, call_user(
                self.user_fn, self.name, lambda text, problem, fix: MetricError(f"metric {text!r}", problem, fix), model))
        if not isinstance(model, nn.Module):
            return self.score(self.outputs(model))
        was_training = model.training
        try:
            return self.score(self.outputs(model))
        finally:
            model.train(was_training)


def make_evaluator(model: Union[nn.Module, str], data: Any, metric: Union[str, Callable[[nn.Module], float]] = "top1",
                   batch_size: int = DEFAULT_BATCH_SIZE,
                   input_shape: Union[tuple[int, ...], Sequence[str], None] = None, device: str = "cpu") -> Evaluator:
    """A reusable ``callable(model) -> float``; proxies compare against ``fold_batchnorm(model)`` in fp32.

    ``input_shape`` is a shape or one ``NAME:SHAPE[:DTYPE]`` input (``single_input``); ``device`` cpu or cuda."""
    from ..model.convert import example_inputs, fold_batchnorm
    from ..model.inputs import single_input

    module, _ = resolve_model(model)
    spec = single_input(input_shape) if input_shape else None
    dataset = resolve_data(data, spec, module) if not (callable(metric) or ":" in str(metric)) or data else None
    example = example_inputs(module, [spec]) if spec else (dataset.x[:1] if dataset is not None else None)
    return Evaluator(metric, dataset, fold_batchnorm(module, example), batch_size, device)
