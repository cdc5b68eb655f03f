"""Before/after results and the Pareto plot of a run: the plan placed on the sweep's size/accuracy plane."""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping

from ..planning.pareto import front_png
from ..spec import readers
from .summary import fmt_metric

logger = logging.getLogger(__name__)


def _session(report, measure: bool):
    """A planning session on the sweep; without its model (sizes only) when the model cannot be rebuilt."""
    from ..planning import PlanningSession, build_problem

    try:
        return PlanningSession.open(report.folder.sweep_dir, measure=measure)
    except Exception as exc:  # the swept model may not import here; a report still shows what it can
        logger.warning("cannot rebuild the swept model: %s", exc)
        report.notes.append(f"could not rebuild the swept model ({exc}): plans are not measured, weights outside "
                            "the sweep are not counted")
        return PlanningSession(build_problem(report.sweep, report.trials, {}, 0))


def plan_specs(report, problem) -> dict[str, str]:
    """The plan's spec for each swept layer, in the planner's layer names (plan lookup order)."""
    from ..model.convert import const_name

    plan = report.plan

    def lookup(layer: str, coreml_name: str | None, op_type: str) -> str:
        module = layer.rpartition(".")[0]
        spec = report.specs.get(coreml_name or "") or next(
            (str(plan.layers[k]) for k in (layer, module, coreml_name) if k and k in plan.layers), None)
        if spec is None:
            by_type = next((plan.op_types[t] for t, _ in readers(op_type) if t in plan.op_types), None)
            spec = str(by_type or plan.global_spec or "none")
        return spec

    out = {}
    for info in problem.layers:
        if info.layer not in problem.groups:
            out[info.layer] = lookup(info.layer, info.coreml_name, info.op_type)
            continue
        # a grouped sweep: the group's spec is what its members take (members that cannot take it stay fp16)
        taken = [s for s in (lookup(m, const_name(m), info.op_type) for m in problem.groups[info.layer]) if s != "none"]
        out[info.layer] = max(dict.fromkeys(taken), key=taken.count) if taken else "none"
        if len(set(taken)) > 1:
            logger.warning("plan gives group %s's members several specs %s; costed as %s", info.layer,
                           sorted(set(taken)), out[info.layer])
    return out


def plan_cost(problem, specs: Mapping[str, str]) -> tuple[int, float]:
    """(bytes of all weights, predicted drop) of ``specs``; specs the sweep did not try cost by the byte model."""
    from ..storage import predicted_bytes
    from ..targets import DEFAULT_TARGET, target_rank

    options = {c.layer: {o.spec: o for o in c.options} for c in problem.choices}
    info = {i.layer: i for i in problem.layers}
    total, drop = problem.fixed_bytes, 0.0
    for layer, spec in specs.items():
        option = options.get(layer, {}).get(spec)
        if option is not None:
            total, drop = total + option.bytes, drop + option.drop
        else:
            total += predicted_bytes(spec, info[layer].shape, info[layer].op_type, precision=info[layer].precision,
                                     ios18_ops=target_rank(problem.target or DEFAULT_TARGET) >= 18)
            drop = math.nan if spec != "none" else drop
    return total, drop


def _front_points(report, session, measure: bool, bits) -> tuple[list, str]:
    from ..planning import Point

    saved = (report.plan_result or {}).get("front")
    if saved:
        fields = set(Point.__dataclass_fields__)
        return [Point(**{k: v for k, v in p.items() if k in fields}) for p in saved], \
            f"front points from {report.folder.relative(report.folder.plan_jsons[0])}"
    points = session.front(bits, validate=measure)
    how = "measured with every layer compressed together" if measure and session.can_measure else "predicted"
    return points, f"solved, greedy and uniform plans from the sweep, {how}"


