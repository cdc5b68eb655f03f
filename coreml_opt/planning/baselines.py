"""The mixed-precision baselines a plan must beat at a bits-per-weight budget, over per-tensor LUT candidates.

- uniform: the same per-tensor palettization for every swept layer, the widest palette of at most ``bpw`` bits
  (``pal4`` at 4.0; ``pal4`` at 5.0, since Core ML's LUTs have 1, 2, 3, 4, 6 or 8 bits); LUT bytes and the
  fp16 weights outside the sweep may put it over the budget, so its exact size is reported, never forced;
- greedy: least single-layer drop first (the most sensitive layers keep the most bits), the order
  coreai-opt's and ml-stable-diffusion's mixed-bit recipes use (``pareto.greedy``), until the plan fits;
- exact-additive: the exact multiple-choice knapsack on the additive single-layer drops (``solve_budget``).
Sizes are the product's byte model (every byte Core ML stores, LUTs included), so they equal the emitted package.
"""
from __future__ import annotations

from ..errors import PlanError
from ..spec import PALETTE_NBITS
from .costs import Problem
from .pareto import greedy
from .planner import solve_budget

# The per-tensor LUT ladder the baselines choose from (a sweep with these candidates). 1-bit LUTs are left out:
# the budgets here are 3 bits per weight and up, and they would add a sixth to the sweep.
LUT_LADDER: tuple[str, ...] = tuple(f"pal{n}" for n in PALETTE_NBITS if n > 1)
BASELINES: tuple[str, ...] = ("uniform", "greedy", "exact-additive")


def uniform_lut(problem: Problem, bpw: float) -> tuple[str, dict[str, str]]:
    """(spec, plan): the widest per-tensor LUT of at most ``bpw`` bits that every swept layer has a trial for."""
    available = set.intersection(*({o.spec for o in c.options} for c in problem.choices))
    widths = [n for n in PALETTE_NBITS if n <= bpw and f"pal{n}" in available]
    if not widths:
        raise PlanError(f"uniform plan at {bpw:g} bits per weight", "the sweep has no per-tensor LUT that narrow "
                        "for every layer", f"sweep with candidates {','.join(LUT_LADDER)}")
    spec = f"pal{max(widths)}"
    return spec, {c.layer: spec for c in problem.choices}


def baseline_plans(problem: Problem, bpw: float) -> dict[str, dict[str, str]]:
    """{baseline name: {layer: spec}} at ``bpw`` bits per weight (all weights) for a sweep whose candidates are
    per-tensor LUTs (``LUT_LADDER``); greedy and exact-additive fit the budget, uniform is reported as it is."""
    max_bytes = problem.budget_bytes(bpw=bpw)
    return {"uniform": uniform_lut(problem, bpw)[1],
            "greedy": greedy(problem, max_bytes),
            "exact-additive": solve_budget(problem, max_bytes=max_bytes).specs(problem.choices)}
