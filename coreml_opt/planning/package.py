"""Planning from a package-only sweep: the swept .mlpackage built once by the package runtime, every swept
weight replaceable, so a plan is measured with all its layers' simulated weights in place at once."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..evaluation import Evaluator, PackageBackend, backend_for, resolve_data
from ..evaluation.data import package_input
from ..spec import parse_spec

logger = logging.getLogger(__name__)


class PackageModel:
    """A swept package: ``measure(specs, evaluator)`` runs it with those layers' simulated weights."""

    def __init__(self, path: str | os.PathLike, layers: Sequence[Mapping[str, Any]], kmeans: str = "exact") -> None:
        from ..sensitivity.package_sweep import package_layers

        self.path = Path(path)
        _, variables, _ = package_layers(path, include_all=True)
        self.variables = {row["layer"]: variables[row["layer"]] for row in layers if row["layer"] in variables}
        self.op_types = {row["layer"]: str(row.get("op_type", "linear")) for row in layers}
        self.precisions = {row["layer"]: str(row.get("precision", "fp16")) for row in layers}
        self.backend = PackageBackend(path, "fp32", variables=list(self.variables.values()))
        values = self.backend.executable.values
        self.stored = {layer: values[var].clone() for layer, var in self.variables.items()}
        self.kmeans = kmeans

    def fixed_weights(self, swept: Sequence[str]) -> tuple[dict[str, int], int]:
        """Bytes of every stored weight (rank >= 2) the sweep did not cover, by layer name, and their count."""
        from ..model.package import load_package
        from ..storage import predicted_bytes

        inventory = load_package(self.path, load_weights=False).inventory
        ios18 = inventory.deployment_target >= 18
        out: dict[str, int] = {}
        params = 0
        for weight in inventory.weights:
            name = weight.torch_name or weight.name
            if name in swept:
                continue
            out[name] = (predicted_bytes("none", tuple(weight.shape), weight.reader_type, ios18_ops=ios18,
                                         precision=weight.dtype) if not weight.is_compressed else weight.bytes)
            params += weight.params
        return out, params

    def measure(self, specs: Mapping[str, str], evaluator: Evaluator) -> float:
        """The metric with every layer of ``specs`` compressed together (simulated), the rest as stored."""
        from ..simulate import default_cache

        values: dict[str, torch.Tensor] = {}
        for layer, spec in specs.items():
            if layer in self.variables and not parse_spec(spec).is_none:
                values[self.variables[layer]] = default_cache().get(spec, self.stored[layer], self.op_types[layer],
                                                                    self.kmeans, self.precisions[layer]).weight
        self.backend.set_values(values)
        try:
            return float(evaluator(self.backend))
        finally:
            self.backend.set_values({var: self.stored[layer] for layer, var in self.variables.items()})


def package_evaluator(model: PackageModel, data: Any, metric: str, reference: Any = None) -> Evaluator:
    """An evaluator over ``data`` whose proxies compare against ``reference`` (default: the package as stored)."""
    spec, vocab = package_input(model.backend.graph)  # token ids for an integer port, not floats
    dataset = resolve_data(data, spec, vocab=vocab)
    return Evaluator(metric, dataset, backend_for(reference) if reference is not None else model.backend)
