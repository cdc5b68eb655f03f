"""``analyse``: compress one layer at a time with the simulation engine and measure the metric drop.

The baseline is the whole BN-folded model with fp16 weights (what Core ML stores); each trial
swaps one layer's weight for its simulated compressed value, evaluates, and restores it. Trials
are stored as they finish (see store.py), so sweeps resume, and evaluated from cached activations
where the model allows (see suffix.py), which changes no result.
"""
from __future__ import annotations

import contextlib
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

from ..errors import CoreMLOptError, ModelError, SpecError
from ..evaluation import DEFAULT_BATCH_SIZE, Evaluator, resolve_data, resolve_model, run_batches
from ..evaluation.heap import reused_heap
from ..evaluation.placement import exact_kernels, resolve_device
from ..metrics import drop as metric_drop
from ..metrics import MetricError, get_metric
from ..model.convert import example_inputs, fold_batchnorm
from ..model.inputs import InputSpec, single_input
from ..model.precision import round_to_fp16_
from ..simulate import NonFiniteWeightError, SimCache, apply_spec
from ..simulate.cache import content_hash
from ..simulate.calibration import statistics_if_needed
from ..spec import Spec, parse_spec
from ..storage import predicted_bytes
from ..targets import target_name, target_rank
from .chunks import ChunkSimulator
from .groups import Group, GroupSimulator, GroupStore, GroupsArg, GroupTrials, resolve_groups
from .ladder import default_ladder, ladder_for
from .layers import DEFAULT_WEIGHT_THRESHOLD, Layer, find_layers, identical_weights, model_hash
from .memory import (SIMULATION_WEIGHTS, MemoryBudget, model_bytes, parse_memory, peak_rss_bytes, reset_peak,
                     rss_bytes, tensor_bytes)
from .store import STORE_NAME, ResultStore
from .suffix import SuffixRunner

logger = logging.getLogger(__name__)

