"""Plans that hold when combined: re-measure candidate drops in the context of the other layers' compression.

Single-layer drops do not add (compressing two layers loses more, or less, than the two alone). After the
additive plan P is measured, each round measures, for every layer L, its options next to P's choice (the
nearest smaller and the nearest larger, see :func:`neighbours`) with every other layer compressed per P. The
metric is then modelled around P, coordinate-wise:

    drop(Q) ~ drop(P) + sum over L of [drop(P with L <- Q_L) - drop(P)]

with the measured change where L's option was measured and the single-layer change (alone(Q_L) - alone(P_L))
elsewhere. This is separable, so the exact solver re-solves it exactly; the solved plan is measured and
becomes the next round's P. Every measured plan within the budget (solved plans and the neighbours measured
on the way, which all hold every layer compressed) competes, and the best measured is returned: rounds never
return a plan measured worse than one already measured. (A first-order, coordinate-wise model in the spirit
of HAWQ's and ZeroQ's per-layer sensitivities, re-linearised each round around the measured plan.)
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Mapping, Sequence

from .costs import Problem
from .planner import Attempt, Measure, measured_drop, plan_bytes, predicted_drop, solve_budget
from .solver import Choices, Option, pareto_options

logger = logging.getLogger(__name__)

# Three rounds of at most two neighbours per layer: at most 3 * (2 * layers + 1) evaluations, about the cost of
# a sweep of 6 candidates, and on the bench the third round rarely moves the plan (see README).
DEFAULT_CONTEXT_ROUNDS = 3

# plan, [(layer, spec)] -> the metric of the plan with that one layer changed, for each change
Variants = Callable[[Mapping[str, str], Sequence[tuple[str, str]]], list[float]]


def neighbours(choices: Choices, current: str) -> list[str]:
    """The layer's options next to ``current``: on each side (fewer bytes, more bytes) the one nearest in bytes
    that no option on the same side beats on both bytes and single-layer drop. Sides are taken apart so that a
    wrong single-layer drop (an option that looks free) cannot hide the neighbours the context may need."""
    size = next(o.bytes for o in choices.options if o.spec == current)
    smaller = [o for o in choices.options if o.bytes < size]
    larger = [o for o in choices.options if o.bytes > size]
    below = [smaller[i] for i in pareto_options(smaller)][-1:]  # ascending bytes: the nearest is last
    above = [larger[i] for i in pareto_options(larger)][:1]
    return [o.spec for o in below + above]


def context_choices(problem: Problem, plan: Mapping[str, str], plan_drop: float,
                    deltas: Mapping[tuple[str, str], float]) -> list[Choices]:
    """Every layer's options costed around ``plan``: its share of the plan's measured drop plus the change
    measured in context (``deltas``: (layer, spec) -> drop(plan with layer <- spec) - drop(plan)), else the
    single-layer change. The costs of ``plan`` itself sum to ``plan_drop``."""
    alone = {c.layer: {o.spec: o.drop for o in c.options} for c in problem.choices}
    weights = [max(alone[c.layer][plan[c.layer]], 0.0) for c in problem.choices]
    total = math.fsum(weights)
    shares = ([plan_drop * w / total for w in weights] if total > 0
              else [plan_drop / len(problem.choices)] * len(problem.choices))
    out = []
    for c, share in zip(problem.choices, shares):
        here = alone[c.layer][plan[c.layer]]
        out.append(Choices(c.layer, tuple(
            Option(o.spec, o.bytes, share + (0.0 if o.spec == plan[c.layer] else
                                             deltas.get((c.layer, o.spec), o.drop - here)))
            for o in c.options)))
    return out


def one_by_one(measure: Measure) -> Variants:
    """Plan variants measured as whole plans, one call of ``measure`` each (any backend)."""
    return lambda plan, changes: [measure({**plan, layer: spec}) for layer, spec in changes]


def refine_in_context(problem: Problem, first: Attempt, *, max_bytes: int, measure: Measure,
                      variants: Variants | None = None, rounds: int = DEFAULT_CONTEXT_ROUNDS,
                      max_evaluations: int | None = None) -> tuple[list[Attempt], Attempt, int]:
    """Context rounds after the measured additive plan ``first``: (solved attempts, best measured, evaluations).

    ``max_evaluations`` bounds the extra evaluations (default: every neighbour each round, at most
    ``rounds * (2 * layers + 1)``); layers holding the most fp16 bytes are re-measured first."""
    if first.measured_drop is None:
        raise ValueError("refine_in_context needs the first plan measured")
    variants = variants or one_by_one(measure)
    limit = rounds * (2 * len(problem.choices) + 1) if max_evaluations is None else max_evaluations
    known: dict[frozenset, float] = {frozenset(first.specs.items()): first.measured_metric}
    attempts, best, used, current = [first], first, 0, first
    solved = {frozenset(first.specs.items())}
    order = sorted(problem.choices, key=lambda c: -c.options[0].bytes)
    for round_no in range(rounds):
        if used >= limit:
            logger.info("context rounds: evaluation budget (%d) spent after %d round(s)", limit, round_no)
            break
        changes = [(c.layer, spec) for c in order for spec in neighbours(c, current.specs[c.layer])]
        todo = [(layer, spec) for layer, spec in changes if frozenset({**current.specs, layer: spec}.items())
                not in known][:max(limit - used - 1, 0)]  # one evaluation kept for the solved plan
        for (layer, spec), metric in zip(todo, variants(current.specs, todo)):
            known[frozenset({**current.specs, layer: spec}.items())] = metric
        used += len(todo)
        deltas = {}
        for layer, spec in changes:
            specs = {**current.specs, layer: spec}
            metric = known.get(frozenset(specs.items()))
            if metric is None:
                continue
            drop = measured_drop(problem, metric)
            deltas[(layer, spec)] = drop - current.measured_drop
            size = plan_bytes(problem, specs)
            if size <= max_bytes and drop < best.measured_drop:  # a measured plan within the budget: it competes
                best = Attempt(specs, size, predicted_drop(problem, specs), metric, drop,
                               current.measured_drop + deltas[(layer, spec)], source="neighbour")
        solution = solve_budget(problem, max_bytes=max_bytes,
                                choices=context_choices(problem, current.specs, current.measured_drop, deltas))
        specs = solution.specs(problem.choices)
        key = frozenset(specs.items())
        if key not in known:
            if used >= limit:
                logger.info("context rounds: evaluation budget (%d) spent after %d round(s)", limit, round_no)
                break
            known[key] = measure(specs)
            used += 1
        attempt = Attempt(specs, solution.bytes + problem.fixed_bytes, predicted_drop(problem, specs), known[key],
                          measured_drop(problem, known[key]), solution.drop, source="in context")
        logger.info("context round %d: %d changes measured; plan predicted %.5f alone, %.5f in context, measured "
                    "%.5f", round_no + 1, len(todo), attempt.predicted_drop, solution.drop, attempt.measured_drop)
        if key in solved:
            break  # the model around this plan returns a plan already solved: converged
        solved.add(key)
        attempts.append(attempt)
        if attempt.measured_drop < best.measured_drop:
            best = attempt
        current = attempt
    return attempts, best, used
