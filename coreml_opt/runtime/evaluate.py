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

from ..errors import DataError, ModelError
from ..metrics import get_metric
from . import load_runtime

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


def _package_fn(path: str, precision: str, device: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], tuple]:
    runtime = load_runtime(path, device=device, precision=precision)
    if len(runtime.graph.inputs) != 1:
        names = [p.name for p in runtime.graph.inputs]
        raise ModelError(str(path), f"has {len(names)} inputs {names}; eval feeds one",
                         "evaluate it from Python with coreml_opt.runtime.load_runtime")
    port = runtime.graph.inputs[0]
    output = runtime.graph.outputs[0]
    return (lambda x: runtime({port.name: x})[output].cpu()), port.shape


def _reference_fn(reference: str, precision: str, device: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if reference.endswith(".mlpackage") or os.path.isdir(reference):
        return _package_fn(reference, "fp32", device)[0]
    from ..sensitivity.evaluate import resolve_model
    from ..sensitivity.suffix import first_tensor

    model = resolve_model(reference)[0].eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return first_tensor(model(x)).float()
    return run


def _outputs(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)])


def evaluate_package(package: str | os.PathLike, data: Any, metric: str = "top1", reference: Optional[str] = None,
                     precision: str = "fp32", device: str = "cpu", batch_size: int = DEFAULT_BATCH) -> EvalResult:
    """Run ``package`` on ``data`` (folder, .npz, ``module:fn``) and score it; one-line errors for bad input."""
    from ..sensitivity.evaluate import resolve_data

    scorer = get_metric(metric)
    run, shape = _package_fn(str(package), precision, device)
    dataset = resolve_data(data)
    if dataset is None:
        raise DataError("--data", "is required", "pass a calibration folder, an .npz or package.module:fn")
    if tuple(dataset.x.shape[1:]) != tuple(shape[1:]):
        raise DataError(str(data), f"holds inputs of shape {list(dataset.x.shape[1:])} per sample, the package "
                        f"{Path(package).name} takes {list(shape[1:])}", "pass data shaped for this model")
    if not scorer.needs_labels and reference is None:
        raise DataError(f"metric {scorer.name!r}", "compares against a reference model",
                        "pass --reference PKG_OR_FACTORY, or use --metric accuracy with labelled data")
    outputs = _outputs(run, dataset.x, batch_size)
    ref_outputs = None
    if reference is not None:
        ref_outputs = _outputs(_reference_fn(reference, precision, device), dataset.x, batch_size)
    value = scorer.score(outputs, ref_outputs, dataset.y)
    result = EvalResult(str(package), scorer.name, value, precision, len(dataset))
    if ref_outputs is not None:
        result.reference = scorer.score(ref_outputs, ref_outputs, dataset.y)
        result.drop = scorer.drop(result.reference, value)
    return result
