"""Data-free compression: apply a plan to an ``.mlpackage`` with coremltools' post-training passes."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from .errors import PlanError
from .model.inventory import Inventory
from .model.package import atomic_output, check_package_output, load_package, normalize_package
from .plan import Plan
from .spec import CompensatedSpec, NoneSpec, Spec

if TYPE_CHECKING:
    from .simulate import Statistics

logger = logging.getLogger(__name__)


@dataclass
class WeightResult:
    """Before/after bytes of one weight, next to the plan's prediction."""

    name: str
    torch_name: str | None
    spec: str
    bytes_before: int
    bytes_after: int
    bytes_predicted: int
    compression: str


@dataclass
class CompressionReport:
    """What ``compress`` did, measured from the saved package."""

    output: Path
    weights: list[WeightResult]
    inventory_after: Inventory
    passes: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # weight -> why a global/op-type spec left it fp16
    # (shape it cannot fit, threshold short of its minimum sparsity, too many unique values)

    @property
    def bytes_before(self) -> int:
        return sum(w.bytes_before for w in self.weights)

    @property
    def bytes_after(self) -> int:
        return sum(w.bytes_after for w in self.weights)

    @property
    def bytes_predicted(self) -> int:
        return sum(w.bytes_predicted for w in self.weights)


def _fast_lut_function(spec: Spec) -> Callable:
    from .simulate import fast_lut_function

    return fast_lut_function(spec)


def compress(model: str | os.PathLike, plan: Plan, output: str | os.PathLike,
             statistics: "Statistics | None" = None) -> CompressionReport:
    """Compress ``model`` by ``plan`` into ``output`` atomically; verify every planned weight was compressed.

    ``statistics`` (``coreml_opt.simulate.collect_statistics`` on the model the package was converted
    from, over calibration data) are needed by compensated specs (``pal4+aw+bc``): their corrected biases
    and activation-aware LUTs are written exactly as simulated."""
    from .simulate import using_statistics

    with using_statistics(statistics):
        return _compress(model, plan, output, statistics)


def _compress(model: str | os.PathLike, plan: Plan, output: str | os.PathLike,
              statistics: "Statistics | None") -> CompressionReport:
    check_package_output(output, model)  # an .mlpackage path outside the input, before any work
    loaded = load_package(model)
    if loaded.multifunction:
        raise PlanError(str(model), f"is a multifunction package (functions {', '.join(loaded.program.functions)}); "
                        "coremltools' compression passes refuse such models",
                        "compress each source model first, then combine them with coremltools.utils.save_multifunction")
    before = loaded.inventory
    fp32 = [w.name for w in before.weights if w.dtype == "fp32"]
    if fp32 and plan.kmeans == "fast":
        raise PlanError(f"kmeans: fast (model {model})", f"clusters fp16 values, and {fp32[0]} is stored in fp32",
                        "use kmeans: exact for a package converted with compute_precision=FLOAT32")
    resolved, skipped = plan.resolve_with_skips(before)  # shape misfits of a global/op-type spec stay fp16
    _check_statistics(resolved, statistics)
    _check_finite_weights(loaded, resolved)
    skipped.update(_data_dependent_skips(loaded, resolved, plan.named_weights(before)))
    resolved.update({name: NoneSpec() for name in skipped})
    predicted = plan.predicted_bytes(before, loaded.weight_values, resolved=resolved)
    deltas, tables = _compensations(loaded, resolved, statistics, model, plan.kmeans)
    fast = plan.kmeans == "fast"
    aware = _aware_lut_function(tables) if tables or fast else None

    def lut_function(spec: Spec) -> Callable | None:
        if getattr(spec, "calibrated_lut", False):
            return aware
        return _fast_lut_function(spec) if fast else None

    passes = plan.to_coreml(before, lut_function=lut_function if aware is not None else None, resolved=resolved)
    mlmodel = loaded.mlmodel
    if deltas:
        from .model.bias import write_biases

        mlmodel = write_biases(mlmodel, deltas)  # before the passes: they leave biases (rank 1) as they are
    for compression_pass in passes:
        logger.info("running %s (joint=%s)", compression_pass.function, compression_pass.joint_compression)
        mlmodel = compression_pass.apply(mlmodel)
    with atomic_output(output) as tmp:
        mlmodel.save(str(tmp))
        normalize_package(tmp)  # same inputs -> byte-identical package
        after = load_package(tmp, load_weights=False).inventory
        _check_applied(resolved, after)
    after_by_name = after.by_name()
    rows = [
        WeightResult(w.name, w.torch_name, str(resolved[w.name]), w.bytes, after_by_name[w.name].bytes,
                     predicted[w.name], after_by_name[w.name].compression)
        for w in before.weights
    ]
    for name, reason in skipped.items():
        logger.info("%s left in fp16: %s", name, reason)
    return CompressionReport(Path(output), rows, after, [p.function for p in passes], skipped)


def _compensations(loaded, resolved: dict[str, Spec], statistics, model, kmeans: str) -> tuple[dict, list]:
    """({weight: bias delta} of +bc specs, [LUT tables of +aw specs]) from the simulation (cached) with the plan's
    k-means, so the package stores exactly what was simulated. One line when statistics are missing."""
    import torch

    from .simulate import default_cache

    deltas: dict[str, torch.Tensor] = {}
    tables: list[dict] = []
    compensated = {name: spec for name, spec in resolved.items() if isinstance(spec, CompensatedSpec)}
    for name, spec in compensated.items():
        weight = loaded.inventory.by_name()[name]
        values = torch.from_numpy(loaded.weight_values(name).astype("float32"))
        if statistics.get(values) is None:
            raise PlanError(f"layer {weight.torch_name or name} (spec {spec})",
                            "has no calibration statistics: no conv/linear of the calibration model holds "
                            "these weights", f"collect statistics on the model {model} was converted from")
        result = default_cache().get(spec, values, weight.reader_type, kmeans, precision=weight.dtype)
        if result.skipped:
            continue
        if "bias_delta" in result.params:
            deltas[name] = result.params["bias_delta"]
        if "aware_groups" in result.params:
            tables.append(result.params["aware_groups"])
    return deltas, tables


