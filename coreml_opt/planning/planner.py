"""Solve a budget, validate the plan with every layer compressed together, repair it, and emit it.

Per-layer drops are measured one layer at a time, but drops do not add up exactly. Validation
measures the whole plan; when it misses an accuracy budget, the measured excess is charged to the
plan's compressed layers (in proportion to the bytes each saves) and the problem is re-solved. The
failed plan is then predicted at its measured loss, so it can never come back, and the fp16 plan
(no loss) is always feasible: repair ends with a plan that meets the budget or says it cannot.
Under a size budget, drops are instead re-measured in the context of the measured plan and re-solved
(:mod:`.context`), keeping the best measured plan.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping

from ..errors import PlanError
from ..metrics import check_finite_value
from ..metrics import drop as metric_drop
from ..plan import Plan
from ..spec import parse_spec
from .costs import Problem
from .solver import Choices, Option, Solution, smallest, solve

if TYPE_CHECKING:
    from .context import Variants

logger = logging.getLogger(__name__)

Measure = Callable[[Mapping[str, str]], float]  # {layer: spec} -> metric with all of them compressed


@dataclass
class Attempt:
    """One solved plan and, when validated, its measured metric."""

    specs: dict[str, str]
    bytes: int  # all weights, fixed ones included
    predicted_drop: float
    measured_metric: float | None = None
    measured_drop: float | None = None
    predicted_context_drop: float | None = None  # the in-context model's prediction (context rounds only)
    source: str = "additive"  # "additive" (single-layer drops), "in context" (re-solved), "neighbour" (measured)


@dataclass
class PlanResult:
    """The chosen plan with its predicted and measured figures and the repair history."""

    problem: Problem
    specs: dict[str, str]
    bytes: int
    predicted_drop: float
    budget: str
    measured_metric: float | None = None
    measured_drop: float | None = None
    attempts: list[Attempt] = field(default_factory=list)
    predicted_context_drop: float | None = None
    source: str = "additive"
    context_evaluations: int = 0  # extra evaluations the context rounds spent

    @property
    def bits_per_weight(self) -> float:
        return self.problem.bits_per_weight(self.bytes)

    @property
    def plan(self) -> Plan:
        return make_plan(self.problem, self.specs)

    def summary(self) -> str:
        p = self.problem
        lines = [f"budget: {self.budget}", f"size:   {p.describe_bytes(self.bytes)}",
                 f"{p.metric}: baseline {p.metric_text(p.baseline)}, predicted drop {p.drop_text(self.predicted_drop)}"
                 + (f", measured {p.metric_text(self.measured_metric)} (drop {p.drop_text(self.measured_drop)})"
                    if self.measured_metric is not None else " (not measured)")]
        if self.context_evaluations:
            lines.append(f"in context: {len(self.attempts) - 1} re-solved plan(s) from {self.context_evaluations} "
                         "extra evaluations (predicted alone / in context -> measured drop): " + "; ".join(
                             f"{p.drop_text(a.predicted_drop)} / {p.drop_text(a.predicted_context_drop)} -> "
                             f"{p.drop_text(a.measured_drop)}" for a in self.attempts)
                         + f"; kept the best measured ({self.source} plan)")
        elif len(self.attempts) > 1:
            lines.append(f"{len(self.attempts)} plans solved and measured (predicted -> measured drop): "
                         + "; ".join(f"{p.drop_text(a.predicted_drop)} -> {p.drop_text(a.measured_drop)}"
                                     for a in self.attempts if a.measured_drop is not None) + "; kept the last "
                         "that met the budget, or the best measured")
        return "\n".join(lines)


def make_plan(problem: Problem, specs: Mapping[str, str]) -> Plan:
    """A plan YAML in the foundation's format: per-layer overrides by torch path (a group's spec on each member
    that takes it), the sweep's target."""
    layers = {layer: parse_spec(spec) for layer, spec in problem.expand(specs).items()}
    # Emit the palettes the sweep measured: coremltools' k-means, or the fast one via lut_function.
    return Plan(global_spec=None, layers=layers, target=problem.target, kmeans=problem.sweep.get("kmeans", "exact"))


