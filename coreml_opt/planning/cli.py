"""`coreml-opt plan DIR`: the planner's subcommand (parser and handler), kept beside the library it wraps."""
from __future__ import annotations

import argparse
import json

DESCRIPTION = """\
Solve the optimal mixed-precision plan from a sensitivity output folder (python -m coreml_opt.sensitivity).

examples:
  coreml-opt plan out/sens --bpw 4 -o plan.yaml
  coreml-opt plan out/sens --size 12MiB --emit model-plan.mlpackage
  coreml-opt plan out/sens --max-drop 0.5 -o plan.yaml        # at most 0.5 percentage points of accuracy lost
  coreml-opt plan out/sens --front front.png --bits 2,3,4,5,6,8
  coreml-opt plan out/sens --bpw 4 --emit m.mlpackage --report-data coreml_opt.sensitivity.examples:photos_report_half

Sizes count every weight Core ML stores (layers outside the sweep stay fp16), so --bpw 4 is the
whole model's bits per weight. Sizes are bytes; KB/KiB = 1024 bytes and MB/MiB = 2^20, as the tables
print them. Drops (--max-drop and every printed drop) are percentage points (pp) for accuracy-like metrics
(accuracy, top1, top5: 0.5 pp = 0.005 in metric units, shown as %%) and metric units otherwise (kl nats,
psnr dB); --json keeps every figure in metric units. Plans are
measured with every layer compressed together (simulated, equal to Core ML's weights) and repaired
until they meet --max-drop. Under a size budget, single-layer drops do not add: --context-rounds re-measure
each layer's neighbouring options with the other layers compressed per the measured plan and re-solve, and
the best measured plan is kept (predicted alone, predicted in context and measured drops are printed).
"""


