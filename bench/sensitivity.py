"""Benchmark: full sensitivity sweep of the digits CNN vs the straightforward coremltools loop.

The straightforward loop, per trial: coremltools compresses the .mlpackage with an op_name config
for that one layer, decompress_weights, copy the weights into torch, evaluate the full model. Both
run in this process on the same trials; the table shows wall times, the sweep's time split and
whether every metric agrees. Prints a table; the last line is JSON with at least ``speedup``.
Run: python bench/sensitivity.py [--kmeans exact|fast]
"""
from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # coremltools' per-pass progress bars would bury the table

import argparse
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path

import coremltools as ct
import torch

from coreml_opt import zoo
from coreml_opt.model.convert import convert, fold_batchnorm
from coreml_opt.report.tables import format_table
from coreml_opt.sensitivity import DEFAULT_LADDER, analyse, make_evaluator
from coreml_opt.sensitivity.examples import digits_heldout
from coreml_opt.sensitivity.reference import coreml_trial
from coreml_opt.simulate import fast_lut_function


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kmeans", choices=("exact", "fast"), default="exact",
                        help="k-means for palettization in both paths (fast: coremltools gets lut_function)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    model, data = zoo.digits_cnn(), digits_heldout()
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "digits.mlpackage"
        convert(model, zoo.EXAMPLE_INPUT_SHAPE, target="iOS18", output_path=package)
        start = time.perf_counter()
        result = analyse(model, zoo.EXAMPLE_INPUT_SHAPE, data, metric="accuracy", out_dir=Path(tmp) / "out",
                         progress=False, kmeans=args.kmeans)
        sweep_s = time.perf_counter() - start

        folded, evaluate = fold_batchnorm(model), make_evaluator(model, data, "accuracy")
        layers = {layer.layer: layer for layer in result.layers}
        mlmodel = ct.models.MLModel(str(package), skip_model_load=True)
        start = time.perf_counter()
        agree = 0
        for trial in result.trials:
            lut = fast_lut_function(trial.spec) if args.kmeans == "fast" and trial.spec.startswith("pal") else None
            agree += coreml_trial(mlmodel, folded, layers[trial.layer], trial.spec, evaluate, lut) == trial.metric
        loop_s = time.perf_counter() - start
    speedup = loop_s / sweep_s
    kmeans_s = _palette_seconds(model, result, args.kmeans)
    rows = [["sweep (simulated, cached activations)", len(result.trials), f"{sweep_s:.2f}",
             f"{1000 * sweep_s / len(result.trials):.0f}"],
            ["straightforward coremltools loop", len(result.trials), f"{loop_s:.2f}",
             f"{1000 * loop_s / len(result.trials):.0f}"]]
    print(f"digits CNN, {len(result.layers)} layers x {len(DEFAULT_LADDER)} candidates, accuracy on "
          f"{len(data)} held-out digits, kmeans={args.kmeans}, torch threads={torch.get_num_threads()}")
    print(format_table(["method", "trials", "wall s", "ms/trial"], rows))
    print("sweep time split: " + ", ".join(f"{k} {v:.2f} s" for k, v in result.timing.items()))
    print(f"speedup {speedup:.1f}x; trials whose metric equals the coremltools loop: {agree}/{len(result.trials)}")
    print(f"the sweep's palettes alone, computed again on one thread with no cache: {kmeans_s:.2f} s")
    print(json.dumps({"speedup": round(speedup, 2), "sweep_s": round(sweep_s, 3), "loop_s": round(loop_s, 3),
                      "kmeans_s": round(kmeans_s, 3), "trials": len(result.trials), "agree": agree,
                      "kmeans": args.kmeans, "timing": {k: round(v, 3) for k, v in result.timing.items()}}))


def _palette_seconds(model, result, kmeans: str) -> float:
    """Time to compute every palettized trial's LUT once, single-threaded, with no cache and no kept
    k-means tables (the sweep reuses pal6's for pal4 and pal2)."""
    from coreml_opt.simulate import optimal1d, simulate

    optimal1d.clear_tables()
    folded = fold_batchnorm(model)
    total = 0.0
    with torch.no_grad():
        for trial in result.trials:
            if not trial.spec.startswith("pal"):
                continue
            weight = folded.get_parameter(trial.layer).detach().clone()
            start = time.perf_counter()
            simulate(trial.spec, weight, trial.op_type, kmeans=kmeans)
            total += time.perf_counter() - start
    return total


if __name__ == "__main__":
    main()
