"""Planner benchmark on the example digits CNN: solved plan vs uniform compression vs greedy, measured.

Runs (or reuses) a sensitivity sweep of the example model on the plan half of its held-out split (even
samples), then at 3, 4 and 5 bits per weight (all weights, as Core ML stores them) prints the accuracy (labels),
with every layer compressed together by the simulation engine, on the plan half and on the report half
(odd samples, never swept or planned on), of plans made from the sweep's metric (default KL to the fp32
model: accuracy saturates on the plan half, most single-layer drops are 0, and plans tie):
  solved   the planner's plan (exact knapsack, validated),
  uniform  one spec for every swept layer: the smallest uniform plan at least as large as the solved one,
  greedy   least-harmful (layer, spec) pairs applied in order until the budget is met.
All three choose from the same candidates: by default the product's default for a sweep with data (each layer
kind's calibrated ladder, ``+gptq+bc`` rungs), or ``--candidates`` (e.g. the plain LUT set ``CANDIDATES``).
The last line is a JSON object of the measured accuracies ({bpw: {plan: {half: accuracy}}}). It asserts nothing.

usage: python bench/planner.py [--out out/bench-planner] [--plot front.png] [--candidates ladder|SPECS]
"""
from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # coremltools' per-pass progress bars would bury the table

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

CANDIDATES = ["int8", "pal6", "pal4", "pal3", "pal2", "pal1", "int4/block32", "pal4/g16", "pal3/g16", "pal2/g16"]
BITS = (3, 4, 5)
MODEL = "coreml_opt.zoo:digits_cnn"
PLAN_HALF = "coreml_opt.sensitivity.examples:digits_plan_half"
REPORT_HALF = "coreml_opt.sensitivity.examples:digits_report_half"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/bench-planner", help="folder for the sweep and the plot")
    parser.add_argument("--metric", default="kl",
                        help="the sweep's (and planner's) metric, default kl: accuracy saturates on the plan half "
                             "(most single-layer drops 0), so the plans it ranks tie; accuracy is what is reported")
    parser.add_argument("--plot", help="Pareto plot PNG (default OUT/front.png)")
    parser.add_argument("--candidates", default="ladder",
                        help="specs every plan chooses from: 'ladder' (default), the product's calibrated per-kind "
                             f"default a sweep with data gets; or comma-separated specs, e.g. {','.join(CANDIDATES)}")
    args = parser.parse_args(argv)
    candidates = args.candidates if args.candidates == "ladder" else args.candidates.split(",")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    from coreml_opt.evaluation import make_evaluator
    from coreml_opt.planning import PlanningSession, greedy, plan_bytes, uniform_at_least
    from coreml_opt.report.tables import format_table
    from coreml_opt.sensitivity import analyse

    out = Path(args.out)
    sweep_dir = out / "sweep"
    swept = analyse(MODEL, (1, 1, 8, 8), PLAN_HALF, args.metric, candidates=candidates, out_dir=sweep_dir,
                    progress=False)  # resumes from its store when present
    session = PlanningSession.open(sweep_dir)
    problem = session.problem
    evaluators = {f"{half}{suffix}": make_evaluator(MODEL, data, metric)
                  for half, data in (("plan", PLAN_HALF), ("report", REPORT_HALF))
                  for suffix, metric in (("", "accuracy"), ("_kl", "kl"))}

    def both(specs: dict[str, str]) -> dict[str, float]:
        """Accuracy (``plan``, ``report``) and KL to the fp32 model (``plan_kl``, ``report_kl``) on both halves."""
        return {key: session.measure_with(specs, evaluator) for key, evaluator in evaluators.items()}

    print(f"digits CNN: {len(problem.layers)} swept layers + {len(problem.fixed)} fixed fp16 weights, "
          f"{problem.total_params:,} weights, fp16 {problem.fp16_bytes:,} bytes; baseline accuracy "
          f"{both({})['plan']:.4f} on the plan half, {both({})['report']:.4f} on the report half; planned on "
          f"{problem.metric} (baseline {problem.baseline:.4g}); candidates {', '.join(swept.candidates)}")
    rows, results = [], {}
    for bits in BITS:
        max_bytes = problem.budget_bytes(bpw=bits)
        solved = session.plan(bpw=bits)
        uniform = uniform_at_least(problem, solved.bytes)
        greedy_specs = greedy(problem, max_bytes)
        entry = {"solved": both(solved.specs)}
        rows.append([f"{bits}", "solved", solved.bytes, solved.bits_per_weight, solved.predicted_drop,
                     *_figures(entry["solved"]), _specs(problem, solved.specs)])
        if uniform is not None:
            name, specs = uniform
            size = plan_bytes(problem, specs)
            entry["uniform"] = both(specs)
            rows.append(["", f"uniform {name}", size, problem.bits_per_weight(size), _pred(problem, specs),
                         *_figures(entry["uniform"]), name])
        else:
            entry["uniform"] = None
            rows.append(["", "uniform", None, None, None, None, None, None, None, "no uniform plan is as large"])
        size = plan_bytes(problem, greedy_specs)
        entry["greedy"] = both(greedy_specs)
        rows.append(["", "greedy", size, problem.bits_per_weight(size), _pred(problem, greedy_specs),
                     *_figures(entry["greedy"]), _specs(problem, greedy_specs)])
        results[str(bits)] = entry
    print(format_table(["bpw", "plan", "bytes", "bits/w", f"pred {problem.metric} drop", "plan acc", "plan KL",
                        "report acc", "report KL", "specs (swept layers)"], rows))
    plot = Path(args.plot) if args.plot else out / "front.png"
    session.front((2, 2.5, 3, 3.5, 4, 5, 6, 8), plot=plot)
    for half in ("plan", "report"):
        never_worse = all(r["solved"][half] >= max(v[half] for v in (r["uniform"], r["greedy"]) if v is not None)
                          - 1e-12 for r in results.values())
        better = any(r["solved"][half] > min(v[half] for v in (r["uniform"], r["greedy"]) if v is not None) + 1e-12
                     for r in results.values())
        print(f"{half} half, accuracy: solved never worse than uniform and greedy: {never_worse}; better somewhere: "
              f"{better}")
    print(f"plot (plan half): {plot}")
    print(json.dumps(results))
    return 0


def _figures(entry: dict[str, float]) -> list[str]:
    return [f"{entry['plan']:.4f}", f"{entry['plan_kl']:.3g}", f"{entry['report']:.4f}", f"{entry['report_kl']:.3g}"]


def _specs(problem, specs: dict[str, str]) -> str:
    return " ".join(specs[info.layer] for info in problem.layers)


def _pred(problem, specs: dict[str, str]) -> float:
    from coreml_opt.planning.planner import predicted_drop

    return predicted_drop(problem, specs)


if __name__ == "__main__":
    sys.exit(main())
