"""Planning from a sensitivity output folder: load it, solve budgets, measure plans, emit the package.

``PlanningSession.open(DIR)`` rebuilds the swept model (BN folded, as Core ML sees it) and its
evaluator from ``sweep.json``; plans are measured in PyTorch with every layer compressed together
by the simulation engine, which equals the weights Core ML stores.
"""
from __future__ import annotations

import functools
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from ..errors import DataError, PlanError
from ..yaml_files import data_beside, model_beside
from .costs import Problem, build_problem, drop_unit, fixed_weights
from .context import DEFAULT_CONTEXT_ROUNDS
from .pareto import Point, front, plot_front
from .planner import PlanResult, plan_budget

if TYPE_CHECKING:
    from .context import Variants
    from ..measure import PackageMeasure
    from ..simulate import Statistics

logger = logging.getLogger(__name__)


@dataclass
class PlanningSession:
    """A sweep's planning problem plus (when the sweep names a model) its model and evaluator."""

    problem: Problem
    model: Any = None  # the BN-folded torch model, or None (sizes only, no measurement)
    evaluator: Callable[[Any], float] | None = None
    kmeans: str = "exact"
    # data -> an evaluator with this sweep's metric and reference on other data (the report half)
    evaluator_for: Callable[[Any], Callable[[Any], float]] | None = None
    _cache: dict[frozenset, float] = field(default_factory=dict)
    _statistics: Any = None  # calibration statistics for +aw/+bc specs, collected on first use
    _variants: Any = None
    variant_runner: Any = None  # the PlanVariants behind variants(), when the model and metric allow one

    @classmethod
    def open(cls, sweep_dir: str | os.PathLike, *, model: Any = None, evaluator: Callable[[Any], float] | None = None,
             data: Any = None, candidates: Sequence[str] | None = None, measure: bool = True) -> "PlanningSession":
        """Load ``sweep_dir``; the model and data default to the ones the sweep recorded."""
        from ..model.convert import example_inputs, fold_batchnorm, load_factory
        from ..sensitivity import load_sweep
        from ..sensitivity.layers import fp16_copy

        sweep, trials = load_sweep(sweep_dir)
        if model is None and _swept_package(sweep, sweep_dir) is not None:
            return cls._open_package(sweep, trials, sweep_dir, evaluator, data, candidates, measure)
        source = model if model is not None else model_beside(sweep.get("model"), sweep_dir)  # never the cwd
        original = load_factory(source) if isinstance(source, str) else source
        # Folded and fp16 everywhere (biases too), exactly as the analyser measured its baseline.
        shape = sweep.get("inputs") or sweep.get("input_shape")  # inputs: a typed input (token ids)
        example = example_inputs(original, shape) if shape and original is not None else None  # as convert folds
        folded = fp16_copy(fold_batchnorm(original, example)) if original is not None else None
        swept = [p for row in sweep.get("layers", []) for p in [row["layer"], *row.get("aliases", [])]]
        fixed, fixed_params = fixed_weights(folded, swept) if folded is not None else ({}, 0)
        if folded is None:
            logger.warning("%s names no model: weights outside the sweep are not counted, plans are not measured",
                           sweep_dir)
        problem = build_problem(sweep, trials, fixed, fixed_params, candidates)
        evaluator_for = None  # data -> the sweep's metric against the fp32 model on that data
        if folded is not None:
            from ..evaluation import make_evaluator

            shape = sweep.get("inputs") or (tuple(sweep["input_shape"]) if sweep.get("input_shape") else None)
            evaluator_for = functools.partial(make_evaluator, original, metric=problem.metric, input_shape=shape)
        if measure and evaluator is None and folded is not None:
            if data is None and sweep.get("data") is None:
                logger.warning("sweep.json records no data (it was not a path or factory): measuring on what the "
                               "analyser uses without data; pass data= if the sweep used other data")
            recorded = data_beside(sweep.get("data"), sweep_dir)  # relative: beside sweep.json, never the cwd
            try:
                evaluator = evaluator_for(data if data is not None else recorded)
            except DataError as exc:
                if data is not None or recorded is None:
                    raise
                raise DataError(f"{Path(sweep_dir) / 'sweep.json'}: data {sweep['data']!r}",
                                f"{exc.input_name}: {exc.problem}",
                                "restore the data the sweep used, or rerun the sweep with --data") from None
        return cls(problem, folded, evaluator if measure else None, kmeans=sweep.get("kmeans", "exact"),
                   evaluator_for=evaluator_for)

    @classmethod
    def _open_package(cls, sweep: dict, trials: list, sweep_dir: str | os.PathLike, evaluator: Any, data: Any,
                      candidates: Sequence[str] | None, measure: bool) -> "PlanningSession":
        """A package-only sweep: the package itself is measured (package runtime) and emitted (compressed)."""
        from .package import PackageModel, package_evaluator

        path = _swept_package(sweep, sweep_dir)
        package = PackageModel(path, sweep.get("layers", []), sweep.get("kmeans", "exact"))
        fixed, fixed_params = package.fixed_weights([row["layer"] for row in sweep.get("layers", [])])
        problem = build_problem(sweep, trials, fixed, fixed_params, candidates)
        reference = sweep.get("reference")
        if isinstance(reference, str) and ":" not in reference:
            reference = str(Path(sweep_dir) / reference)

        def evaluator_for(other: Any) -> Callable[[Any], float]:
            return package_evaluator(package, other, problem.metric, reference)
        if measure and evaluator is None:
            recorded = data_beside(sweep.get("data"), sweep_dir)
            evaluator = evaluator_for(data if data is not None else recorded)
        return cls(problem, package, evaluator if measure else None, kmeans=sweep.get("kmeans", "exact"),
                   evaluator_for=evaluator_for)

    @property
    def can_measure(self) -> bool:
        return self.model is not None and self.evaluator is not None

    def measure(self, specs: Mapping[str, str]) -> float:
        """The metric with every layer of ``specs`` compressed together (fixed weights fp16)."""
        if not self.can_measure:
            raise PlanError("plan validation", "the sweep names no model or data to measure with",
                            "pass model= and data= to PlanningSession.open, or skip validation")
        specs = self.problem.expand(specs)  # a grouped sweep's plan: each group's spec on its members
        key = frozenset(specs.items())
        if key not in self._cache:
            self._cache[key] = self.measure_with(specs, self.evaluator)
        return self._cache[key]

    def measure_with(self, specs: Mapping[str, str], evaluator: Callable[[Any], float]) -> float:
        """``evaluator`` (e.g. one on the report half) on the model with every layer of ``specs`` compressed together
        (simulated); ``{}`` gives the uncompressed fp16 baseline. Not cached."""
        from ..simulate import apply_plan, using_statistics

        specs = self.problem.expand(specs)  # a grouped sweep's plan: each group's spec on its members
        if hasattr(self.model, "backend"):  # a package-only sweep
            return self.model.measure(specs, evaluator)
        assignment = {path: "none" for path in self.problem.fixed}
        assignment.update(specs)
        with using_statistics(self.statistics(specs.values())), \
                apply_plan(self.model, assignment, kmeans=self.kmeans):
            return float(evaluator(self.model))

    def variants(self) -> "Variants":
        """The metric of a plan with one layer changed, for many changes: from each layer's cut where the model and
        metric allow (:class:`.variants.PlanVariants`), else one whole measurement each; cached like ``measure``."""
        from .context import one_by_one
        from .variants import PlanVariants

        if self._variants is None:
            fast = None
            if (not hasattr(self.model, "backend") and not self.problem.groups  # a per-layer torch model
                    and PlanVariants.supports(self.evaluator)):
                rows = self.problem.sweep.get("layers", [])
                fast = PlanVariants(self.model, self.evaluator, {row["layer"]: (row["layer"], *row.get("aliases", []))
                                                                 for row in rows}, list(self.problem.fixed), self.kmeans)
            self.variant_runner = fast
            slow = one_by_one(self.measure)

            def measured(plan: Mapping[str, str], changes: Sequence[tuple[str, str]]) -> list[float]:
                keys = [frozenset({**plan, layer: spec}.items()) for layer, spec in changes]
                todo = [(c, k) for c, k in zip(changes, keys) if k not in self._cache]
                if todo:
                    if fast is None:
                        values = slow(plan, [c for c, _ in todo])
                    else:
                        from ..simulate import using_statistics

                        specs = [*plan.values(), *(spec for (_, spec), _ in todo)]
                        with using_statistics(self.statistics(specs)):  # +aw/+bc rungs
                            values = fast(plan, [c for c, _ in todo])
                    self._cache.update({k: float(v) for (_, k), v in zip(todo, values)})
                return [self._cache[k] for k in keys]

            self._variants = measured
        return self._variants

    def plan(self, *, size: str | int | None = None, bpw: float | None = None, ratio: float | None = None,
             max_drop: float | None = None, validate: bool = True, max_rounds: int = 10,
             context_rounds: int = DEFAULT_CONTEXT_ROUNDS, max_evaluations: int | None = None) -> PlanResult:
        """The optimal plan for a size budget and/or a drop budget (metric units), validated when possible.

        A size budget alone gets ``context_rounds`` of drops re-measured in the plan's context (0: off;
        ``max_evaluations`` bounds their extra evaluations), see :mod:`.context`."""
        max_bytes = None
        if any(v is not None for v in (size, bpw, ratio)):
            max_bytes = self.problem.budget_bytes(size=size, bpw=bpw, ratio=ratio)
        given = (f"{bpw:g} bits per weight" if bpw is not None else f"{ratio:g}x smaller than fp16"
                 if ratio is not None else f"{size}" if size is not None else "")
        label = " and ".join(x for x in (
            f"{given} ({max_bytes:,} bytes)" if given and str(given) != str(max_bytes) else
            f"{max_bytes:,} bytes" if given else "",
            f"{self.problem.metric} drop <= {self.problem.drop_text(max_drop)}" if max_drop is not None else "") if x)
        measure = self.measure if validate and self.can_measure else None
        if validate and max_drop is not None and measure is None:
            logger.warning("cannot measure: the plan meets the drop budget by prediction only")
        return plan_budget(self.problem, max_bytes=max_bytes, max_drop=max_drop, measure=measure,
                           max_rounds=max_rounds, label=label, context_rounds=context_rounds,
                           variants=self.variants() if measure is not None and context_rounds > 0 else None,
                           max_evaluations=max_evaluations)

    def front(self, bits: Sequence[float] = (2, 3, 4, 5, 6, 8), plot: str | os.PathLike | None = None,
              validate: bool = True, unreachable: dict[float, str] | None = None) -> list[Point]:
        """Solved, greedy and uniform plans over a bits-per-weight sweep; optionally a PNG plot.
        ``unreachable`` gets {bpw: why} for the budgets no plan meets (they have no point)."""
        points = front(self.problem, bits, self.measure if validate and self.can_measure else None, unreachable)
        if plot is not None:
            plot_front(self.problem, points, plot)
        return points

    def statistics(self, specs) -> "Statistics | None":
        """Calibration statistics of the swept model over the sweep's data when ``specs`` hold compensated ones
        (``+aw``, ``+bc``), computed once; None otherwise. A package-only sweep has none (it refuses them)."""
        from ..simulate.calibration import needs_statistics, statistics_if_needed

        if not needs_statistics(list(specs)):
            return None
        if self._statistics is None:
            if self.model is None or hasattr(self.model, "backend"):
                raise PlanError("plan", "has compensated specs (+aw, +bc) but the sweep names no torch model",
                                "plan from a sweep of a model factory, or drop +aw/+bc candidates")
            batches = getattr(self.evaluator, "batches", None)
            self._statistics = statistics_if_needed(specs, self.model, batches, "the sweep's data")
        return self._statistics

    def emit(self, result: PlanResult, output: str | os.PathLike, *, model_package: str | os.PathLike | None = None):
        """Write the swept model compressed by the plan (data-free path); returns the CompressionReport."""
        from ..compress import compress
        from ..model.convert import convert

        if model_package is None and hasattr(self.model, "backend"):  # a package-only sweep: compress it
            model_package = self.model.path
        plan_specs = [s for s in [result.plan.global_spec, *result.plan.op_types.values(), *result.plan.layers.values()]
                      if s is not None]
        statistics = self.statistics(plan_specs)  # the sweep model's: the converted package holds its weights
        if model_package is not None:
            return compress(model_package, result.plan, output, statistics=statistics)
        sweep = self.problem.sweep
        if self.model is None or not sweep.get("input_shape"):
            raise PlanError("emit", "the sweep names no model and input shape to convert",
                            "convert the model yourself and pass model_package=")
        with tempfile.TemporaryDirectory(prefix="coreml-opt-plan-") as tmp:
            package = Path(tmp) / "swept.mlpackage"
            if sweep.get("inputs"):  # a typed input (token ids): convert declares it as the sweep fed it
                convert(self.model, inputs=sweep["inputs"], target=self.problem.target, output_path=package)
            else:
                convert(self.model, tuple(sweep["input_shape"]), target=self.problem.target, output_path=package)
            return compress(package, result.plan, output, statistics=statistics)

    def measure_package(self, package: str | os.PathLike, result: PlanResult,
                        evaluator: Callable[[Any], float] | None = None) -> "PackageMeasure":
        """The emitted ``package`` run by the package runtime with this sweep's evaluator (same data, metric and
        reference outputs), next to the plan's simulated figure; a ``measure.PackageMeasure``. With ``evaluator``
        (``evaluator_for(report data)``) all three figures are measured on that evaluator's data instead."""
        from ..measure import PackageMeasure, measure_with

        if not self.can_measure:
            raise PlanError("--measure", "the sweep names no model or data to measure with",
                            "rerun the sweep with --model package.module:fn and --data")
        if evaluator is None:
            evaluator, simulated, baseline = self.evaluator, result.measured_metric, self.problem.baseline
        else:
            simulated, baseline = self.measure_with(result.specs, evaluator), self.measure_with({}, evaluator)
        measured = measure_with(evaluator, package)
        return PackageMeasure(self.problem.metric, measured, simulated, baseline,
                              evaluator.drop(baseline, measured) if hasattr(evaluator, "drop") else None)


