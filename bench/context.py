"""In-context planning on pretrained EfficientNet-Lite0: the additive plan vs the plan re-solved in context.

Sweeps EfficientNet-Lite0 (KL against fp32, on the plan half of ``photos.photo_halves(N)``; resumed from its
store when present), then at each budget prints KL and top-1 agreement against fp32, on the plan half (what
the planner saw) and on the report half (what it never saw), every layer compressed together by the
simulation engine, of: the additive plan (single-layer drops summed), the older charged repair
(``context_rounds=0``), and the plan after context rounds (with which measured plan won). The last line is one JSON object.
It asserts nothing; N defaults to 64 (32 images a half); use --photos 256 for the issue's 128-image halves.

usage: python bench/context.py [--photos 64] [--bits 4] [--out out/bench-context]
"""
from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

CANDIDATES = ["int8", "pal4", "pal3", "pal2"]
PHOTOS_ENV, REPORT_ENV = "COREML_OPT_BENCH_PHOTOS", "COREML_OPT_BENCH_REPORT_PHOTOS"


def plan_photos():
    """The plan half (a data factory the sweep records): the even crops of the first N."""
    from coreml_opt.photos import photo_halves

    return photo_halves(int(os.environ.get(PHOTOS_ENV, "64")))[0]


def report_photos():
    """The report half: the odd crops of the first M >= N (crop i is seeded by i alone), never seen by the sweep
    or the planner."""
    from coreml_opt.photos import photo_halves

    return photo_halves(int(os.environ.get(REPORT_ENV) or os.environ.get(PHOTOS_ENV, "64")))[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=64, help="photos in both halves together (default 64)")
    parser.add_argument("--report-photos", type=int, help="report on the odd crops of this many photos "
                                                             "(default --photos; more gives a larger unseen half)")
    parser.add_argument("--bits", default="4", help="comma-separated bits per weight (default 4)")
    parser.add_argument("--out", default="out/bench-context", help="folder for the sweep")
    parser.add_argument("--max-evaluations", type=int, help="bound the context rounds' extra evaluations "
                                                                "(default: the planner's own bound)")
    parser.add_argument("--kmeans", default="fast", choices=("exact", "fast"), help="k-means of the sweep and plans")
    args = parser.parse_args(argv)
    os.environ[PHOTOS_ENV] = str(args.photos)
    os.environ[REPORT_ENV] = str(max(args.report_photos or args.photos, args.photos))
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logging.getLogger("coreml_opt.planning").setLevel(logging.INFO)

    from coreml_opt.evaluation import make_evaluator
    from coreml_opt.planning import PlanningSession
    from coreml_opt.report.tables import format_table
    from coreml_opt.sensitivity import analyse
    from coreml_opt.simulate import apply_plan
    from coreml_opt.zoo import efficientnet_lite0

    here = str(Path(__file__).resolve())
    sweep_dir = Path(args.out) / f"sweep-{args.photos}"
    start = time.perf_counter()
    analyse("coreml_opt.zoo:efficientnet_lite0", (1, 3, 224, 224), f"{here}:plan_photos", "kl",
            candidates=CANDIDATES, out_dir=sweep_dir, progress=False, kmeans=args.kmeans)
    swept = time.perf_counter() - start
    session = PlanningSession.open(sweep_dir)
    problem = session.problem
    original = efficientnet_lite0()
    evaluators = {(half, metric): make_evaluator(original, data, metric)
                  for half, data in (("plan", plan_photos()), ("report", report_photos()))
                  for metric in ("kl", "top1")}

    def figures(specs: dict[str, str]) -> dict[str, float]:
        assignment = {path: "none" for path in problem.fixed}
        assignment.update(specs)
        with apply_plan(session.model, assignment, kmeans=session.kmeans):
            return {f"{half} {metric}": ev(session.model) for (half, metric), ev in evaluators.items()}

    print(f"EfficientNet-Lite0: {len(problem.layers)} swept layers, {problem.total_params:,} weights; "
          f"sweep {swept:.0f} s ({args.photos // 2} plan images, {int(os.environ[REPORT_ENV]) // 2} report images, "
          f"candidates {', '.join(CANDIDATES)})")
    rows, results = [], {}
    for bits in [float(b) for b in args.bits.split(",")]:
        t0 = time.perf_counter()
        repaired = session.plan(bpw=bits, context_rounds=0)  # the additive solve and the older charged repair
        t1 = time.perf_counter()
        in_context = session.plan(bpw=bits, max_evaluations=args.max_evaluations)
        t2 = time.perf_counter()
        additive = in_context.attempts[0]  # the additive solve, measured before any round
        for name, result, seconds in (("additive", additive, None), ("charged repair", repaired, t1 - t0),
                                      (f"in context ({in_context.source})", in_context, t2 - t1)):
            got = figures(result.specs)
            evaluations = getattr(result, "context_evaluations", 0)
            results[f"{bits:g} {name}"] = {**got, "bits_per_weight": problem.bits_per_weight(result.bytes),
                                          "evaluations": evaluations,
                                          "seconds": None if seconds is None else round(seconds, 1)}
            rows.append([f"{bits:g}", name, f"{problem.bits_per_weight(result.bytes):.3f}",
                         f"{result.predicted_drop:.4f}",
                         "" if result.predicted_context_drop is None else f"{result.predicted_context_drop:.4f}",
                         f"{got['plan kl']:.4f}", f"{got['plan top1']:.4f}", f"{got['report kl']:.4f}",
                         f"{got['report top1']:.4f}", evaluations, "" if seconds is None else f"{seconds:.0f}"])
    print(format_table(["bpw", "plan", "bits/w", "pred KL alone", "pred KL in ctx", "plan KL", "plan agree",
                        "report KL", "report agree", "extra evals", "s"], rows))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
