"""The exact solver, the cost model's budgets, greedy and validate-and-repair, on synthetic problems."""
from __future__ import annotations

import random
import time

import pytest

from coreml_opt.errors import PlanError
from coreml_opt.planning import (Choices, Option, brute_force, build_problem, greedy, parse_size, plan_budget,
                                 solve, solve_budget)
from coreml_opt.planning.solver import pareto_options, smallest


def random_layers(rng: random.Random, n_layers: int, n_options: int) -> list[Choices]:
    layers = []
    for i in range(n_layers):
        params = rng.randint(2_000, 60_000)
        options = [Option("none", 2 * params + 64, 0.0)]
        for j in range(n_options - 1):
            bits = rng.choice([1, 2, 3, 4, 6, 8])
            options.append(Option(f"s{j}", params * bits // 8 + rng.randint(64, 600),
                                  rng.uniform(-0.002, 0.05 / bits)))
        layers.append(Choices(f"l{i}", tuple(options)))
    return layers


@pytest.mark.parametrize("seed", range(6))
def test_solver_matches_brute_force_on_random_instances(seed):
    rng = random.Random(seed)
    for _ in range(25):
        layers = random_layers(rng, rng.randint(1, 5), rng.randint(1, 5))
        fp16 = sum(c.options[0].bytes for c in layers)
        least = smallest(layers).bytes
        cap = rng.randint(least - 50, fp16 + 50)
        got, best = solve(layers, max_bytes=cap), brute_force(layers, max_bytes=cap)
        assert (got is None) == (best is None)
        if best is not None:
            assert got.bytes <= cap
            assert got.drop == pytest.approx(best.drop, abs=1e-12)
            assert got.bytes == best.bytes  # the tie-break: most bytes among least-loss plans
        limit = rng.uniform(-0.001, 0.03)
        got, best = solve(layers, max_drop=limit, minimise="bytes"), brute_force(layers, max_drop=limit,
                                                                                  minimise="bytes")
        assert (got is None) == (best is None)
        if best is not None:
            assert got.bytes == best.bytes
            assert got.drop == pytest.approx(best.drop, abs=1e-12)


def test_solver_is_exact_where_greedy_by_ratio_is_not():
    # Classic knapsack trap: the best loss-per-byte item blocks the only optimal combination.
    layers = [Choices("a", (Option("none", 100, 0.0), Option("x", 40, 0.30))),
              Choices("b", (Option("none", 100, 0.0), Option("y", 51, 0.10))),
              Choices("c", (Option("none", 100, 0.0), Option("z", 51, 0.10)))]
    got = solve(layers, max_bytes=202)
    assert got.specs(layers) == {"a": "none", "b": "y", "c": "z"}
    assert got.drop == pytest.approx(0.2)


def test_solver_handles_a_thousand_layers_of_ten_candidates_in_seconds():
    layers = random_layers(random.Random(7), 1000, 10)
    fp16 = sum(c.options[0].bytes for c in layers)
    start = time.perf_counter()
    got = solve(layers, max_bytes=int(0.3 * fp16))
    assert got is not None and got.bytes <= int(0.3 * fp16)
    assert time.perf_counter() - start < 60  # generous on a loaded CI machine; typically well under 5 s


def test_dominated_options_are_pruned_but_ties_keep_one():
    options = [Option("none", 100, 0.0), Option("a", 50, 0.1), Option("b", 60, 0.2), Option("c", 50, 0.1),
               Option("d", 30, 0.5)]
    assert [options[i].spec for i in pareto_options(options)] == ["d", "a", "none"]


def _problem():
    sweep = {"metric": "accuracy", "baseline": 0.9, "target": "iOS18", "candidates": ["pal4", "pal2"],
             "layers": [{"layer": f"l{i}.weight", "coreml_name": f"l{i}_weight_to_fp16", "op_type": "linear",
                         "shape": [100, 100], "params": 10_000, "fp16_bytes": 20_064} for i in range(3)]}
    trials = [{"layer": f"l{i}.weight", "spec": spec, "bytes": size, "drop": drop}
              for i, (d4, d2) in enumerate([(0.001, 0.05), (0.002, 0.01), (0.0, 0.03)])
              for spec, size, drop in (("pal4", 5_128, d4), ("pal2", 2_628, d2))]
    return build_problem(sweep, trials, fixed={"head.weight": 1_344}, fixed_params=640)