def _swept_package(sweep: Mapping[str, Any], sweep_dir: str | os.PathLike) -> Path | None:
    """The .mlpackage a package-only sweep recorded (relative: beside sweep.json), or None for a factory sweep."""
    from ..evaluation import is_package

    recorded = sweep.get("model")
    if not isinstance(recorded, str) or ":" in recorded or not recorded.rstrip("/").endswith(".mlpackage"):
        return None
    path = Path(recorded) if os.path.isabs(recorded) else Path(sweep_dir) / recorded
    return path if is_package(path) else None


def plan_from_sweep(sweep_dir: str | os.PathLike, *, size: str | int | None = None, bpw: float | None = None,
                    ratio: float | None = None, max_drop: float | None = None, validate: bool = True,
                    output: str | os.PathLike | None = None, emit: str | os.PathLike | None = None,
                    **open_kwargs: Any) -> PlanResult:
    """One call: solve (and validate) a budget on a sweep, save the plan YAML, optionally emit the package."""
    session = PlanningSession.open(sweep_dir, measure=validate, **open_kwargs)
    result = session.plan(size=size, bpw=bpw, ratio=ratio, max_drop=max_drop, validate=validate)
    if output is not None:
        result.plan.save(output)
    if emit is not None:
        session.emit(result, emit)
    return result


def user_drop(points: float, problem: Problem) -> float:
    """A drop the user gave in points (percent points for fraction metrics such as accuracy) -> metric units."""
    return points * drop_unit(problem.metric, problem.sweep.get("unit"))
