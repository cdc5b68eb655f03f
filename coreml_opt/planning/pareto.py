"""Baselines and the Pareto front: uniform compression, the greedy planner, solved plans over a budget sweep.

Greedy is the obvious heuristic the exact solver must beat: apply the least harmful (layer, spec)
pairs in order until the budget is met. Uniform applies one spec to every swept layer.
"""
from __future__ import annotations

import io

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import PlanError
from .costs import Problem
from .planner import Measure, plan_budget, plan_bytes, predicted_drop

logger = logging.getLogger(__name__)


@dataclass
class Point:
    """One plan on the size/metric plane."""

    kind: str  # "solved" | "greedy" | "uniform"
    label: str
    bytes: int
    bits_per_weight: float
    predicted_drop: float
    measured_metric: float | None = None
    specs: dict[str, str] = field(default_factory=dict)


def greedy(problem: Problem, max_bytes: int) -> dict[str, str]:
    """Least predicted drop first (milder spec first among equal drops): switch a layer to a pair whenever it
    makes the layer smaller, until the plan fits."""
    current = {c.layer: c.options[0] for c in problem.choices}  # options[0] is fp16
    total = sum(o.bytes for o in current.values()) + problem.fixed_bytes
    # Equal drops: the larger (milder) spec is the less harmful, so it goes first.
    pairs = sorted(((o.drop, -o.bytes, ci, oi) for ci, c in enumerate(problem.choices)
                    for oi, o in enumerate(c.options) if o.spec != "none"))
    for _, neg_size, ci, oi in pairs:
        size = -neg_size
        if total <= max_bytes:
            break
        layer = problem.choices[ci].layer
        if size < current[layer].bytes:
            total += size - current[layer].bytes
            current[layer] = problem.choices[ci].options[oi]
    if total > max_bytes:
        raise PlanError(f"size budget {max_bytes:,} bytes", "greedy cannot reach it",
                        f"the smallest size greedy reaches is {problem.describe_bytes(total)}")
    return {layer: o.spec for layer, o in current.items()}


def uniform_specs(problem: Problem) -> dict[str, dict[str, str]]:
    """Each candidate spec that every swept layer has a trial for, applied to all of them."""
    available = [{o.spec for o in c.options} for c in problem.choices]
    specs = [s for s in dict.fromkeys(problem.candidates or [o.spec for c in problem.choices for o in c.options])
             if s != "none" and all(s in a for a in available)]
    return {s: {c.layer: s for c in problem.choices} for s in specs}


def uniform_at_least(problem: Problem, size: int) -> tuple[str, dict[str, str]] | None:
    """The smallest uniform plan whose size is at least ``size`` (None when every uniform plan is smaller)."""
    sized = sorted((plan_bytes(problem, specs), name, specs) for name, specs in uniform_specs(problem).items())
    return next(((name, specs) for b, name, specs in sized if b >= size), None)


def point(problem: Problem, kind: str, label: str, specs: Mapping[str, str], measure: Measure | None) -> Point:
    """Size, predicted drop and (with ``measure``) measured metric of one plan."""
    size = plan_bytes(problem, specs)
    return Point(kind, label, size, problem.bits_per_weight(size), predicted_drop(problem, specs),
                 measure(specs) if measure is not None else None, dict(specs))


def front(problem: Problem, bits: Sequence[float], measure: Measure | None = None,
          unreachable: dict[float, str] | None = None) -> list[Point]:
    """Solved and greedy plans at each bits-per-weight budget, plus every uniform plan (measured with ``measure``).
    A budget no plan meets (below the smallest candidates) has no point; ``unreachable`` gets {bpw: why}."""
    points: list[Point] = []
    for bpw in bits:
        max_bytes = problem.budget_bytes(bpw=bpw)
        try:  # the planner's own output: validated and repaired when it can measure
            solved = plan_budget(problem, max_bytes=max_bytes, measure=measure, label=f"{bpw:g} bpw")
        except PlanError as exc:
            logger.info("skipping %g bits per weight: %s", bpw, exc)
            if unreachable is not None:
                unreachable[bpw] = f"{exc.problem} ({exc.fix})"
            continue
        points.append(point(problem, "solved", f"{bpw:g}", solved.specs, measure))
        points.append(point(problem, "greedy", f"{bpw:g}", greedy(problem, max_bytes), measure))
    for name, specs in uniform_specs(problem).items():
        points.append(point(problem, "uniform", name, specs, measure))
    return points