def test_infeasible_size_budget_names_the_smallest_reachable_size():
    problem = _problem()
    smallest_total = 3 * 2_628 + 1_344
    with pytest.raises(PlanError, match=f"smallest size reachable.*{smallest_total:,} bytes"):
        solve_budget(problem, max_bytes=smallest_total - 1)
    assert solve_budget(problem, max_bytes=smallest_total).bytes == 3 * 2_628


def test_size_budgets_count_the_fixed_weights():
    problem = _problem()
    assert problem.total_params == 30_640
    assert problem.budget_bytes(bpw=4) == 4 * 30_640 // 8
    assert problem.budget_bytes(ratio=2) == (3 * 20_064 + 1_344) // 2
    assert problem.budget_bytes(size="12kB") == 12 * 1024  # KB reads as the KiB tables print
    assert parse_size("1.5MiB") == 1_572_864 and parse_size("52000") == 52_000
    with pytest.raises(PlanError, match="not a size"):
        parse_size("12 parsecs")
    with pytest.raises(PlanError, match="exactly one"):
        problem.budget_bytes(bpw=4, size="1MB")


def test_greedy_applies_least_harmful_pairs_until_the_budget_fits():
    problem = _problem()
    budget = 2 * 5_128 + 20_064 + 1_344
    specs = greedy(problem, budget)
    # l2/pal4 (drop 0.0) then l0/pal4 (0.001) fit the budget; l1 is never touched.
    assert specs == {"l0.weight": "pal4", "l1.weight": "none", "l2.weight": "pal4"}
    solved = solve_budget(problem, max_bytes=budget)
    assert solved.drop <= sum(o.drop for c in problem.choices for o in c.options if o.spec == specs[c.layer])


def test_repair_meets_a_drop_budget_when_layers_interact():
    problem = _problem()
    calls = []

    def measure(specs):  # l0 and l1 compressed together cost 0.02 extra (not additive)
        calls.append(dict(specs))
        drops = {c.layer: {o.spec: o.drop for o in c.options} for c in problem.choices}
        drop = sum(drops[layer][spec] for layer, spec in specs.items())
        if specs["l0.weight"] != "none" and specs["l1.weight"] != "none":
            drop += 0.02
        return problem.baseline - drop

    result = plan_budget(problem, max_drop=0.005, measure=measure)
    assert len(result.attempts) >= 2  # the additive optimum (pal4 everywhere) failed first
    assert result.attempts[0].measured_drop > 0.005
    assert result.measured_drop <= 0.005
    assert not (result.specs["l0.weight"] != "none" and result.specs["l1.weight"] != "none")
    assert result.attempts[0].specs == {"l0.weight": "pal4", "l1.weight": "pal4", "l2.weight": "pal4"}


def test_repair_says_when_it_cannot_meet_the_budget():
    problem = _problem()
    def measure(specs):  # any compression at all costs 0.5
        return problem.baseline - (0.5 if set(specs.values()) != {"none"} else 0.0)

    with pytest.raises(PlanError, match="no plan met it in 1 measured round") as excinfo:
        plan_budget(problem, max_drop=0.005, measure=measure, max_rounds=1)
    assert str(excinfo.value).startswith(f"max drop {problem.drop_text(0.005)}: ")  # the unit --max-drop takes
    assert f"best measured drop {problem.drop_text(0.5)} at" in str(excinfo.value)
    assert set(plan_budget(problem, max_drop=0.005, measure=measure, max_rounds=20).specs.values()) == {"none"}


def test_front_says_why_a_budget_has_no_point():
    from coreml_opt.planning.pareto import front

    unreachable: dict[float, str] = {}
    points = front(_problem(), [1, 4], unreachable=unreachable)
    assert {p.label for p in points if p.kind == "solved"} == {"4"}
    assert list(unreachable) == [1] and "smallest size reachable" in unreachable[1]