DEFAULT_LADDER: tuple[str, ...] = ("int8", "int4/block32", "pal6", "pal4", "pal2", "prune50")
EXECUTORS = ("local", "ray")  # who runs the trials: this process, or the actors of a Ray cluster
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
    members: Optional[list[str]] = None  # a group trial: the layers it compressed together (see groups.py)

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()
                if k != "members" or v is not None}


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
    deduplicated: int = 0  # trials of this run not evaluated: simulated weight equal to the fp16 one or a run trial's
    groups: list[Any] = field(default_factory=list)  # a grouped sweep's groups.Group list; [] when per layer
    grouping: str = "layer"  # role, block, custom or layer

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
                **({"inputs": self.inputs} if self.inputs else {}),
                **({"grouping": self.grouping, "groups": [g.to_dict() for g in self.groups]} if self.groups else {})}

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
            groups: GroupsArg = None, executor: str = "local", address: Optional[str] = None,
            memory: Union[str, int, None] = None, device: str = "cpu", dedupe: bool = True,
            compensate: bool = True) -> SweepResult:
    """Rank layers by the metric drop each candidate spec causes when only that layer is compressed.

    ``example_input_shape`` is the model's one input: a shape, or ``["ids:1,16:int32"]`` for token ids.
    ``groups`` (``role``, ``block``, ``layer`` or {name: [glob patterns]}; see groups.py) compresses the layers of
    a group together in one trial; default per layer up to ``PER_LAYER_MAX`` layers, per role above.
    ``executor="ray"`` runs the trials on the Ray cluster at ``address`` (see ray_executor.py): same store and
    values; ``model``, ``data`` and ``metric`` must then be names each worker can load (a factory, a path).
    ``memory`` (``"8GB"`` or bytes) bounds the process's peak resident memory (see memory.py for the split);
    a model given as a factory is then held once. Results are identical with or without it.
    ``device`` (cpu or cuda) runs the built-in metrics' forward passes there (k-means stays on the CPU).
    ``dedupe``: a trial whose simulated weight equals the layer's fp16 weight or an evaluated trial's of the
    same layer takes that metric without a forward pass (the metric is a function of the weights: exact).
    With ``candidates="ladder"``, the default when there is ``data`` and a built-in metric, each layer tries its
    kind's ladder (``ladder.py``); its compensated rungs (+gptq, +bc) need ``data``; without data, or with
    ``compensate=False``, the default is ``DEFAULT_LADDER``."""
    start = time.perf_counter()
    timing = {"setup": 0.0, "baseline": 0.0, "activation_cache": 0.0, "compression": 0.0, "evaluation": 0.0,
              "store": 0.0, "outputs": 0.0}
    budget = MemoryBudget(parse_memory(memory, "memory"), fixed=rss_bytes(collect=True)) if memory is not None else None
    if not example_input_shape:
        raise ModelError("input shape []", "must be positive integers", "use e.g. 1,1,8,8")
    input_spec = single_input(example_input_shape)
    shape = input_spec.shape
    target = target_name(target)
    calibrated = compensate and data is not None and not (callable(metric) or ":" in str(metric))
    if candidates is None and calibrated:  # with data, each layer kind's ladder with its compensated rungs
        candidates = BY_KIND
    specs, skipped_candidates = resolve_candidates(candidates, target, calibrated)
    check_executor(executor)
    resolve_device(device)  # an absent GPU fails before the model and data load
    if executor == "ray":
        from .ray_executor import check_recipe

        check_recipe(model, data, metric)  # each worker loads them again from what the user named
    factory, label, evaluator, base, fp32_metric = prepare_model(model, input_spec, data, metric, batch_size, timing,
                                                                 device)
    if budget is not None:  # what is known before any output is written: the model and the data
        budget.model, budget.data = model_bytes(base), tensor_bytes([evaluator.batches, evaluator.reference])
        budget.check(label, f"memory {memory!r}")
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
    grouping, units = resolve_groups(layers, groups)
    grouped = GroupTrials(grouping, units) if any(len(g.members) > 1 for g in units) else None
    if grouped is not None and executor != "local":
        raise CoreMLOptError(f"groups {grouping!r}", "are not run by the Ray executor yet",
                             "sweep groups locally (--executor local) or sweep per layer (--groups layer) on Ray")
    timing["setup"] = time.perf_counter() - start - timing["baseline"]

    out_path, store = open_store(out_dir, model_hash(base), evaluator, kmeans)
    ios18 = target_rank(target) >= 18
    # The model's own weights, not copies: trials swap a weight in place and restore it, and the simulator's
    # workers read weights only while no trial runs (between chunks, or during the baseline pass).
    weights = {layer.layer: base.get_parameter(layer.layer).detach() for layer in layers}
    if budget is None:  # copies the k-means workers read whatever a trial swaps in (a budget holds the model once)
        weights = {name: weight.clone() for name, weight in weights.items()}
    largest = max(w.numel() * w.element_size() for w in weights.values())
    simulation = SIMULATION_WEIGHTS * largest
    statistics = statistics_if_needed(specs, base, evaluator.batches, label)  # for +aw/+bc
    cache = SimCache(simulation, statistics=statistics) if budget is not None else SimCache(statistics=statistics)
    if grouped is None:
        plan, pending, book = plan_trials(layers, specs, weights, cache, kmeans, store, timing,
                                          by_kind=calibrated if candidates == BY_KIND else None)
    else:
        plan, pending, book, store = plan_group_trials(grouped, specs, weights, cache, kmeans, store, timing)
    reused = len(plan) - len(pending)
    runnable = pending[:max_trials] if max_trials is not None else pending
    bar = _progress(len(runnable), progress)
    deadline = start + time_budget if time_budget is not None else None
    chunk = {"max_bytes": max(largest, simulation // 2)} if budget is not None else {}
    if executor != "local":
        simulator = ChunkSimulator([], weights, cache, kmeans, deadline=deadline)
    elif grouped is None:
        simulator = ChunkSimulator(runnable, weights, cache, kmeans, deadline=deadline, **chunk)
    else:
        flat, offsets = grouped.member_trials(runnable)
        simulator = GroupSimulator(ChunkSimulator(flat, weights, cache, kmeans, deadline=deadline, **chunk), offsets)
    runner = None
    seen: Optional[_Seen] = None
    heap = contextlib.ExitStack()
    heap.enter_context(reused_heap())  # a trial's activations reuse the last trial's memory: no page faults
    try:
        simulator.start(0)  # the first chunk's k-means runs while the baseline is measured
        t0 = time.perf_counter()
        before = rss_bytes()
        measured = reset_peak() if budget is not None else False
        baseline, baseline_outputs = measure_baseline(base, evaluator)
        if dedupe and grouped is None and executor == "local":  # the fp16 weights score the baseline
            seen = _Seen(layers, weights, baseline)
        timing["baseline"] += time.perf_counter() - t0
        if budget is not None:
            budget.model, budget.simulation = model_bytes(base), simulation
            budget.data = tensor_bytes([evaluator.batches, evaluator.reference, baseline_outputs])
            # one evaluation pass: the peak over the RSS before it, less the baseline outputs it keeps
            budget.working = (max(0, peak_rss_bytes() - before - tensor_bytes(baseline_outputs)) if measured
                              else 3 * tensor_bytes(baseline_outputs))
            budget.check(label, f"memory {memory!r}")
            logger.info("memory budget split (GiB): %s", budget.shares())
        logger.info("%s: fp32 %s = %.6g, fp16 baseline = %.6g, %d layers x %d candidates",
                    label, evaluator.name, fp32_metric, baseline, len(layers), len(specs))

        if executor == "ray":  # the workers simulate and evaluate; this process only stores their rows
            from .ray_executor import run_on_ray

            del baseline_outputs
            recipe = dict(model=model, input=[str(input_spec)] if input_spec.dtype else list(shape), data=data,
                          metric=metric, batch_size=batch_size, kmeans=kmeans, use_suffix=use_suffix,
                          weight_threshold=weight_threshold, include_all=include_all, target=target, device=device,
                          candidates=[str(spec) for spec in specs])
            run_on_ray(address, "factory", recipe, runnable, store, book, bar, deadline, label)
        else:
            t0 = time.perf_counter()
            runner = activation_runner(base, units if grouped else layers, evaluator, baseline_outputs, use_suffix,
                                       budget.cache if budget is not None else None, progress)
            del baseline_outputs
            timing["activation_cache"] = time.perf_counter() - t0
            run_trials(runnable, make_trial(base, evaluator, runner, cache, kmeans, grouped, seen), simulator, store,
                       book, bar, deadline)
    finally:
        simulator.close()
        heap.close()
        if simulator.pool is not None:
            timing["compression_cpu"] = simulator.cpu_seconds
        logger.info("simulated weights: at most %.2f MiB held at once (limit %.2f MiB), %d simulated",
                    cache.peak_bytes / 2**20, cache.max_bytes / 2**20, cache.misses)
        if runner is not None:
            runner.close()
            logger.info("trial evaluations: %d from cuts in memory, %d from cuts on disk, %d from the nearest "
                        "earlier cut, %d full forward", runner.counts["memory"], runner.counts["disk"],
                        runner.counts["nearest"], runner.counts["full"])
        bar.close()
        store.close()

    trials, pending_count = collect_trials(plan, book, weights, baseline, evaluator, ios18, grouped)
    result = SweepResult(trials, baseline, fp32_metric, layers, skipped_candidates, book.skipped_trials,
                         evaluator.name, evaluator.higher_is_better, evaluator.unit, [str(s) for s in specs], target,
                         factory, _data_reference(data), list(shape), timing, book.ran, reused, pending_count,
                         out_path, kmeans, inputs=[str(input_spec)] if input_spec.dtype else [],
                         groups=units if grouped else [], grouping=grouping,
                         deduplicated=seen.hits if seen is not None else 0)
    if result.deduplicated:
        logger.info("%d trials simulated a weight equal to the fp16 one or to an evaluated trial's: not evaluated "
                    "again", result.deduplicated)
    return finish_sweep(result, start)


def check_executor(executor: str) -> None:
    """One line for an executor other than ``local`` and ``ray``."""
    if executor not in EXECUTORS:
        raise CoreMLOptError(f"executor {executor!r}", f"is not one of {list(EXECUTORS)}", "use local or ray")


def prepare_model(model: Union[nn.Module, str], input_spec: InputSpec, data: Any,
                  metric: Union[str, Callable[[nn.Module], float]], batch_size: int,
                  timing: Optional[dict[str, float]] = None,
                  device: str = "cpu") -> tuple[Optional[str], str, Evaluator, nn.Module, float]:
    """(factory string or None, label, evaluator, the BN-folded model with fp16-rounded weights, fp32 metric) of a
    factory sweep; sets the evaluator's reference (the fp32 outputs proxy metrics compare against) before the
    weights are rounded. A model only this sweep holds (made by a factory that kept no reference to it) is folded
    and rounded in place, so the sweep holds it once. One-line errors for a model that does not run on the input
    or the data."""
    module, factory = resolve_model(model)
    label = factory or type(module).__name__
    if callable(metric) or ":" in str(metric):
        evaluator = Evaluator(metric, None, device=device)
    else:
        get_metric(str(metric))  # a bad name fails before any data is read
        evaluator = Evaluator(metric, resolve_data(data, input_spec, module), None, batch_size, device)
    owned = factory is not None and sys.getrefcount(module) <= 2  # the local name and getrefcount's argument
    folded = fold_batchnorm(module, example_inputs(module, [input_spec]), copy_model=not owned)  # as `convert`
    del module
    _check_runs(folded, input_spec, label, evaluator)
    t0 = time.perf_counter()
    if evaluator.user_fn is None:  # the model moves to the evaluator's device and layout
        evaluator.reference = torch.cat(evaluator.outputs(folded)).cpu()
        fp32_metric = evaluator.score([evaluator.reference])
    else:
        fp32_metric = evaluator(folded)
    if timing is not None:
        timing["baseline"] = time.perf_counter() - t0
    return factory, label, evaluator, round_to_fp16_(folded), fp32_metric


def measure_baseline(base: nn.Module, evaluator: Evaluator) -> tuple[float, list]:
    """(fp16 baseline metric, the baseline's output batches; [] for a user metric)."""
    if evaluator.user_fn is not None:
        return evaluator(base), []
    outputs = evaluator.outputs(base)
    return evaluator.score(outputs), outputs


def activation_runner(base: nn.Module, units: Sequence[Any], evaluator: Evaluator, baseline_outputs: list,
                      use_suffix: bool, max_cache_bytes: Optional[int] = None,
                      progress: bool = False) -> Optional[SuffixRunner]:
    """The cached activations trials evaluate their suffix from (None: full forward passes); ``units`` are the
    sweep's layers or groups (a group's suffix starts at its earliest member); cuts past ``max_cache_bytes``
    spill to disk (see suffix.py)."""
    if not use_suffix or evaluator.user_fn is not None:
        return None
    cache_bytes = {"max_cache_bytes": max_cache_bytes} if max_cache_bytes is not None else {}
    runner = SuffixRunner(base, {unit.layer: unit.paths if isinstance(unit, Group) else
                                 (unit.layer, *unit.aliases) for unit in units}, **cache_bytes)
    with _progress(len(evaluator.batches), progress, "activations", "batches") as cache_bar, \
            exact_kernels(evaluator.device, inference=False):  # the kernels the baseline ran
        runner.prepare(evaluator.batches, baseline_outputs, cache_bar.update)
    logger.info("cached activations: %d of %d layers or groups evaluate only a suffix", len(runner.available),
                len(units))
    return runner


def make_trial(base: nn.Module, evaluator: Evaluator, runner: Optional[SuffixRunner], cache: SimCache,
               kmeans: str, grouped: Optional[GroupTrials] = None,
               seen: Optional["_Seen"] = None) -> Callable[[Layer, Spec], tuple[float, float]]:
    """``trial(layer, spec) -> (metric, time the compression ended)``: ``base`` with only that layer's weight
    simulated (a group trial: every member that takes the spec, at once), evaluated from the cached
    activations where ``runner`` has them; ``seen`` (per-layer sweeps only) skips weights already evaluated."""
    def trial(layer: Layer, spec: Spec) -> tuple[float, float]:
        members = grouped.members(layer, spec) if grouped is not None else (layer,)
        with contextlib.ExitStack() as applied:
            simulated = [applied.enter_context(apply_spec(base, member.layer, spec, op_type=member.op_type,
                                                          kmeans=kmeans, cache=cache)) for member in members]
            t1 = time.perf_counter()
            known = seen.lookup(layer, simulated[0]) if seen is not None else None
            if known is not None:
                return known, t1
            if evaluator.user_fn is not None:
                value = evaluator(base)
            else:
                with exact_kernels(evaluator.device):
                    outputs = runner.outputs(layer.layer) if runner is not None else None
                value = evaluator.score(outputs if outputs is not None else evaluator.outputs(base))
            if seen is not None:
                seen.add(layer, simulated[0], value)
            return value, t1

    return trial


class _Seen:
    """Metrics of evaluated trials by (layer, content hash of what the simulation changed: the weight and, for a
    bias-corrected spec, the bias), the fp16 weights included: a trial's metric is a function of those alone, so
    an equal change has the same metric."""

    def __init__(self, layers: Sequence[Layer], weights: dict[str, torch.Tensor], baseline: float) -> None:
        self.known = {(layer.layer, content_hash(weights[layer.layer], layer.precision), None): baseline
                      for layer in layers}
        self.hits = 0

    @staticmethod
    def key(layer: Layer, simulated: Any) -> tuple:
        delta = simulated.params.get("bias_delta")  # finer than the fp16 bias it corrects
        bias = None if delta is None else content_hash(torch.as_tensor(delta), "fp32")
        return layer.layer, content_hash(simulated.weight, layer.precision), bias

    def lookup(self, layer: Layer, simulated: Any) -> Optional[float]:
        found = self.known.get(self.key(layer, simulated))
        self.hits += found is not None
        return found

    def add(self, layer: Layer, simulated: Any, value: float) -> None:
        self.known[self.key(layer, simulated)] = value


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


def plan_group_trials(grouped: GroupTrials, specs: Sequence[Spec], weights: dict[str, torch.Tensor],
                      cache: SimCache, kmeans: str, store: ResultStore,
                      timing: dict[str, float]) -> tuple[list, list, "TrialBook", GroupStore]:
    """``plan_trials`` for a grouped sweep: (group trials, pending ones, the book, the store by group name)."""
    plan, skipped_trials = grouped.plan(specs, _skip_reason, weights, cache, kmeans)
    store = GroupStore(store, grouped)
    done = store.finished()
    pending = [(group, spec) for group, spec in plan if (group.layer, str(spec)) not in done]
    return plan, pending, TrialBook(done, skipped_trials, timing), store


@dataclass
class TrialBook:
    """What a sweep's trial loop records: finished values by (layer, spec), skips, timing and counts."""

    done: dict[tuple[str, str], tuple[float, float]]
    skipped_trials: list[dict[str, str]]
    timing: dict[str, float]
    ran: int = 0
    new_keys: set[tuple[str, str]] = field(default_factory=set)
    unemittable: set[tuple[str, str]] = field(default_factory=set)  # trials whose simulated weight holds NaN/inf


@dataclass
class TrialOutcome:
    """One trial as run (locally or on a Ray worker): its metric value and seconds, or why compress would refuse
    it (``skipped``: its simulated weight overflows fp16)."""

    layer: str
    spec: str
    value: float = math.nan
    compression: float = 0.0
    evaluation: float = 0.0
    skipped: Optional[str] = None


def run_trial(i: int, layer: Layer, spec: Spec, trial: Callable[[Layer, Spec], tuple[float, float]],
              simulator: ChunkSimulator) -> TrialOutcome:
    """Run trial ``i`` of the simulator's list by ``trial`` (-> metric, time the compression ended). A NaN/inf
    metric names its trial; a spec whose simulated weight overflows is a skipped outcome (compress refuses it), a
    layer holding NaN/inf is an error."""
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
        return TrialOutcome(layer.layer, str(spec), skipped=exc.problem)
    return TrialOutcome(layer.layer, str(spec), value, t1 - t0, time.perf_counter() - t1)


def record_outcome(outcome: TrialOutcome, store: ResultStore, book: "TrialBook", bar: Any) -> None:
    """Store a finished trial at once (or book it as skipped) and count it."""
    key = (outcome.layer, outcome.spec)
    if outcome.skipped is not None:  # compress refuses this spec on this layer: a skipped trial, so no plan picks it
        book.skipped_trials.append({"layer": outcome.layer, "spec": outcome.spec, "reason": outcome.skipped})
        book.unemittable.add(key)
        bar.update(1)
        return
    t0 = time.perf_counter()
    seconds = outcome.compression + outcome.evaluation
    store.add(outcome.layer, outcome.spec, outcome.value, seconds)
    book.timing["compression"] += outcome.compression
    book.timing["evaluation"] += outcome.evaluation
    book.timing["store"] += time.perf_counter() - t0
    book.done[key] = (outcome.value, seconds)
    book.new_keys.add(key)
    book.ran += 1
    bar.update(1)


def run_trials(runnable: list[tuple[Layer, Spec]], trial: Callable[[Layer, Spec], tuple[float, float]],
               simulator: ChunkSimulator, store: ResultStore, book: TrialBook, bar: Any,
               deadline: Optional[float]) -> None:
    """Run each (layer, spec) here (``run_trial``), storing each as it finishes; stops at ``deadline``
    (perf_counter seconds)."""
    for i, (layer, spec) in enumerate(runnable):
        if deadline is not None and time.perf_counter() >= deadline:
            logger.info("time budget reached after %d trials", book.ran)
            break
        record_outcome(run_trial(i, layer, spec, trial, simulator), store, book, bar)


def collect_trials(plan: list[tuple[Layer, Spec]], book: TrialBook, weights: dict[str, torch.Tensor],
                   baseline: float, evaluator: Evaluator, ios18: bool,
                   grouped: Optional[GroupTrials] = None) -> tuple[list[Trial], int]:
    """(the finished trials of ``plan`` in plan order with their predicted bytes, how many are still pending);
    a group trial's bytes are its members' exact bytes summed."""
    plan = [(layer, spec) for layer, spec in plan if (layer.layer, str(spec)) not in book.unemittable]
    trials = []
    for layer, spec in plan:
        found = book.done.get((layer.layer, str(spec)))
        if found is None:
            continue
        value, seconds = found
        if grouped is not None:
            members = grouped.members(layer, spec)
            trials.append(Trial(layer.layer, ",".join(m.coreml_name for m in members), layer.op_type, str(spec),
                                layer.params, grouped.bytes(layer, spec, weights, ios18), layer.fp16_bytes, value,
                                baseline, evaluator.drop(baseline, value), seconds,
                                from_store=(layer.layer, str(spec)) not in book.new_keys,
                                members=[m.layer for m in members]))
            continue
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


def _progress(total: int, enabled: bool, desc: str = "sensitivity", units: str = "trials"):
    """A tqdm bar with ETA and ``units`` per minute on a terminal, a no-op otherwise."""
    from tqdm import tqdm

    class RateBar(tqdm):
        @property
        def format_dict(self):
            d = super().format_dict
            rate = d["n"] / d["elapsed"] if d["elapsed"] else None
            return {**d, "per_min": f"{60 * rate:.1f}" if rate else "?"}

    return RateBar(total=total, desc=desc, disable=not enabled or not sys.stderr.isatty(), leave=False,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                              f"[{{elapsed}}<{{remaining}}, {{per_min}} {units}/min]")
