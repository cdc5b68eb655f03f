"""``analyse``: compress one layer at a time with the simulation engine and measure the metric drop.

The baseline is the whole BN-folded model with fp16 weights (what Core ML stores); each trial
swaps one layer's weight for its simulated compressed value, evaluates, and restores it. Trials
are stored as they finish (see store.py), so sweeps resume, and evaluated from cached activations
where the model allows (see suffix.py), which changes no result.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import ModelError, SpecError
from ..evaluation import DEFAULT_BATCH_SIZE, Evaluator, resolve_data, resolve_model, run_batches
from ..metrics import drop as metric_drop
from ..metrics import MetricError, get_metric
from ..model.convert import example_inputs, fold_batchnorm
from ..model.inputs import InputSpec, single_input
from ..simulate.calibration import statistics_if_needed
from .ladder import default_ladder, ladder_for
from ..simulate import NonFiniteWeightError, SimCache, apply_spec
from ..spec import Spec, parse_spec
from ..storage import predicted_bytes
from ..targets import target_name, target_rank
from .chunks import ChunkSimulator
from .layers import DEFAULT_WEIGHT_THRESHOLD, Layer, find_layers, fp16_copy, identical_weights, model_hash
from .store import STORE_NAME, ResultStore
from .suffix import SuffixRunner

logger = logging.getLogger(__name__)

DEFAULT_LADDER: tuple[str, ...] = ("int8", "int4/block32", "pal6", "pal4", "pal2", "prune50")
BY_KIND = "ladder"  # candidates="ladder": each layer tries its kind's ladder (ladder.py), +bc with calibration data


@dataclass
class Trial:
    """One (layer, spec) measurement; ``drop`` > 0 means worse than the fp16 baseline."""

    layer: str
    coreml_name: str
    op_type: str
    spec: str
    params: int
    bytes: int
    fp16_bytes: int
    metric: float
    baseline_metric: float
    drop: float
    seconds: float
    from_store: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


@dataclass
class SweepResult:
    """Every trial of a sweep plus what it was measured against."""

    trials: list[Trial]
    baseline: float
    fp32_metric: float
    layers: list[Layer]
    skipped_candidates: list[dict[str, str]]
    skipped_trials: list[dict[str, str]]
    metric: str
    higher_is_better: bool
    unit: str
    candidates: list[str]
    target: str
    model: Optional[str] = None
    data: Optional[str] = None
    input_shape: list[int] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)
    ran: int = 0
    reused: int = 0
    pending: int = 0
    out_dir: Optional[Path] = None
    kmeans: str = "exact"  # palettes the trials simulated: coremltools' k-means or the fast one
    reference: Optional[str] = None  # package sweeps: what proxies compared against, when not the package itself
    inputs: list[str] = field(default_factory=list)  # ["ids:1,16:int32"] for a typed input; [] for a float shape

    @property
    def complete(self) -> bool:
        return self.pending == 0

    @property
    def fp16_drop(self) -> float:
        """How much worse the fp16 model is than fp32 (positive = worse)."""
        return metric_drop(self.fp32_metric, self.baseline, self.higher_is_better)

    def sweep_dict(self) -> dict[str, Any]:
        """The ``sweep.json`` document the planner reads."""
        data, model = self._portable(self.data), self._portable(self.model)  # portable: beside sweep.json
        extra = {"reference": self._portable(self.reference)} if self.reference is not None else {}
        return {**extra, "model": model, "input_shape": self.input_shape, "data": data, "metric": self.metric,
                "target": self.target, "candidates": self.candidates, "baseline": self.baseline,
                "fp32_metric": self.fp32_metric, "fp16_drop": self.fp16_drop,
                "layers": [layer.to_dict() for layer in self.layers], "higher_is_better": self.higher_is_better,
                "unit": self.unit, "skipped_candidates": self.skipped_candidates,
                "skipped_trials": self.skipped_trials, "complete": self.complete, "pending": self.pending,
                "ran": self.ran, "reused": self.reused, "timing": self.timing, "kmeans": self.kmeans,
                **({"inputs": self.inputs} if self.inputs else {})}

    def _portable(self, path: Optional[str]) -> Optional[str]:
        """An absolute path made relative to the output folder (beside sweep.json), anything else as is."""
        if path is not None and os.path.isabs(path) and self.out_dir is not None:
            return os.path.relpath(path, self.out_dir.absolute())
        return path

    def to_dict(self) -> dict[str, Any]:
        return {**self.sweep_dict(), "trials": [t.to_dict() for t in self.trials]}


def _skip_reason(layer: Layer, spec: Spec, weight: torch.Tensor, cache: SimCache, kmeans: str) -> str | None:
    """Why ``compress`` could not emit ``spec`` on ``layer`` (shape, readers, or values), or None.

    Value-dependent skips (threshold pruning short of its minimum, unique mode over 256 values) are
    found by simulating the first step, as ``compress`` does: cheap (no k-means), and kept in ``cache``."""
    from ..plan import is_data_dependent

    problem = spec.shape_problem(layer.shape, layer.op_type)
    if problem is None and is_data_dependent(spec):
        problem = cache.get(spec.parts[0], weight, layer.op_type, kmeans, layer.precision).skipped
    return problem


def resolve_candidates(candidates: Union[str, Sequence[Union[str, Spec]], None],
                       target: str, calibrated: bool = True) -> tuple[list[Spec], list[dict[str, str]]]:
    """Parsed candidates; the default ladder (or ``"ladder"``, every kind's ladder) drops (and reports) specs the
    target cannot run; without calibration data (``calibrated`` False) compensated rungs (+bc) are their bases."""
    rank = target_rank(target)
    if candidates is None or candidates == BY_KIND:
        specs = [parse_spec(s) for s in (default_ladder(calibrated) if candidates == BY_KIND else DEFAULT_LADDER)]
        kept = [s for s in specs if s.min_target <= rank]
        skipped = [{"spec": str(s), "reason": f"needs iOS{s.min_target}, target is {target}"}
                   for s in specs if s.min_target > rank]
        return kept, skipped
    items = [c for c in candidates.split(",")] if isinstance(candidates, str) else list(candidates)
    out: list[Spec] = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        spec = parse_spec(item)
        if spec.is_none:
            raise SpecError(f"candidate {item!r}", "leaves the layer uncompressed, which is the baseline",
                            "list only compression specs, e.g. int8,pal4")
        if spec.min_target > rank:
            raise SpecError(f"candidate {spec}", f"needs iOS{spec.min_target} but the target is {target}",
                            f"drop it or raise the target (--target iOS{spec.min_target}, or "
                            f"`target: iOS{spec.min_target}` in a sweep file)")
        if str(spec) not in map(str, out):
            out.append(spec)
    if not out:
        raise SpecError("candidates", "is empty", "list specs, e.g. int8,pal4,pal2")
    return out, []


def _check_runs(model: nn.Module, spec: InputSpec, label: str, evaluator: Evaluator) -> None:
    example = spec.example(model, torch.Generator().manual_seed(0))
    what = f"an example input {spec}" if spec.dtype else f"an example input of shape {list(spec.shape)}"
    for what, x in ((what, example),
                    ("the evaluation data", evaluator.batches[0][:1] if evaluator.batches else None)):
        if x is None:
            continue
        try:
            with torch.no_grad():
                run_batches(model, [x])
        except Exception as exc:
            line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise ModelError(label, f"fails on {what} ({type(exc).__name__}: {line})",
                             "pass the input shape and data the model expects") from None


def analyse(model: Union[nn.Module, str], example_input_shape: Union[Sequence[int], Sequence[str]], data: Any = None,
            metric: Union[str, Callable[[nn.Module], float]] = "top1",
            candidates: Union[str, Sequence[Union[str, Spec]], None] = None, target: str = "iOS18",
            out_dir: Union[str, Path, None] = None, max_trials: Optional[int] = None,
            time_budget: Optional[float] = None, progress: bool = True, *,
            weight_threshold: int = DEFAULT_WEIGHT_THRESHOLD, include_all: bool = False,
            batch_size: int = DEFAULT_BATCH_SIZE, use_suffix: bool = True, kmeans: str = "exact",
            compensate: bool = True) -> SweepResult:
    """Rank layers by the metric drop each candidate spec causes when only that layer is compressed.

    ``example_input_shape`` is the model's one input: a shape, or ``["ids:1,16:int32"]`` for token ids.
    With ``candidates="ladder"`` each layer tries its kind's ladder (``ladder.py``); its compensated rungs
    (+bc) need ``data``, and are their plain bases without it or with ``compensate=False``."""
    start = time.perf_counter()
    timing = {"setup": 0.0, "baseline": 0.0, "activation_cache": 0.0, "compression": 0.0, "evaluation": 0.0,
              "store": 0.0, "outputs": 0.0}
    if not example_input_shape:
        raise ModelError("input shape []", "must be positive integers", "use e.g. 1,1,8,8")
    input_spec = single_input(example_input_shape)
    shape = input_spec.shape
    target = target_name(target)
    calibrated = compensate and data is not None and not (callable(metric) or ":" in str(metric))
    specs, skipped_candidates = resolve_candidates(candidates, target, calibrated)
    module, factory = resolve_model(model)
    label = factory or type(module).__name__
    if callable(metric) or ":" in str(metric):
        evaluator = Evaluator(metric, None)
    else:
        get_metric(str(metric))  # a bad name fails before any data is read
        evaluator = Evaluator(metric, resolve_data(data, input_spec, module), None, batch_size)
    folded = fold_batchnorm(module, example_inputs(module, [input_spec]))  # folds exactly as `convert` does
    _check_runs(folded, input_spec, label, evaluator)
    base = fp16_copy(folded)
    layers = find_layers(base, weight_threshold, include_all, ios18_ops=target_rank(target) >= 18)
    if not layers:
        raise ModelError(label, f"has no conv/linear/embedding weight above {weight_threshold} elements",
                         "pass --all-layers or a lower --weight-threshold")
    twins = identical_weights(base, layers)
    if twins:
        raise ModelError(label, f"layers {twins[0]!r} and {twins[1]!r} hold identical weights, which Core ML stores "
                         "as one (coremltools deduplicates equal consts), so they cannot take separate specs",
                         "initialise each layer separately (nn.TransformerEncoder deep-copies one layer) or train "
                         "the model before sweeping it")
    timing["setup"] = time.perf_counter() - start

    out_path, store = open_store(out_dir, model_hash(base), evaluator, kmeans)
    ios18 = target_rank(target) >= 18
    weights = {layer.layer: base.get_parameter(layer.layer).detach().clone() for layer in layers}
    cache = SimCache(statistics=statistics_if_needed(specs, base, evaluator.batches, label))  # for +aw/+bc
    plan, pending, book = plan_trials(layers, specs, weights, cache, kmeans, store, timing,
                                      by_kind=calibrated if candidates == BY_KIND else None)
    reused = len(plan) - len(pending)
    runnable = pending[:max_trials] if max_trials is not None else pending
    bar = _progress(len(runnable), progress)
    deadline = start + time_budget if time_budget is not None else None
    simulator = ChunkSimulator(runnable, weights, cache, kmeans, deadline=deadline)
    try:
        simulator.start(0)  # the first chunk's k-means runs while the baselines are measured
        t0 = time.perf_counter()
        if evaluator.user_fn is None:
            evaluator.reference = torch.cat(run_batches(folded, evaluator.batches))
            fp32_metric = evaluator.score([evaluator.reference])
            baseline_outputs = run_batches(base, evaluator.batches)
            baseline = evaluator.score(baseline_outputs)
        else:
            fp32_metric, baseline, baseline_outputs = evaluator(folded), evaluator(base), []
        timing["baseline"] = time.perf_counter() - t0
        del folded
        logger.info("%s: fp32 %s = %.6g, fp16 baseline = %.6g, %d layers x %d candidates",
                    label, evaluator.name, fp32_metric, baseline, len(layers), len(specs))

        t0 = time.perf_counter()
        runner = None
        if use_suffix and evaluator.user_fn is None:
            runner = SuffixRunner(base, {layer.layer: (layer.layer, *layer.aliases) for layer in layers})
            runner.prepare(evaluator.batches, baseline_outputs)
            logger.info("cached activations: %d of %d layers evaluate only their suffix",
                        len(runner.available), len(layers))
        timing["activation_cache"] = time.perf_counter() - t0

        def trial(layer: Layer, spec: Spec) -> tuple[float, float]:
            with apply_spec(base, layer.layer, spec, op_type=layer.op_type, kmeans=kmeans, cache=cache):
                t1 = time.perf_counter()
                if evaluator.user_fn is not None:
                    return evaluator(base), t1
                outputs = runner.outputs(layer.layer) if runner is not None else None
                return evaluator.score(outputs if outputs is not None else run_batches(base, evaluator.batches)), t1

        run_trials(runnable, trial, simulator, store, book, bar, deadline)
    finally:
        simulator.close()
        if simulator.pool is not None:
            timing["compression_cpu"] = simulator.cpu_seconds
        bar.close()
        store.close()

    trials, pending_count = collect_trials(plan, book, weights, baseline, evaluator, ios18)
    result = SweepResult(trials, baseline, fp32_metric, layers, skipped_candidates, book.skipped_trials,
                         evaluator.name, evaluator.higher_is_better, evaluator.unit, [str(s) for s in specs], target,
                         factory, _data_reference(data), list(shape), timing, book.ran, reused, pending_count,
                         out_path, kmeans, inputs=[str(input_spec)] if input_spec.dtype else [])
    return finish_sweep(result, start)


def open_store(out_dir: Union[str, Path, None], model_key: str, evaluator: Evaluator,
               kmeans: str) -> tuple[Optional[Path], ResultStore]:
    """(output folder, the resumable store keyed by model, data, metric and k-means mode); in memory without a
    folder. One line for an unwritable folder."""
    out_path = Path(out_dir) if out_dir is not None else None
    if out_path is not None:
        from ..model.package import make_output_folder

        make_output_folder(out_path)
    return out_path, ResultStore(out_path / STORE_NAME if out_path else None, model_key, evaluator.data_hash,
                                 evaluator.name, kmeans)


def plan_trials(layers: Sequence[Layer], specs: Sequence[Spec], weights: dict[str, torch.Tensor], cache: SimCache,
                kmeans: str, store: ResultStore, timing: dict[str, float],
                by_kind: Optional[bool] = None) -> tuple[list[tuple[Layer, Spec]], list[tuple[Layer, Spec]], "TrialBook"]:
    """(every (layer, spec) compress could emit, those not yet in the store, the book holding the skips and
    the stored values); ``by_kind`` (not None): each layer only tries its kind's default ladder (``ladder.py``),
    with its compensated rungs when True (calibration data), their plain bases when False."""
    done = store.finished()
    plan: list[tuple[Layer, Spec]] = []
    skipped_trials: list[dict[str, str]] = []
    for layer in layers:
        for spec in specs:
            if by_kind is not None and str(spec) not in ladder_for(layer.op_type, layer.shape, by_kind):
                continue
            problem = _skip_reason(layer, spec, weights[layer.layer], cache, kmeans)
            if problem:
                skipped_trials.append({"layer": layer.layer, "spec": str(spec), "reason": problem})
            else:
                plan.append((layer, spec))
    pending = [(layer, spec) for layer, spec in plan if (layer.layer, str(spec)) not in done]
    return plan, pending, TrialBook(done, skipped_trials, timing)


@dataclass
class TrialBook:
    """What a sweep's trial loop records: finished values by (layer, spec), skips, timing and counts."""

    done: dict[tuple[str, str], tuple[float, float]]
    skipped_trials: list[dict[str, str]]
    timing: dict[str, float]
    ran: int = 0
    new_keys: set[tuple[str, str]] = field(default_factory=set)
    unemittable: set[tuple[str, str]] = field(default_factory=set)  # trials whose simulated weight holds NaN/inf


def run_trials(runnable: list[tuple[Layer, Spec]], trial: Callable[[Layer, Spec], tuple[float, float]],
               simulator: ChunkSimulator, store: ResultStore, book: TrialBook, bar: Any,
               deadline: Optional[float]) -> None:
    """Run each (layer, spec) by ``trial`` (-> metric, time the compression ended), storing each as it finishes;
    stops at ``deadline`` (perf_counter seconds). A NaN/inf metric names its trial; a spec whose simulated
    weight overflows is a skipped trial (compress refuses it), a layer holding NaN/inf is an error."""
    timing = book.timing
    for i, (layer, spec) in enumerate(runnable):
        if deadline is not None and time.perf_counter() >= deadline:
            logger.info("time budget reached after %d trials", book.ran)
            break
        t0 = time.perf_counter()
        try:
            simulator.wait(i)
            try:
                value, t1 = trial(layer, spec)
            except MetricError as exc:  # NaN/inf: name the trial that made it
                raise MetricError(f"{exc.input_name} with layer {layer.layer!r} compressed by {spec}",
                                  exc.problem, exc.fix) from None
        except NonFiniteWeightError as exc:
            if exc.stage != "produced":  # the layer itself holds NaN/inf: no trial of it means anything
                raise
            # compress refuses this spec on this layer (its scales overflow fp16): a skipped trial, like
            # the shape problems, so no plan can pick it
            book.skipped_trials.append({"layer": layer.layer, "spec": str(spec), "reason": exc.problem})
            book.unemittable.add((layer.layer, str(spec)))
            bar.update(1)
            continue
        t2 = time.perf_counter()
        store.add(layer.layer, str(spec), value, t2 - t0)
        timing["compression"] += t1 - t0
        timing["evaluation"] += t2 - t1
        timing["store"] += time.perf_counter() - t2
        book.done[(layer.layer, str(spec))] = (value, t2 - t0)
        book.new_keys.add((layer.layer, str(spec)))
        book.ran += 1
        bar.update(1)


def collect_trials(plan: list[tuple[Layer, Spec]], book: TrialBook, weights: dict[str, torch.Tensor],
                   baseline: float, evaluator: Evaluator, ios18: bool) -> tuple[list[Trial], int]:
    """(the finished trials of ``plan`` in plan order with their predicted bytes, how many are still pending)."""
    plan = [(layer, spec) for layer, spec in plan if (layer.layer, str(spec)) not in book.unemittable]
    trials = []
    for layer, spec in plan:
        found = book.done.get((layer.layer, str(spec)))
        if found is None:
            continue
        value, seconds = found
        stored = weights[layer.layer].to(torch.float16 if layer.precision == "fp16" else torch.float32)
        nbytes = predicted_bytes(spec, layer.shape, layer.op_type, ios18_ops=ios18, weight=stored.cpu().numpy(),
                                 precision=layer.precision)
        trials.append(Trial(layer.layer, layer.coreml_name, layer.op_type, str(spec), layer.params, nbytes,
                            layer.fp16_bytes, value, baseline, evaluator.drop(baseline, value), seconds,
                            from_store=(layer.layer, str(spec)) not in book.new_keys))
    return trials, len(plan) - len(trials)


def finish_sweep(result: SweepResult, start: float) -> SweepResult:
    """Write the output files (when the sweep has a folder) and the total time; sweep.json last, with it."""
    timing, out_path = result.timing, result.out_dir
    if out_path is not None:
        from .outputs import write_outputs

        t0 = time.perf_counter()
        write_outputs(result, out_path)
        timing["outputs"] = time.perf_counter() - t0
    timing["total"] = time.perf_counter() - start
    if out_path is not None:  # sweep.json carries the final timing
        from .outputs import write_json

        write_json(out_path / "sweep.json", result.sweep_dict())
    return result


def _data_reference(data: Any) -> Optional[str]:
    """What sweep.json records of ``data``: a factory as written, a path made absolute (``sweep_dict`` stores
    it relative to sweep.json so ``plan`` works from any directory), anything else None."""
    if not isinstance(data, str):
        return None
    return data if ":" in data and not os.path.exists(data) else os.path.abspath(data)


def _progress(total: int, enabled: bool):
    """A tqdm bar with ETA on a terminal, a no-op otherwise."""
    from tqdm import tqdm

    return tqdm(total=total, desc="sensitivity", unit="trial", disable=not enabled or not sys.stderr.isatty(),
                leave=False)