def _bits(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bits {text!r}: not comma-separated numbers; use e.g. 2,3,4,6,8")


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """Register `plan` on the `coreml-opt` subparsers; returns the new parser."""
    p = subparsers.add_parser("plan", help="optimal per-layer plan under a size or accuracy budget",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", metavar="DIR", help="sensitivity output folder (sweep.json + trials.json)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--bpw", type=float, help="average bits per weight over all weights, e.g. 4")
    size.add_argument("--size", help="total weight bytes, e.g. 12MiB (= 12MB, 2^20), 60KiB (= 60KB, 1024), 52000")
    size.add_argument("--ratio", type=float, help="compression ratio against fp16, e.g. 4")
    p.add_argument("--max-drop", type=float, help="metric drop budget: percentage points for accuracy-like metrics "
                                               "(0.5 = 0.5 pp), metric units otherwise (kl, psnr)")
    p.add_argument("-o", "--output", help="write the plan YAML here")
    p.add_argument("--emit", metavar="MLPACKAGE", help="write the swept model compressed by the plan")
    p.add_argument("--model-package", help="uncompressed .mlpackage to compress for --emit (default: convert the "
                                           "sweep's model)")
    p.add_argument("--measure", action="store_true", help="with --emit: run the emitted package with the package "
                                                         "runtime on the sweep's data and print its metric next to "
                                                         "the simulated one")
    p.add_argument("--report-data", metavar="DATA",
                   help="with --emit: also measure the plan on data it was not planned on (calibration folder, .npz "
                        "or package.module:fn, e.g. the report half) and print plan-data and report-data figures "
                        "side by side (implies --measure)")
    p.add_argument("--no-validate", action="store_true", help="do not measure the plan (prediction only)")
    p.add_argument("--rounds", type=int, default=10, help="most repair rounds for --max-drop (default 10)")
    p.add_argument("--context-rounds", type=int, default=3, metavar="N",
                   help="size budgets: rounds that re-measure each layer's neighbouring options with every other "
                        "layer compressed per the plan and re-solve (default 3; 0 = single-layer drops only)")
    p.add_argument("--max-evaluations", type=int, metavar="N",
                   help="bound the context rounds' extra evaluations (default: 2 per layer and 1 per round)")
    p.add_argument("--front", metavar="PNG", help="also plot solved/greedy/uniform plans over --bits")
    p.add_argument("--bits", type=_bits, default=[2, 3, 4, 5, 6, 8], help="bits per weight for --front")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=cmd_plan)
    return p


def cmd_plan(args: argparse.Namespace) -> int:
    """Solve, validate, save and emit; prints the per-layer plan and predicted vs measured figures."""
    from ..errors import PlanError
    from ..report.tables import format_table
    from .session import PlanningSession, user_drop

    has_size = any(v is not None for v in (args.bpw, args.size, args.ratio))
    if not has_size and args.max_drop is None and not args.front:
        raise PlanError("coreml-opt plan", "no budget given", "pass --bpw 4, --size 12MiB, --ratio 4 or --max-drop 0.5")
    if args.max_drop is not None and not args.max_drop >= 0:
        raise PlanError(f"--max-drop {args.max_drop:g}", "is not a drop of 0 or more",
                        "give e.g. --max-drop 0.5 (percentage points for accuracy-like metrics)")
    if args.report_data is not None:
        if not args.emit or args.no_validate:
            raise PlanError(f"--report-data {args.report_data}", "needs --emit and the plan's own measurement"
                            if not args.emit else "compares with the plan-data figures, which --no-validate turns off",
                            "pass --emit OUT.mlpackage without --no-validate" if not args.emit else "drop --no-validate")
        args.measure = True
    for flag, value in (("--context-rounds", args.context_rounds), ("--max-evaluations", args.max_evaluations)):
        if value is not None and value < 0:
            raise PlanError(f"{flag} {value}", "is negative", f"give {flag} 0 or more (0 turns context rounds off)")
    if args.measure and (not args.emit or args.no_validate):
        raise PlanError("--measure", "needs --emit and the plan's own measurement" if not args.emit else
                        "compares the package with the simulated figure, which --no-validate turns off",
                        "pass --emit OUT.mlpackage without --no-validate" if not args.emit else "drop --no-validate")
    session = PlanningSession.open(args.sweep, measure=not args.no_validate)
    problem = session.problem
    if args.measure and not session.can_measure:
        raise PlanError(f"--measure ({args.sweep})", "the sweep names no model or data to measure with",
                        "rerun the sweep with --model package.module:fn and --data")
    report_evaluator = None
    if args.report_data is not None:  # bad report data fails here, before anything is solved or written
        report_evaluator = _report_evaluator(session, args.report_data)
    out: dict = {}
    if has_size or args.max_drop is not None:
        max_drop = user_drop(args.max_drop, problem) if args.max_drop is not None else None
        result = session.plan(size=args.size, bpw=args.bpw, ratio=args.ratio, max_drop=max_drop,
                              validate=not args.no_validate, max_rounds=args.rounds,
                              context_rounds=args.context_rounds, max_evaluations=args.max_evaluations)
        if args.output:
            result.plan.save(args.output)
        report = session.emit(result, args.emit, model_package=args.model_package) if args.emit else None
        measured = session.measure_package(args.emit, result) if args.measure else None
        on_report = session.measure_package(args.emit, result, report_evaluator) if report_evaluator else None
        out = {"budget": result.budget, "bytes": result.bytes, "bits_per_weight": round(result.bits_per_weight, 4),
               "predicted_drop": result.predicted_drop, "measured_metric": result.measured_metric,
               "measured_drop": result.measured_drop, "baseline": problem.baseline,
               "layers": problem.expand(result.specs),  # per weight, as the plan YAML (a group's spec on its members)
               **({"groups": result.specs} if problem.groups else {}),
               "predicted_context_drop": result.predicted_context_drop, "plan_source": result.source,
               "context_evaluations": result.context_evaluations,
               "attempts": [{"bytes": a.bytes, "predicted_drop": a.predicted_drop,
                             "predicted_context_drop": a.predicted_context_drop, "measured_drop": a.measured_drop,
                             "source": a.source} for a in result.attempts],
               "repair_rounds": len(result.attempts) - 1, "plan": args.output,
               "emitted": str(args.emit) if args.emit else None,
               "emitted_bytes": report.bytes_after if report else None,
               "measured_on_package": measured.to_dict() if measured else None,
               "measured_on_report_data": on_report.to_dict() if on_report else None}
        if not args.json:
            drops = {c.layer: {o.spec: o for o in c.options} for c in problem.choices}
            rows = [[info.layer, info.shape, result.specs[info.layer], drops[info.layer][result.specs[info.layer]].bytes,
                     info.fp16_bytes, problem.drop_text(drops[info.layer][result.specs[info.layer]].drop)]
                    for info in problem.layers]
            rows += [[path, "", "none (not swept)", size, size, problem.drop_text(0.0)]
                     for path, size in problem.fixed.items()]
            print(format_table(["layer", "shape", "spec", "bytes", "fp16 bytes", "drop alone"], rows))
            print(result.summary())
            if args.output:
                print(f"wrote {args.output}")
            if report is not None:
                print(f"wrote {args.emit}: {report.bytes_after:,} weight bytes (plan predicted {result.bytes:,})")
            if on_report is not None:
                print(_halves_table(problem, result, measured, on_report, args.report_data))
            elif measured is not None:
                print(measured.line())
    if args.front:
        unreachable: dict[float, str] = {}
        points = session.front(args.bits, plot=args.front, validate=not args.no_validate, unreachable=unreachable)
        out["front"] = [{"kind": p.kind, "label": p.label, "bytes": p.bytes, "bits_per_weight": p.bits_per_weight,
                         "predicted_drop": p.predicted_drop, "measured_metric": p.measured_metric} for p in points]
        out["front_unreachable"] = {f"{bpw:g}": why for bpw, why in unreachable.items()}
        if not args.json:
            print(format_table(["kind", "budget/spec", "bytes", "bits/w", "pred drop", f"measured {problem.metric}"],
                               [[p.kind, p.label, p.bytes, f"{p.bits_per_weight:.3f}", problem.drop_text(p.predicted_drop),
                                 problem.metric_text(p.measured_metric)] for p in points]))
            for bpw, why in unreachable.items():
                print(f"no solved/greedy point at {bpw:g} bits per weight: the budget {why}")
            print(f"wrote {args.front}")
    if args.json:
        print(json.dumps(out, indent=2))
    return 0


def _report_evaluator(session, data: str):
    """The sweep's metric and reference on ``data`` (DataError names ``--report-data DATA`` when it cannot be read)."""
    from ..errors import DataError, PlanError

    if session.evaluator_for is None or not session.can_measure:
        raise PlanError(f"--report-data {data}", "the sweep names no model to measure with",
                        "rerun the sweep with --model package.module:fn and --data")
    try:
        return session.evaluator_for(data)
    except DataError as exc:
        inner = "" if exc.input_name in (data, repr(data)) else f"{exc.input_name}: "
        raise DataError(f"--report-data {data}", f"{inner}{exc.problem}", exc.fix) from None


def _halves_table(problem, result, on_plan, on_report, data: str) -> str:
    """Plan-data and report-data figures side by side: baseline, plan predicted, simulated, package, drop."""
    from ..report.tables import format_table

    source = problem.sweep.get("data") or "the sweep's data"
    sign = 1.0 if problem.higher_is_better else -1.0  # a drop is how much worse: lower accuracy, higher KL
    rows = [["fp16 baseline", problem.metric_text(on_plan.reference), problem.metric_text(on_report.reference)],
            ["plan, predicted (additive)", problem.metric_text(problem.baseline - sign * result.predicted_drop), ""],
            ["plan, simulated", problem.metric_text(on_plan.simulated), problem.metric_text(on_report.simulated)],
            ["plan, package (runtime)", problem.metric_text(on_plan.measured), problem.metric_text(on_report.measured)],
            ["drop on the package", problem.drop_text(on_plan.drop), problem.drop_text(on_report.drop)]]
    return (format_table([problem.metric, "plan data", "report data"], rows)
            + f"\nplan data: {source} (planned on); report data: {data} (never planned on)")
