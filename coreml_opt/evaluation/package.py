"""Score an .mlpackage on data with a metric, run by the package runtime (``coreml-opt eval``).

The reference for proxy metrics (kl, top1, psnr, ...) and for the drop is another package (run by the
runtime, fp32) or a PyTorch factory ``package.module:fn`` (run eagerly); ``accuracy`` needs labels.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..errors import DataError
from ..metrics import get_metric
from .backends import PackageBackend, TorchBackend, is_package, resolve_model
from .data import resolve_data

DEFAULT_BATCH = 256


@dataclass
class EvalResult:
    """``metric`` on the package; ``reference`` (the same metric on the reference) and ``drop`` when one is given."""

    package: str
    metric_name: str
    metric: float
    precision: str
    samples: int
    reference: Optional[float] = None
    drop: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _reference_backend(reference: str, device: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if is_package(reference):
        return PackageBackend(reference, "fp32", device)
    return TorchBackend(resolve_model(reference)[0])


def _outputs(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)])


def evaluate_package(package: str | os.PathLike, data: Any, metric: str = "top1", reference: Optional[str] = None,
                     precision: str = "fp32", device: str = "cpu", batch_size: int = DEFAULT_BATCH) -> EvalResult:
    """Run ``package`` on ``data`` (folder, .npz, ``module:fn``) and score it; one-line errors for bad input."""
    scorer = get_metric(metric)
    run = PackageBackend(str(package), precision, device)
    dataset = resolve_data(data)
    if dataset is None:
        raise DataError("--data", "is required", "pass a calibration folder, an .npz or package.module:fn")
    shape = run.input_shape
    if tuple(dataset.x.shape[1:]) != tuple(shape[1:]):
        raise DataError(str(data), f"holds inputs of shape {list(dataset.x.shape[1:])} per sample, the package "
                        f"{Path(package).name} takes {list(shape[1:])}", "pass data shaped for this model")
    if not scorer.needs_labels and reference is None:
        raise DataError(f"metric {scorer.name!r}", "compares against a reference model",
                        "pass --reference PKG_OR_FACTORY, or use --metric accuracy with labelled data")
    outputs = _outputs(run, dataset.x, batch_size)
    ref_outputs = None
    if reference is not None:
        ref_outputs = _outputs(_reference_backend(reference, device), dataset.x, batch_size)
    value = scorer.score(outputs, ref_outputs, dataset.y)
    result = EvalResult(str(package), scorer.name, value, precision, len(dataset))
    if ref_outputs is not None:
        result.reference = scorer.score(ref_outputs, ref_outputs, dataset.y)
        result.drop = scorer.drop(result.reference, value)
    return result
