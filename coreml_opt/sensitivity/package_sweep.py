"""``analyse_package``: a sensitivity sweep of a model given only as an ``.mlpackage``, run by the package runtime.

The package is built once (fp32, as factory sweeps evaluate) with every swept weight const kept replaceable;
a trial puts one weight's simulated compressed value (``coreml_opt.simulate``: same specs, skip reasons and
k-means modes as factory sweeps) in place of the stored fp16 value and runs the package. The reference for
proxy metrics is the uncompressed package's outputs (or ``reference``, a factory or another package); the
baseline is the uncompressed package. Layers are the package's uncompressed inventory weights, named by
torch name where the package records the mapping, else by const name. Same store, outputs and sweep.json.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ..errors import DataError, ModelError, SpecError
from ..evaluation import DEFAULT_BATCH_SIZE, Evaluator, PackageBackend, backend_for, resolve_data, run_batches
from ..evaluation.data import package_input
from ..metrics import MetricError, get_metric
from ..simulate import NonFiniteWeightError, SimCache
from ..spec import CompensatedSpec, Spec
from ..storage import predicted_bytes
from ..targets import target_name, target_rank
from .chunks import ChunkSimulator
from .layers import DEFAULT_WEIGHT_THRESHOLD, Layer
from .sweep import (BY_KIND, SweepResult, _data_reference, _progress, check_executor, collect_trials, finish_sweep,
                    open_store, plan_trials, resolve_candidates, run_trials)

logger = logging.getLogger(__name__)


def package_hash(package: Union[str, os.PathLike]) -> str:
    """sha256 of every file of the package (relative path and bytes): the store's model key."""
    root = Path(package)
    digest = hashlib.sha256(b"mlpackage;")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.name == "Manifest.json":  # coremltools writes random identifiers there
            continue
        digest.update(f"{path.relative_to(root)};".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def package_layers(package: Union[str, os.PathLike], weight_threshold: int = DEFAULT_WEIGHT_THRESHOLD,
                   include_all: bool = False) -> tuple[list[Layer], dict[str, str], int]:
    """(layers, layer name -> const output variable, package iOS version) of the uncompressed weights."""
    from ..model.package import load_package

    inventory = load_package(package, load_weights=False).inventory
    ios18 = inventory.deployment_target >= 18
    layers, variables = [], {}
    for weight in inventory.weights:
        if weight.is_compressed:
            logger.info("%s: %s is stored %s, not swept", package, weight.name, weight.compression)
            continue
        if not include_all and weight.params <= weight_threshold:
            continue
        name = weight.torch_name or weight.name
        layers.append(Layer(name, weight.name, weight.reader_type, tuple(weight.shape), weight.params,
                            predicted_bytes("none", tuple(weight.shape), weight.reader_type, ios18_ops=ios18,
                                            precision=weight.dtype), precision=weight.dtype))
        variables[name] = weight.var
    return layers, variables, inventory.deployment_target


def analyse_package(package: Union[str, os.PathLike], data: Any = None, metric: str = "top1",
                    candidates: Union[str, Sequence[Union[str, Spec]], None] = None, target: Optional[str] = None,
                    out_dir: Union[str, Path, None] = None, max_trials: Optional[int] = None,
                    time_budget: Optional[float] = None, progress: bool = True, *,
                    weight_threshold: int = DEFAULT_WEIGHT_THRESHOLD, include_all: bool = False,
                    batch_size: int = DEFAULT_BATCH_SIZE, kmeans: str = "exact", reference: Any = None,
                    device: str = "cpu", use_prefix: bool = True, executor: str = "local",
                    address: Optional[str] = None) -> SweepResult:
    """Rank the package's weights by the metric drop each candidate causes alone; ``target`` defaults to the
    package's own. ``use_prefix``: a trial reruns only the ops from the first reader of its weight (the values
    before it are computed once per layer), which changes no result. ``executor="ray"``: the trials run on the Ray
    cluster at ``address``, each worker loading the package by its path. One-line errors for bad input."""
    start = time.perf_counter()
    timing = {"setup": 0.0, "baseline": 0.0, "activation_cache": 0.0, "compression": 0.0, "evaluation": 0.0,
              "store": 0.0, "outputs": 0.0}
    label = str(package)
    if callable(metric) or ":" in str(metric):
        raise MetricError(f"metric {metric!r}", "is a function of a torch model, and this model is a package",
                          "use a built-in metric (accuracy, kl, top1, psnr, sqnr, cosine)")
    get_metric(str(metric))  # a bad name fails before the package is read
    check_executor(executor)
    layers, variables, ios = package_layers(package, weight_threshold, include_all)
    target = target_name(target or f"iOS{ios}")
    if target_rank(target) > ios:
        raise ModelError(label, f"targets iOS{ios}, the sweep asks for {target}",
                         f"pass --target iOS{ios} or lower, or reconvert the model for {target}")
    specs, skipped_candidates = resolve_candidates(candidates, target, calibrated=False)
    compensated = [str(s) for s in specs if isinstance(s, CompensatedSpec)]
    if compensated:  # a package trial swaps const values in the runtime; a corrected bias is another op's input
        raise SpecError(f"candidate {compensated[0]}", "a package-only sweep cannot measure compensated specs "
                        "(+aw, +bc)", "sweep the torch model (a package.module:fn factory), or drop +aw/+bc")
    if not layers:
        raise ModelError(label, f"has no uncompressed weight above {weight_threshold} elements",
                         "pass --all-layers or a lower --weight-threshold, or sweep the uncompressed package")
    if executor == "ray":
        from .ray_executor import check_recipe

        check_recipe(str(package), data, metric, reference)  # each worker loads them again from these names
    backend, evaluator, stored = prepare_package(package, variables, data, metric, batch_size, device)
    shape = tuple(backend.input_shape)
    timing["setup"] = time.perf_counter() - start

    out_path, store = open_store(out_dir, package_hash(package), evaluator, kmeans)
    cache = SimCache()
    plan, pending, book = plan_trials(layers, specs, stored, cache, kmeans, store, timing,
                                      by_kind=False if candidates == BY_KIND else None)  # no calibration here
    reused = len(plan) - len(pending)
    runnable = pending[:max_trials] if max_trials is not None else pending
    bar = _progress(len(runnable), progress)
    deadline = start + time_budget if time_budget is not None else None
    simulator = ChunkSimulator(runnable if executor == "local" else [], stored, cache, kmeans, deadline=deadline)
    try:
        simulator.start(0)  # the first chunk's k-means runs while the baselines are measured
        t0 = time.perf_counter()
        fp32_metric, baseline = package_baselines(backend, evaluator, reference)
        timing["baseline"] = time.perf_counter() - t0
        if executor == "ray":  # the workers simulate and evaluate; this process only stores their rows
            from .ray_executor import run_on_ray

            recipe = dict(package=os.path.abspath(package), data=data, metric=metric, batch_size=batch_size,
                          kmeans=kmeans, reference=reference, weight_threshold=weight_threshold,
                          include_all=include_all, device=device, use_prefix=use_prefix)
            run_on_ray(address, "package", recipe, runnable, store, book, bar, deadline, label)
        else:
            trial = package_trial(backend, evaluator, stored, variables, cache, kmeans, use_prefix)
            run_trials(runnable, trial, simulator, store, book, bar, deadline)
    finally:
        simulator.close()
        if simulator.pool is not None:
            timing["compression_cpu"] = simulator.cpu_seconds
        bar.close()
        store.close()

    trials, pending_count = collect_trials(plan, book, stored, baseline, evaluator, target_rank(target) >= 18)
    result = SweepResult(trials, baseline, fp32_metric, layers, skipped_candidates, book.skipped_trials,
                         evaluator.name, evaluator.higher_is_better, evaluator.unit, [str(s) for s in specs], target,
                         os.path.abspath(package), _data_reference(data), list(shape), timing, book.ran, reused,
                         pending_count, out_path, kmeans, _model_reference(reference))
    return finish_sweep(result, start)


def prepare_package(package: Union[str, os.PathLike], variables: dict[str, str], data: Any, metric: str,
                    batch_size: int, device: str) -> tuple[PackageBackend, Evaluator, dict[str, torch.Tensor]]:
    """(the package's fp32 backend with the swept consts replaceable, the evaluator on ``data``, the stored value of
    each layer's const); one line for data the package cannot take."""
    label = str(package)
    backend = PackageBackend(package, "fp32", device, variables=list(variables.values()))
    shape = tuple(backend.input_shape)
    if data is None and any(d <= 0 for d in shape):
        raise DataError(label, f"declares a flexible input shape {list(shape)}, so random inputs cannot be made",
                        "pass --data with inputs for this model")
    spec, vocab = package_input(backend.graph)  # token ids for an integer port, not floats
    dataset = resolve_data(data, spec, vocab=vocab)
    if dataset is not None and tuple(dataset.x.shape[1:]) != shape[1:]:
        raise ModelError(label, f"takes inputs of shape {list(shape[1:])} per sample, the data holds "
                         f"{list(dataset.x.shape[1:])}", "pass data shaped for this model")
    evaluator = Evaluator(metric, dataset, None, batch_size)
    stored = {name: backend.executable.values[var].clone() for name, var in variables.items()}
    return backend, evaluator, stored


def package_baselines(backend: PackageBackend, evaluator: Evaluator, reference: Any) -> tuple[float, float]:
    """(reference metric, baseline metric) of the uncompressed package; sets the evaluator's reference outputs (the
    package's own, or ``reference``'s)."""
    baseline_outputs = run_batches(backend, evaluator.batches)
    evaluator.reference = torch.cat(baseline_outputs if reference is None
                                    else run_batches(backend_for(reference), evaluator.batches))
    return evaluator.score([evaluator.reference]), evaluator.score(baseline_outputs)


def package_trial(backend: PackageBackend, evaluator: Evaluator, stored: dict[str, torch.Tensor],
                  variables: dict[str, str], cache: SimCache, kmeans: str,
                  use_prefix: bool) -> Callable[[Layer, Spec], tuple[float, float]]:
    """``trial(layer, spec) -> (metric, time the compression ended)``: the package with only that layer's const
    replaced by its simulated value, run from the layer's first reader when ``use_prefix``."""
    def trial(layer: Layer, spec: Spec) -> tuple[float, float]:
        try:
            simulated = cache.get(spec, stored[layer.layer], layer.op_type, kmeans, layer.precision).weight
        except NonFiniteWeightError as exc:
            raise exc.named(repr(layer.layer)) from None
        var = variables[layer.layer]
        backend.set_values({var: simulated})
        t1 = time.perf_counter()
        try:
            outputs = (backend.outputs_after(var, evaluator.batches) if use_prefix
                       else run_batches(backend, evaluator.batches))
            return evaluator.score(outputs), t1
        finally:
            backend.set_values({var: stored[layer.layer]})

    return trial


def _model_reference(reference: Any) -> Optional[str]:
    """What sweep.json records of ``reference``: a factory as written, a package path made absolute, else None."""
    if not isinstance(reference, (str, os.PathLike)):
        return None
    reference = str(reference)
    return reference if ":" in reference and not os.path.exists(reference) else os.path.abspath(reference)