def solve_budget(problem: Problem, *, max_bytes: int | None = None, max_drop: float | None = None,
                 choices: list[Choices] | None = None) -> Solution:
    """Optimal plan: least predicted drop under ``max_bytes`` (all weights), or least bytes under ``max_drop``."""
    choices = choices or problem.choices
    room = None if max_bytes is None else max_bytes - problem.fixed_bytes
    if room is not None:
        least = smallest(choices).bytes + problem.fixed_bytes
        if max_bytes < least:
            raise PlanError(f"size budget {max_bytes:,} bytes", "is smaller than the most compressed plan",
                            f"the smallest size reachable with these candidates is {problem.describe_bytes(least)}")
    minimise = "drop" if max_bytes is not None else "bytes"
    solution = solve(choices, max_bytes=room, max_drop=max_drop, minimise=minimise)
    if solution is None:
        what = (f"predicted {problem.metric} drop {problem.drop_text(max_drop)}"
                + (f" within {max_bytes:,} bytes" if max_bytes is not None else ""))
        raise PlanError(f"budget {what}", "no plan meets it", "raise the drop budget or the size budget")
    return solution


def plan_budget(problem: Problem, *, max_bytes: int | None = None, max_drop: float | None = None,
                measure: Measure | None = None, max_rounds: int = 10, refine_rounds: int = 3,
                label: str = "", context_rounds: int = 0, variants: "Variants | None" = None,
                max_evaluations: int | None = None) -> PlanResult:
    """Solve, then (with ``measure``) validate and repair.

    With ``max_drop`` (metric units) repair runs until a plan measures within it, up to ``max_rounds``.
    With a size budget alone and ``context_rounds``, drops are re-measured in the context of the measured plan
    and re-solved (:mod:`.context`, ``variants`` measures one-layer changes, ``max_evaluations`` bounds them);
    without, a plan that measures worse than predicted is repaired up to ``refine_rounds`` times. Either way the
    best measured plan within the budget is returned."""
    if max_bytes is None and max_drop is None:
        raise PlanError("budget", "none given", "give a size budget (--bpw, --size, --ratio) or --max-drop")
    if max_drop is not None and max_drop < 0:
        raise PlanError(f"max drop {problem.drop_text(max_drop)}", "is negative", "give a drop of 0 or more")
    label = label or (problem.describe_bytes(max_bytes) if max_bytes is not None
                      else f"{problem.metric} drop <= {problem.drop_text(max_drop)}")
    choices = list(problem.choices)
    least = smallest(choices).bytes + problem.fixed_bytes
    if max_bytes is not None and max_bytes < least:  # named as the user gave it (bits per weight, size or ratio)
        raise PlanError(f"budget {label}", "is below the most compressed plan these candidates allow",
                        f"the smallest size reachable with these candidates is {problem.describe_bytes(least)}: ask for at "
                        "least that, or sweep smaller candidates (e.g. pal1)")
    attempts: list[Attempt] = []
    rounds = 1 if measure is None else max_rounds if max_drop is not None else max(refine_rounds, 1)
    for round_no in range(rounds):
        try:
            solution = solve_budget(problem, max_bytes=max_bytes, max_drop=max_drop, choices=choices)
        except PlanError:
            if not attempts:
                raise
            break  # repair charges left no plan within both budgets
        specs = solution.specs(problem.choices)
        attempt = Attempt(specs, solution.bytes + problem.fixed_bytes, predicted_drop(problem, specs))
        attempts.append(attempt)
        if measure is None:
            return _result(problem, attempt, label, attempts)
        attempt.measured_metric = measure(specs)
        attempt.measured_drop = _drop(problem, attempt.measured_metric)
        logger.info("plan of %d bytes: predicted drop %.5f, measured %.5f", attempt.bytes,
                    attempt.predicted_drop, attempt.measured_drop)
        if max_drop is not None and attempt.measured_drop <= max_drop + 1e-12:
            return _result(problem, attempt, label, attempts)
        if max_drop is None and context_rounds > 0:
            from .context import refine_in_context

            attempts, best, used = refine_in_context(problem, attempt, max_bytes=max_bytes, measure=measure,
                                                     variants=variants, rounds=context_rounds,
                                                     max_evaluations=max_evaluations)
            result = _result(problem, best, label, attempts)
            result.context_evaluations = used
            return result
        if max_drop is None and attempt.measured_drop <= solution.drop + 1e-12:
            break  # the prediction held
        if round_no + 1 < rounds:
            charged = _charge_excess(choices, solution, attempt.measured_drop - solution.drop)
            if charged is None:
                break
            choices = charged
    best = min(attempts, key=lambda a: a.measured_drop)  # the first (least repaired) among equals
    if max_drop is None:
        return _result(problem, best, label, attempts)
    raise PlanError(f"max drop {problem.drop_text(max_drop)}", f"no plan met it in {len(attempts)} measured round(s) "
                    f"(best measured drop {problem.drop_text(best.measured_drop)} at {best.bytes:,} bytes)",
                    "raise the drop budget (or the size budget), or allow more repair rounds")