def needs_statistics(plan: Plan) -> bool:
    """Whether any spec of ``plan`` compensates from calibration statistics (``+aw``, ``+bc``)."""
    from .simulate.calibration import needs_statistics as any_compensated

    return any_compensated(plan._all_specs())


DATA_FIX = "pass --data FOLDER|FILE.npz|package.module:fn (the data the plan was made on)"


def missing_calibration_data(given: str, fix: str = DATA_FIX) -> PlanError:
    """The one-line error for a plan (named by ``given``) with compensated specs and no calibration data."""
    return PlanError(given, "has compensated specs (+aw, +gptq, +bc) that need calibration data", fix)


def calibration_statistics(model: str | os.PathLike, data, batch_size: int = 32,
                           specs: "Iterable | None" = None) -> "Statistics":
    """Input statistics of every conv/linear weight of the package ``model`` over ``data`` (a folder, .npz or
    ``package.module:fn``; labels unused), collected by running the package itself with the package runtime;
    with second moments when one of ``specs`` (a plan's) is ``+gptq``."""
    from .errors import DataError
    from .evaluation import resolve_data
    from .evaluation.data import package_input
    from .runtime import load_graph
    from .simulate.calibration import needs_second_moments, package_statistics

    spec, vocab = package_input(load_graph(model))
    dataset = resolve_data(data, spec, vocab=vocab)
    if dataset is None:
        raise DataError("--data", "is needed by compensated specs (+aw, +gptq, +bc)",
                        "pass the calibration data the plan was made on: --data FOLDER|FILE.npz|package.module:fn")
    return package_statistics(model, [x for x, _ in dataset.batches(batch_size)],
                              second_moments=needs_second_moments(specs or ()))


def _check_statistics(resolved: dict[str, Spec], statistics) -> None:
    """One line, before any work, when a compensated spec has no calibration statistics to work from."""
    compensated = {name: spec for name, spec in resolved.items() if isinstance(spec, CompensatedSpec)}
    if compensated and statistics is None:
        name, spec = next(iter(compensated.items()))
        raise PlanError(f"spec {spec} ({name})", "compensation needs calibration statistics of the model",
                        "give the data the plan was made on (compress --data, or plan --emit from a sweep)")


def _aware_lut_function(tables: list[dict]) -> Callable:
    from .simulate.compensate import aware_lut_function

    return aware_lut_function(tables)


def _check_finite_weights(loaded, resolved: dict[str, Spec]) -> None:
    """Refuse, before any work, a weight chosen for compression that holds NaN/inf as stored, or whose
    simulated compression does (an affine scale overflowing fp16); coremltools would write either.
    k-means/unique palettes and pruning keep finite values finite, so they are not simulated here."""
    import torch

    from .simulate import NonFiniteWeightError, check_finite, default_cache, keeps_finite

    for weight in loaded.inventory.weights:
        spec = resolved[weight.name]
        if spec.is_none:
            continue
        label = repr(weight.torch_name or weight.name)
        values = torch.from_numpy(loaded.weight_values(weight.name).astype("float32"))  # as stored: fp16 or fp32
        check_finite(values, spec, "holds", weight=label)
        if not keeps_finite(spec):
            try:
                default_cache().get(spec, values, weight.reader_type, precision=weight.dtype)
            except NonFiniteWeightError as exc:
                raise exc.named(label) from None


def _data_dependent_skips(loaded, resolved: dict[str, Spec], named: set[str]) -> dict[str, str]:
    """Weights coremltools would skip for their values (threshold pruning short of its minimum sparsity,
    unique mode with over 256 values): {weight: reason} for those a global or op-type spec reaches;
    a weight named under ``layers:`` is refused before any work (PlanError)."""
    import torch

    from .plan import is_data_dependent
    from .simulate import default_cache

    out: dict[str, str] = {}
    for weight in loaded.inventory.weights:
        spec = resolved[weight.name]
        if not is_data_dependent(spec):
            continue
        values = torch.from_numpy(loaded.weight_values(weight.name).astype("float32"))
        result = default_cache().get(spec.parts[0], values, weight.reader_type,  # reused by the byte model
                                     precision=weight.dtype)
        if not result.skipped:
            continue
        if weight.name in named:
            raise PlanError(f"layer {weight.torch_name or weight.name} (spec {spec})",
                            f"coremltools would skip it: {result.skipped}",
                            "choose another spec for this layer or skip it in the plan")
        out[weight.name] = f"{spec}: {result.skipped}"
    return out


def _check_applied(resolved: dict[str, Spec], after: Inventory, by: str = "coremltools") -> None:
    """coremltools (and optimize.torch, ``by``) skips weights with only a log warning; refuse to ship such a
    package. ``resolved``: const name -> spec of the weights to check."""
    after_by_name = after.by_name()
    for name, spec in resolved.items():
        weight = after_by_name.get(name)
        if weight is None:
            raise PlanError(f"weight {name!r}", "disappeared from the compressed model", "report this as a bug")
        if not spec.is_none and not weight.is_compressed:
            raise PlanError(f"weight {name!r} (spec {spec})", f"was skipped by {by}",
                            "choose another spec for this layer or skip it in the plan")
        if spec.is_none and weight.is_compressed:
            raise PlanError(f"weight {name!r}", f"was compressed ({weight.compression}) though the plan skips it",
                            "report this as a bug")