def front_png(problem: Problem, points: Sequence[Point], mark: Mapping[str, Any] | None = None) -> bytes:
    """:func:`front_figure` as PNG bytes."""
    import matplotlib.pyplot as plt

    fig = front_figure(problem, points, mark)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def front_figure(problem: Problem, points: Sequence[Point], mark: Mapping[str, Any] | None = None):
    """Metric (measured, else predicted; fraction metrics in %) against bits per weight for solved/greedy/uniform
    plans, titled and scaled from the metric; a star marks the chosen plan (``mark``: bits_per_weight, metric,
    label); uniform points beyond the plans' range sit on the edge as open arrows, their value in the label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def y(p) -> float:
        if p.measured_metric is not None:
            return p.measured_metric
        return problem.baseline - p.predicted_drop if problem.higher_is_better else problem.baseline + p.predicted_drop

    from .costs import drop_unit

    percent = drop_unit(problem.metric, problem.sweep.get("unit")) == 0.01  # fraction metrics plot in %
    k = 100.0 if percent else 1.0

    def yk(p) -> float:
        return k * y(p)

    measured = all(p.measured_metric is not None for p in points)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for kind, style in (("solved", dict(marker="o", color="C0", lw=2)),
                        ("greedy", dict(marker="s", color="C1", ls="--"))):
        pts = sorted((p for p in points if p.kind == kind), key=lambda p: p.bits_per_weight)
        if pts:
            ax.plot([p.bits_per_weight for p in pts], [yk(p) for p in pts], label=f"{kind} plan", **style)
    baseline = k * problem.baseline
    values = [yk(p) for p in points if p.kind != "uniform"] + [baseline]
    if mark and mark.get("metric") is not None:
        values.append(k * mark["metric"])
    values = [v for v in values if v == v]
    bottom = top = None
    if values:  # zoom on the plans; uniform points beyond sit on the worse edge, marked "off scale"
        low, high = min(values), max(values)
        span = max(high - low, 1e-3 * max(abs(high), 1.0))
        worse_room, better_room = 0.3 * span, 0.2 * span
        bottom = low - (worse_room if problem.higher_is_better else better_room)
        top = high + (better_room if problem.higher_is_better else worse_room)
        if low >= 0 > bottom:  # kl, accuracy, psnr of real models: no axis below zero
            bottom = 0.0
        ax.set_ylim(bottom, top)
    uniform = sorted((p for p in points if p.kind == "uniform"), key=lambda p: p.bits_per_weight)
    if uniform:
        shown = [min(max(yk(p), bottom), top) if bottom is not None else yk(p) for p in uniform]
        off = [v != yk(p) for p, v in zip(uniform, shown)]
        ax.scatter([p.bits_per_weight for p, o in zip(uniform, off) if not o],
                   [v for v, o in zip(shown, off) if not o], marker="^", color="C2", zorder=3, label="uniform")
        for j, (p, v) in enumerate((p, v) for p, v, o in zip(uniform, shown, off) if o):  # arrow: beyond the edge
            ax.scatter([p.bits_per_weight], [v], marker="v" if v == bottom else "^", color="C2", facecolor="white",
                       zorder=3, label="uniform, off scale (value in label)" if j == 0 else None)
        for i, (p, v, o) in enumerate(zip(uniform, shown, off)):
            text = p.label if not o else f"{p.label} ({problem.metric_text(y(p))}, off scale)"
            # alternate above/below so neighbouring labels do not overprint
            ax.annotate(text, (p.bits_per_weight, v), textcoords="offset points", xytext=(4, 6 if i % 2 == 0 else -12),
                        fontsize=7, color="C2", annotation_clip=False)
    if baseline == baseline:
        ax.axhline(baseline, color="gray", ls=":", lw=1, label="fp16 baseline")
    if mark and mark.get("metric") is not None:
        ax.scatter([mark["bits_per_weight"]], [k * mark["metric"]], marker="*", s=260, color="#d62728",
                   edgecolor="black", zorder=5, label=mark.get("label", "chosen plan"))
    direction = "higher is better" if problem.higher_is_better else "lower is better"
    ax.set_xlabel("bits per weight (all weights, as stored by Core ML)")
    ax.set_ylabel(f"{problem.metric}{' (%)' if percent else ''}, {'measured' if measured else 'predicted'}")
    ax.set_title(f"size vs {problem.metric} ({direction}): solved plans, greedy baseline, uniform compression",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8, framealpha=0.6)
    fig.tight_layout()
    return fig


def plot_front(problem: Problem, points: Sequence[Point], path: str | Path,
               mark: Mapping[str, Any] | None = None) -> Path:
    """Write :func:`front_png` to ``path`` atomically."""
    from ..model.package import atomic_output

    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_bytes(front_png(problem, points, mark))
    return path


def points_json(points: Sequence[Point]) -> list[dict]:
    """Points as plain dicts (for a JSON file next to the plot)."""
    return [asdict(p) for p in points]