def _charge_excess(choices: list[Choices], solution: Solution, excess: float) -> list[Choices] | None:
    """Add the measured excess loss to the plan's compressed options, weighted by bytes saved (None: nothing to charge)."""
    saved = [max(c.options[0].bytes - c.options[i].bytes, 0) if c.options[i].spec != "none" else 0
             for c, i in zip(choices, solution.picks)]
    total = sum(saved)
    if total == 0 or excess <= 0:
        logger.warning("plan measured %+.5f beyond its prediction with nothing compressed to charge it to", excess)
        return None
    out = []
    for c, i, s in zip(choices, solution.picks, saved):
        if s == 0:
            out.append(c)
            continue
        options = list(c.options)
        o = options[i]
        options[i] = Option(o.spec, o.bytes, o.drop + excess * s / total)
        out.append(Choices(c.layer, tuple(options)))
    return out


def predicted_drop(problem: Problem, specs: Mapping[str, str]) -> float:
    """Sum of the sweep's single-layer drops (the additive prediction, before any repair charges)."""
    by_layer = {c.layer: {o.spec: o.drop for o in c.options} for c in problem.choices}
    return math.fsum(by_layer[layer][spec] for layer, spec in specs.items())


def measured_drop(problem: Problem, metric: float) -> float:
    """Measured drop against the sweep's baseline; a NaN/inf either side would compare as "met"."""
    if not math.isfinite(problem.baseline):
        raise PlanError("sweep", f"its baseline {problem.metric} is {problem.baseline}, so no plan can be measured "
                        "against it", "rerun the sensitivity sweep on finite data and weights")
    return metric_drop(problem.baseline, check_finite_value(problem.metric, metric), problem.higher_is_better)


_drop = measured_drop


def _result(problem: Problem, attempt: Attempt, label: str, attempts: list[Attempt]) -> PlanResult:
    return PlanResult(problem, attempt.specs, attempt.bytes, attempt.predicted_drop, label, attempt.measured_metric,
                      attempt.measured_drop, attempts, attempt.predicted_context_drop, attempt.source)


def plan_bytes(problem: Problem, specs: Mapping[str, str]) -> int:
    """Predicted bytes of all weights for ``specs`` (swept layers) plus the fixed fp16 weights."""
    by_layer = {c.layer: {o.spec: o.bytes for o in c.options} for c in problem.choices}
    return sum(by_layer[layer][spec] for layer, spec in specs.items()) + problem.fixed_bytes
