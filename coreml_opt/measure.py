"""``--measure``: accuracy measured on an emitted ``.mlpackage`` (run by the package runtime), next to the figure
the product predicted for it (the same metric with simulated weights), on the same data, metric and reference.

``compress``, ``plan --emit`` and workflows call these; values stay in metric units (accuracy as a fraction, a drop
in the same units, positive = worse) and ``line()`` shows them as units.py does (%, pp).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .errors import DataError
from .units import format_drop, format_metric, is_fraction


@dataclass
class PackageMeasure:
    """``measured``: the metric of the emitted package (runtime, fp32 mode); ``simulated``: the same metric of the
    model with simulated compressed weights; ``reference``/``drop`` against the uncompressed reference."""

    metric_name: str
    measured: float
    simulated: Optional[float] = None
    reference: Optional[float] = None
    drop: Optional[float] = None
    precision: str = "fp32"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """One printed line: measured on the package, next to the simulated figure and the reference."""
        fraction = is_fraction(self.metric_name)  # accuracy-like in %, drops in pp (units.py)
        text = (f"{self.metric_name} measured on the package ({self.precision} runtime) "
                f"{format_metric(self.measured, fraction)}")
        if self.simulated is not None:
            text += f", simulated {format_metric(self.simulated, fraction)}"
        if self.reference is not None:
            text += f"; reference {format_metric(self.reference, fraction)}, drop {format_drop(self.drop, fraction)}"
        return text


def package_model(path: str | os.PathLike, overrides: Optional[dict] = None) -> torch.nn.Module:
    """The package at ``path`` as an nn.Module run by the runtime (fp32 mode), for any evaluator."""
    from .runtime.module import PackageModule

    return PackageModule(path, overrides=overrides)


def measure_with(evaluator: Callable[[torch.nn.Module], float], package: str | os.PathLike) -> float:
    """``evaluator`` (an ``evaluation.Evaluator`` or any model -> metric callable) on the package."""
    return float(evaluator(package_model(package)))


def _check_shape(dataset: Any, module: Any, data: Any) -> None:
    port = module.runtime.graph.inputs[0]
    if tuple(dataset.x.shape[1:]) != tuple(port.shape[1:]):
        raise DataError(str(data), f"holds inputs of shape {list(dataset.x.shape[1:])} per sample, the package "
                        f"{Path(str(module.runtime.graph.path)).name} takes {list(port.shape[1:])}",
                        "pass data shaped for this model")


def simulated_overrides(source: str | os.PathLike, specs: dict[str, str], kmeans: str = "exact") -> dict:
    """{weight variable: simulated compressed value in its stored precision} for the uncompressed package ``source``, one entry per
    weight name in ``specs`` (const name -> spec; ``none`` entries are left out)."""
    return _simulated(source, specs, kmeans)[0]


def _simulated(source: str | os.PathLike, specs: dict[str, str], kmeans: str = "exact") -> tuple[dict, dict]:
    """(:func:`simulated_overrides`, {weight key of the simulated weight: bias delta} of bias-corrected specs)."""
    from .model.package import load_package
    from .simulate import default_cache
    from .simulate.calibration import weight_key

    loaded = load_package(source, load_weights=False)
    out, deltas = {}, {}
    for weight in loaded.inventory.weights:
        spec = specs.get(weight.name, "none")
        if spec == "none":
            continue
        values = torch.from_numpy(loaded.weight_values(weight.name).astype("float32"))
        result = default_cache().get(spec, values, weight.reader_type, kmeans, precision=weight.dtype)
        out[weight.var] = result.weight.half() if weight.dtype == "fp16" else result.weight
        if "bias_delta" in result.params:
            deltas[weight_key(result.weight)] = result.params["bias_delta"]
    return out, deltas


class CompressMeasure:
    """``compress --measure``: built before compressing (bad data, metric or reference fail before anything is
    written), then :meth:`run` measures the compressed package by the runtime next to the uncompressed ``source``
    run with each compressed weight replaced by its simulation; the reference is ``source`` unless given."""

    def __init__(self, source: str | os.PathLike, data: Any, metric: str = "accuracy",
                 reference: Optional[str] = None) -> None:
        from .evaluation import Evaluator, resolve_data, resolve_model

        dataset = resolve_data(data)
        if dataset is None:
            raise DataError("--measure", "needs data", "pass --data FOLDER|FILE.npz|package.module:fn and --metric")
        self.source = source
        plain = package_model(source)
        _check_shape(dataset, plain, data)
        if reference is None:
            ref_model = plain
        elif str(reference).endswith(".mlpackage") or os.path.isdir(reference):
            ref_model = package_model(reference)
        else:
            ref_model = resolve_model(reference)[0].eval()
        self.evaluator = Evaluator(metric, dataset, ref_model)
        self.reference = float(self.evaluator(ref_model))

    def run(self, output: str | os.PathLike, specs: dict[str, str], kmeans: str = "exact") -> PackageMeasure:
        """Measure ``output`` (compressed from ``source`` by ``specs``: const name -> spec)."""
        from .simulate.calibration import CorrectedBiases

        overrides, deltas = _simulated(self.source, specs, kmeans)
        with CorrectedBiases(deltas):  # bias-corrected specs (+bc): their biases, as compress writes them
            simulated = float(self.evaluator(package_model(self.source, overrides)))
        measured = measure_with(self.evaluator, output)
        return PackageMeasure(self.evaluator.name, measured, simulated, self.reference,
                              self.evaluator.drop(self.reference, measured))
