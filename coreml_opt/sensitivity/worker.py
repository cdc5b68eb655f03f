"""One worker of a distributed sweep: the model and data loaded once from what the user named, and the trials it is
given run exactly as a local sweep runs them (the same preparation, ``run_trial``, simulation cache and metric).

Nothing here imports Ray: ``ray_executor.py`` wraps :class:`SweepWorker` in an actor. A worker checks that what it
loaded hashes to the driver's store key (a factory that is not deterministic, or other files on the worker's
machine, would otherwise put another model's values under this model's key).
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from ..errors import CoreMLOptError, ModelError
from ..simulate import SimCache
from ..spec import Spec, parse_spec
from .chunks import ChunkSimulator
from .layers import Layer
from .sweep import TrialOutcome, run_trial

logger = logging.getLogger(__name__)

# (error kind, input, problem, fix) of a one-line error raised on a worker: CoreMLOptError subclasses do not pickle
ErrorRow = tuple[str, str, str, str]


@dataclass
class PreparedTrials:
    """A model loaded on a worker and ready for trials, with the store key (model, data, metric, k-means) it has."""

    trial: Callable[[Layer, Spec], tuple[float, float]]
    layers: dict[str, Layer]
    weights: dict[str, torch.Tensor]
    cache: SimCache
    kmeans: str
    key: tuple[str, str, str, str]


def prepare_factory(model: str, input: list, data: Any, metric: str, batch_size: int, kmeans: str,
                    use_suffix: bool, weight_threshold: int, include_all: bool, target: str,
                    device: str = "cpu", candidates: Sequence[str] = ()) -> PreparedTrials:
    """A factory sweep's model prepared as ``analyse`` prepares it: BN folded, fp16 weights, the fp32 reference and
    the activation cache."""
    from ..model.inputs import single_input
    from ..targets import target_rank
    from .layers import find_layers, model_hash
    from .sweep import activation_runner, make_trial, measure_baseline, prepare_model

    _, _, evaluator, base, _ = prepare_model(model, single_input(input), data, metric, batch_size,
                                             device=device)
    layers = find_layers(base, weight_threshold, include_all, ios18_ops=target_rank(target) >= 18)
    _, baseline_outputs = measure_baseline(base, evaluator)
    runner = activation_runner(base, layers, evaluator, baseline_outputs, use_suffix)
    del baseline_outputs
    from ..simulate.calibration import statistics_if_needed
    from ..spec import parse_spec

    # +aw/+bc candidates: the same calibration statistics as the driver's, from the same data
    cache = SimCache(statistics=statistics_if_needed([parse_spec(c) for c in candidates], base, evaluator.batches))
    weights = {layer.layer: base.get_parameter(layer.layer).detach().clone() for layer in layers}
    return PreparedTrials(make_trial(base, evaluator, runner, cache, kmeans), {x.layer: x for x in layers}, weights,
                          cache, kmeans, (model_hash(base), evaluator.data_hash, evaluator.name, kmeans))


def prepare_package(package: str, data: Any, metric: str, batch_size: int, kmeans: str, reference: Any,
                    weight_threshold: int, include_all: bool, device: str, use_prefix: bool) -> PreparedTrials:
    """A package sweep's package prepared as ``analyse_package`` prepares it, read from its path."""
    from . import package_sweep as ps

    layers, variables, _ = ps.package_layers(package, weight_threshold, include_all)
    backend, evaluator, stored = ps.prepare_package(package, variables, data, metric, batch_size, device)
    ps.package_baselines(backend, evaluator, reference)
    cache = SimCache()
    return PreparedTrials(ps.package_trial(backend, evaluator, stored, variables, cache, kmeans, use_prefix),
                          {x.layer: x for x in layers}, stored, cache, kmeans,
                          (ps.package_hash(package), evaluator.data_hash, evaluator.name, kmeans))


PREPARE = {"factory": prepare_factory, "package": prepare_package}


class SweepWorker:
    """Loads a sweep's model once (``kind`` "factory" or "package", ``recipe`` the keyword arguments of its
    ``prepare_*``) and runs batches of its trials; errors come back as rows, not exceptions, so that a bad input
    is one line on the driver."""

    def __init__(self, kind: str, recipe: dict[str, Any], key: Sequence[str], cwd: Optional[str] = None,
                 threads: Optional[int] = None) -> None:
        self.prepared: Optional[PreparedTrials] = None
        self.error: Optional[ErrorRow] = None
        if cwd and os.path.isdir(cwd):  # relative paths and cwd modules resolve as on the driver
            os.chdir(cwd)
            if cwd not in sys.path:
                sys.path.insert(0, cwd)
        if threads:  # evaluate with the driver's torch thread count, as the local sweep would
            torch.set_num_threads(threads)
        try:
            prepared = PREPARE[kind](**recipe)
            if prepared.key != tuple(key):
                what = ["model weights", "data", "metric", "k-means mode"]
                differs = [w for w, a, b in zip(what, prepared.key, key) if a != b]
                raise ModelError(str(recipe.get("model") or recipe.get("package")),
                                 f"loads with other {', '.join(differs)} on a Ray worker than on the driver",
                                 "make the factory deterministic (seeded) and give every node the same files")
            self.prepared = prepared  # only a model that matches the driver's key runs trials
        except CoreMLOptError as exc:
            self.error = _error_row(exc)

    def ready(self) -> bool:
        """Answers once the model is prepared (or failed to): the driver gives batches only to actors that answered,
        so an actor still waiting for a node (one counted in the cluster's CPUs but lost) holds no trials."""
        return self.prepared is not None

    def run(self, batch: Sequence[tuple[str, str]]) -> tuple[list[TrialOutcome], Optional[ErrorRow]]:
        """Run (layer name, spec) trials in order: (their outcomes, the one-line error that stopped them or None)."""
        if self.prepared is None:
            return [], self.error
        prepared, outcomes = self.prepared, []
        trials = [(prepared.layers[name], parse_spec(spec)) for name, spec in batch]
        simulator = ChunkSimulator(trials, prepared.weights, prepared.cache, prepared.kmeans)
        try:
            simulator.start(0)
            for i, (layer, spec) in enumerate(trials):
                outcomes.append(run_trial(i, layer, spec, prepared.trial, simulator))
        except CoreMLOptError as exc:
            return outcomes, _error_row(exc)
        finally:
            simulator.close()
        return outcomes, None


def _error_row(exc: CoreMLOptError) -> ErrorRow:
    return (type(exc).__name__, exc.input_name, exc.problem, exc.fix)


def raise_error_row(row: ErrorRow) -> None:
    """Raise a worker's one-line error on the driver (as a CoreMLOptError with the same input, problem and fix)."""
    _, input_name, problem, fix = row
    raise CoreMLOptError(input_name, problem, fix)
