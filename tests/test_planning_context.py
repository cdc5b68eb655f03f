"""Context rounds on a real sweep of the digits CNN: costs re-measured with every other layer compressed."""
from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import run_cli

from coreml_opt.planning import PlanningSession, plan_bytes
from coreml_opt.planning.context import context_choices, neighbours, refine_in_context
from coreml_opt.planning.planner import Attempt, measured_drop, predicted_drop, solve_budget
from coreml_opt.planning.solver import Choices, Option

CANDIDATES = ["int8", "pal4", "pal2", "pal1"]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, digits_model):
    """A finished sweep of the digits CNN on its held-out split (real analyser; the batched k-means plans emit)."""
    from coreml_opt.sensitivity import analyse

    out = tmp_path_factory.mktemp("sweep-context")
    analyse("coreml_opt.zoo:digits_cnn", (1, 1, 8, 8), "coreml_opt.sensitivity.examples:digits_heldout", "accuracy",
            candidates=CANDIDATES, out_dir=out, progress=False, kmeans="fast")
    return out


@pytest.fixture(scope="module")
def session(sweep_dir):
    return PlanningSession.open(sweep_dir)


def test_in_context_costs_are_what_the_evaluator_measures(session):
    """One-layer changes of a plan, run from each layer's cut, equal whole plans measured by a fresh session;
    and the context model predicts each measured neighbour plan at exactly its measured drop."""
    problem = session.problem
    plan = {c.layer: "pal2" for c in problem.choices}
    ends = (problem.choices[0], problem.choices[-1])  # the first layer's cut keeps least, the last's most
    changes = [(c.layer, spec) for c in ends for spec in neighbours(c, "pal2")]
    assert sorted(spec for _, spec in changes) == ["pal1", "pal1", "pal4", "pal4"]
    cut = PlanningSession(problem, session.model, session.evaluator, session.kmeans)  # nothing cached yet
    fast = cut.variants()(plan, changes)
    assert cut.variant_runner.evaluations == len(changes)  # the cut path ran, not whole measurements
    fresh = PlanningSession(problem, session.model, session.evaluator, session.kmeans)  # full forward passes
    whole = [fresh.measure({**plan, layer: spec}) for layer, spec in changes]
    assert fast == whole
    base = measured_drop(problem, fresh.measure(plan))
    deltas = {(layer, spec): measured_drop(problem, m) - base for (layer, spec), m in zip(changes, whole)}
    costs = {c.layer: {o.spec: o.drop for o in c.options} for c in context_choices(problem, plan, base, deltas)}
    assert sum(costs[layer][spec] for layer, spec in plan.items()) == pytest.approx(base, abs=1e-12)
    for (layer, spec), m in zip(changes, whole):
        changed = {**plan, layer: spec}
        assert sum(costs[name][s] for name, s in changed.items()) == pytest.approx(measured_drop(problem, m), abs=1e-12)


def test_rounds_never_return_a_plan_measured_worse_than_one_measured(session):
    problem = session.problem
    budget = problem.budget_bytes(bpw=3)
    seen: list[tuple[dict, float]] = []
    variants = session.variants()

    def recording(plan, changes):
        values = variants(plan, changes)
        seen.extend(({**plan, layer: spec}, v) for (layer, spec), v in zip(changes, values))
        return values

    def measure(specs):
        value = session.measure(specs)
        seen.append((dict(specs), value))
        return value

    first_specs = solve_budget(problem, max_bytes=budget).specs(problem.choices)
    metric = measure(first_specs)
    first = Attempt(first_specs, plan_bytes(problem, first_specs), predicted_drop(problem, first_specs), metric,
                    measured_drop(problem, metric))
    attempts, best, used = refine_in_context(problem, first, max_bytes=budget, measure=measure, variants=recording)
    within = [value for specs, value in seen if plan_bytes(problem, specs) <= budget]
    assert best.measured_metric == max(within)
    assert all(best.measured_drop <= a.measured_drop for a in attempts)
    assert used == len(seen) - 1  # every extra evaluation counted
    assert best.bytes == plan_bytes(problem, best.specs) <= budget


def test_rounds_repair_single_layer_drops_that_lie(session):
    """pal1 made to look free alone: the additive plan takes it everywhere; in context its cost shows and the
    re-solved plan measures better, within the same byte budget."""
    problem = session.problem
    lying = [Choices(c.layer, tuple(Option(o.spec, o.bytes, -1e-3 if o.spec == "pal1" else o.drop)
                                    for o in c.options)) for c in problem.choices]
    liar = dataclasses.replace(problem, choices=lying)
    budget = problem.budget_bytes(bpw=3)
    fooled = PlanningSession(liar, session.model, session.evaluator, session.kmeans)
    additive = fooled.plan(size=budget, validate=False)
    assert set(additive.specs.values()) == {"pal1"}
    result = fooled.plan(size=budget)
    assert result.attempts[0].specs == additive.specs
    assert result.measured_drop < measured_drop(problem, session.measure(additive.specs))
    assert result.bytes == plan_bytes(problem, result.specs) <= budget
    assert result.context_evaluations > 0 and len(result.attempts) > 1
    assert all(a.predicted_context_drop is not None for a in result.attempts[1:])


def test_size_budget_is_met_exactly_in_bytes_with_context_rounds(session, tmp_path):
    from coreml_opt.model.package import load_package

    result = session.plan(bpw=3)
    assert result.bytes == plan_bytes(session.problem, result.specs) <= session.problem.budget_bytes(bpw=3)
    assert all(a.bytes <= session.problem.budget_bytes(bpw=3) for a in result.attempts)
    assert result.measured_metric == session.measure(result.specs)
    report = session.emit(result, tmp_path / "planned.mlpackage")
    stored = load_package(tmp_path / "planned.mlpackage", load_weights=False).inventory.total_bytes
    assert stored == report.bytes_after
    assert abs(stored - result.bytes) <= 0.01 * result.bytes


def test_context_rounds_off_and_bounded(session):
    off = session.plan(bpw=4, context_rounds=0)
    assert off.context_evaluations == 0 and off.predicted_context_drop is None
    bounded = session.plan(bpw=4, max_evaluations=3)
    assert bounded.context_evaluations <= 3


def test_cli_plan_records_alone_in_context_and_measured_drops(sweep_dir):
    code, stdout, stderr = run_cli("plan", str(sweep_dir), "--bpw", "3", "--json")
    assert code == 0, stderr
    out = json.loads(stdout)
    assert out["context_evaluations"] > 0 and out["plan_source"] in ("additive", "in context", "neighbour")
    first, *rest = out["attempts"]
    assert first["source"] == "additive" and first["predicted_context_drop"] is None
    assert all(a["predicted_context_drop"] is not None and a["measured_drop"] is not None for a in rest)
    assert out["measured_drop"] <= min(a["measured_drop"] for a in out["attempts"])
    assert out["bytes"] <= 45_660  # 3 bits per weight of the digits CNN's 121,760 weights


def test_cli_negative_context_rounds_is_one_line(sweep_dir):
    code, stdout, stderr = run_cli("plan", str(sweep_dir), "--bpw", "3", "--context-rounds", "-1")
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and "--context-rounds -1" in stderr and "Traceback" not in stderr
