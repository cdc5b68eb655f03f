"""Mixed-precision planning: exact per-layer plans under a size or accuracy budget, validated and emitted.

``PlanningSession.open(DIR).plan(bpw=4)`` solves a multiple-choice knapsack over a sensitivity sweep
(bytes from the byte model, losses from the trials), measures the plan with all layers compressed
together, repairs it against an accuracy budget, and ``emit`` writes the compressed ``.mlpackage``.
"""
from __future__ import annotations

from .costs import Problem, build_problem, drop_unit, fixed_weights, parse_size
from .pareto import Point, front, greedy, plot_front, uniform_at_least, uniform_specs
from .planner import Attempt, PlanResult, make_plan, plan_budget, plan_bytes, solve_budget
from .session import PlanningSession, plan_from_sweep, user_drop
from .solver import Choices, Option, Solution, brute_force, solve

__all__ = ["Problem", "build_problem", "drop_unit", "fixed_weights", "parse_size", "Point", "front", "greedy",
           "plot_front", "uniform_at_least", "uniform_specs", "Attempt", "PlanResult", "make_plan", "plan_budget",
           "plan_bytes", "solve_budget", "PlanningSession", "plan_from_sweep", "user_drop", "Choices", "Option",
           "Solution", "brute_force", "solve"]