def fill_results(report, *, measure: bool = True, bits=(2, 3, 4, 5, 6, 8)) -> None:
    """Fill ``report.results`` (before/after rows) and ``report.front_png`` from what the folder holds."""
    from .collect import ResultRow

    sweep, rows = report.sweep, []
    session = _session(report, measure) if sweep else None
    problem = session.problem if session else None
    original, primary = report.original, report.primary
    base = next((run.baseline for run in report.workflows if run.baseline), {})
    fp32 = sweep.get("fp32_metric") if sweep else base.get("fp32")
    fp16 = sweep.get("baseline") if sweep else base.get("fp16")
    where = "sensitivity sweep" if sweep else f"workflow {report.folder.relative(report.workflows[0].path)}" \
        if base else ""
    if fp32 is not None:
        rows.append(ResultRow("fp32 weights (PyTorch)", fp32, None, None, where))
    if original is not None or problem is not None:
        size = original.inventory.total_bytes if original else problem.fp16_bytes
        bpw = original.inventory.bits_per_weight if original else problem.bits_per_weight(problem.fp16_bytes)
        sizes = f"sizes from {original.label}" if original else "sizes from the sweep's byte model"
        rows.append(ResultRow("original (fp16)", fp16, size, bpw, f"{where}; {sizes}" if where else sizes))
    mark: dict[str, Any] | None = None
    listed = set()
    stage_of = {s.package: s for s in report.stages if s.package}
    if report.plan is not None and problem is not None and problem.layers:
        specs = plan_specs(report, problem)
        size, drop = plan_cost(problem, specs)
        stage = stage_of.get(primary.path.name) if primary is not None else None
        metric, source = (report.plan_result or {}).get("measured_metric"), "plan --json output"
        if stage is not None and stage.metric is not None:
            metric, source = stage.metric, f"stage {stage.name}"
        elif metric is None and measure and session.can_measure:
            metric, source = session.measure(specs), "measured now in PyTorch (simulated = Core ML weights)"
        elif metric is None:
            metric, source = (problem.baseline - drop if problem.higher_is_better else problem.baseline + drop), \
                "predicted from single-layer drops"
        if stage is not None:
            pass  # the stage's own row below says it
        elif primary is not None:
            listed.add(primary.label)
            on_package = ((report.plan_result or {}).get("measured_on_package") or {}).get("measured")
            rows.append(ResultRow(f"plan -> {primary.label}", metric, primary.inventory.total_bytes,
                                  primary.inventory.bits_per_weight, source + _on_package(report, on_package),
                                  primary.label))
        else:
            rows.append(ResultRow(f"plan {report.folder.relative(report.plan_path)}", metric, size,
                                  problem.bits_per_weight(size), source + "; size predicted"))
        mark = {"bits_per_weight": problem.bits_per_weight(size), "metric": metric,
                "label": f"chosen plan ({report.plan_path.name}, {source})"}
    for stage in report.stages:
        listed.add(stage.package_label or "")
        rows.append(ResultRow(f"stage {stage.name}", stage.metric, stage.bytes, stage.bits_per_weight,
                              stage.source + _on_package(report, stage.runtime_metric), stage.package_label))
    for package in report.compressed:
        if package.label not in listed:
            rows.append(ResultRow(package.label, None, package.inventory.total_bytes,
                                  package.inventory.bits_per_weight, "package only: not measured", package.label))
    report.results, report.plan_point = rows, mark
    _fill_front(report, session, problem, mark, measure, bits)


def _on_package(report, value: float | None) -> str:
    """The source-column note for a figure also measured on the package itself by the package runtime."""
    return "" if value is None else f"; {fmt_metric(report, value)} measured on the package (runtime)"


def _fill_front(report, session, problem, mark, measure: bool, bits) -> None:
    found = report.folder
    if problem is not None and problem.choices:
        points, how = _front_points(report, session, measure, bits)
        if points:
            report.front_png = front_png(problem, points, mark)
            report.front_note = how + ("; the star is the chosen plan" if mark else "; no plan found to mark")
            if found.front_pngs:
                report.front_note += (f" (re-plotted to mark the plan; {found.relative(found.front_pngs[0])} has the "
                                      "same points unmarked)")
            return
    if found.front_pngs:
        report.front_png = found.front_pngs[0].read_bytes()
        report.front_note = (f"{found.relative(found.front_pngs[0])} as written by `coreml-opt plan --front`; "
                             "the chosen plan is not marked (no sweep to re-plot from)")
    else:
        report.front_note = "no Pareto plot: it needs a sensitivity sweep (or a front PNG) in the folder"
