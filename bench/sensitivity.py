"""Benchmark: a full sensitivity sweep vs the straightforward coremltools loop, per trial, in one run.

The straightforward loop, per trial: coremltools compresses the .mlpackage with an op_name config for that one
layer, decompress_weights, copy the weights into torch, evaluate the full model (``reference.coreml_trial``,
here with its phases timed). Both paths evaluate with the same evaluator (device, channels_last layout), so
every compared trial's metric must be identical. ``--model digits`` (default) compares every trial;
``--model efficientnet-lite0`` sweeps pretrained EfficientNet-Lite0 on 128 real photos at 224x224 (KL against
the fp32 model) with the full default ladder and runs the loop on a seeded sample of its trials spread over
layers and specs. Prints tables (wall times, where the time goes); the last line is JSON with ``speedup``
(the loop's seconds per trial over the sweep's, the sweep's setup, baselines and cache included).
Run: python bench/sensitivity.py [--model digits|efficientnet-lite0] [--device cpu|cuda] [--kmeans exact|fast]
"""
from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # coremltools' per-pass progress bars would bury the table

import argparse
import json
import logging
import random
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import coremltools as ct
import torch

from coreml_opt import zoo
from coreml_opt.evaluation.heap import reused_heap
from coreml_opt.evaluation.weights import decompressed_consts, load_consts
from coreml_opt.model.convert import convert, fold_batchnorm
from coreml_opt.report.tables import format_table
from coreml_opt.sensitivity import DEFAULT_LADDER, analyse, make_evaluator
from coreml_opt.sensitivity.reference import compress_one_layer
from coreml_opt.simulate import fast_lut_function


@dataclass
class Bench:
    """One benchmark model: the torch model, its input shape, evaluation data and metric, and a label."""

    model: torch.nn.Module
    shape: tuple[int, ...]
    data: Any
    metric: str
    label: str


def digits(images: int) -> Bench:
    from coreml_opt.sensitivity.examples import digits_heldout

    data = digits_heldout()
    return Bench(zoo.digits_cnn(), zoo.EXAMPLE_INPUT_SHAPE, data, "accuracy",
                 f"digits CNN, accuracy on {len(data)} held-out digits")


def efficientnet_lite0(images: int) -> Bench:
    from coreml_opt.photos import photo_halves

    data = photo_halves(2 * images)[0]  # the plan half: even crops
    return Bench(zoo.efficientnet_lite0(), (1, 3, 224, 224), data, "kl",
                 f"EfficientNet-Lite0 (ImageNet weights), KL vs fp32 on {len(data)} photos at 224x224")


MODELS: dict[str, Callable[[int], Bench]] = {"digits": digits, "efficientnet-lite0": efficientnet_lite0}


def sample_trials(trials: list, n: int | None, seed: int) -> list:
    """``n`` trials (all when None or more) spread over specs and layers: seeded order, each pick the trial whose
    spec, then layer, has been picked least."""
    if n is None or n >= len(trials):
        return list(trials)
    pool = list(trials)
    random.Random(seed).shuffle(pool)
    specs, layers, picked = Counter(), Counter(), []
    for _ in range(n):
        best = min(pool, key=lambda t: (specs[t.spec], layers[t.layer]))
        pool.remove(best)
        specs[best.spec] += 1
        layers[best.layer] += 1
        picked.append(best)
    return picked


def reference_loop(bench: Bench, package: Path, result, sample: list, kmeans: str,
                   device: str) -> tuple[list[float], dict[str, float]]:
    """The straightforward coremltools loop on ``sample`` (what ``coreml_trial`` does, phase by phase):
    (metric per trial, seconds per phase)."""
    folded = fold_batchnorm(bench.model, torch.zeros(bench.shape))
    evaluate = make_evaluator(bench.model, bench.data, bench.metric, input_shape=bench.shape, device=device)
    layers = {layer.layer: layer for layer in result.layers}
    mlmodel = ct.models.MLModel(str(package), skip_model_load=True)
    split = {"coremltools compress": 0.0, "coremltools decompress": 0.0, "weights into torch": 0.0,
             "evaluation": 0.0}
    metrics = []
    with reused_heap():  # the same memory reuse the sweep runs under
        for trial in sample:
            lut = fast_lut_function(trial.spec) if kmeans == "fast" and trial.spec.startswith("pal") else None
            t0 = time.perf_counter()
            compressed = compress_one_layer(mlmodel, layers[trial.layer], trial.spec, lut)
            t1 = time.perf_counter()
            consts = decompressed_consts(compressed)
            t2 = time.perf_counter()
            model = load_consts(folded, consts)
            t3 = time.perf_counter()
            metrics.append(evaluate(model))
            t4 = time.perf_counter()
            for key, seconds in zip(split, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                split[key] += seconds
    return metrics, split


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="digits", help="what to sweep (default digits)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where both paths evaluate (k-means and coremltools stay on the CPU)")
    parser.add_argument("--kmeans", choices=("exact", "fast"), default="exact",
                        help="k-means for palettization in both paths (fast: coremltools gets lut_function)")
    parser.add_argument("--images", type=int, default=128, help="efficientnet-lite0: photos evaluated (default 128)")
    parser.add_argument("--candidates", help="comma-separated specs (default: the full default ladder)")
    parser.add_argument("--sample", type=int, help="trials the coremltools loop runs (default: all for digits, "
                                                   "12 for efficientnet-lite0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    sweep_log = _Lines()
    for name in ("coreml_opt.sensitivity.sweep", "coreml_opt.sensitivity.suffix"):
        logging.getLogger(name).setLevel(logging.INFO)
        logging.getLogger(name).addHandler(sweep_log)
        logging.getLogger(name).propagate = False
    sample_size = args.sample if args.sample is not None else (None if args.model == "digits" else 12)

    bench = MODELS[args.model](args.images)
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "model.mlpackage"
        start = time.perf_counter()
        convert(bench.model, bench.shape, target="iOS18", output_path=package)
        convert_s = time.perf_counter() - start
        start = time.perf_counter()
        result = analyse(bench.model, bench.shape, bench.data, metric=bench.metric, candidates=args.candidates,
                         out_dir=Path(tmp) / "out", progress=False, kmeans=args.kmeans, device=args.device)
        sweep_s = time.perf_counter() - start
        sample = sample_trials(result.trials, sample_size, args.seed)
        start = time.perf_counter()
        loop_metrics, loop_split = reference_loop(bench, package, result, sample, args.kmeans, args.device)
        loop_s = time.perf_counter() - start
    agree = sum(m == t.metric for m, t in zip(loop_metrics, sample))
    # the sweep's setup, baselines and cache are in its per-trial figure; the loop's setup (reference outputs,
    # loading the package) is not in its own: the speedup is the lower bound
    per_sweep, per_loop = sweep_s / len(result.trials), sum(loop_split.values()) / len(sample)
    speedup = per_loop / per_sweep
    evaluation = result.timing.get("evaluation", 0.0)
    trial_loop = result.timing.get("compression", 0.0) + evaluation + result.timing.get("store", 0.0)

    cached = next((line for line in sweep_log.lines if line.startswith("cached activations")), "no activation cache")
    full = sum("runs full forward passes" in line or "using full forward" in line for line in sweep_log.lines)
    print(f"{bench.label}; {len(result.layers)} layers x {len(result.candidates)} candidates = "
          f"{len(result.trials)} trials; kmeans={args.kmeans}, device={args.device}, "
          f"torch threads={torch.get_num_threads()}; {cached} ({full} run full forward passes)")
    print(f"conversion to .mlpackage (not counted): {convert_s:.1f} s; sample: {len(sample)} trials, seed {args.seed}, "
          f"specs {dict(Counter(t.spec for t in sample))}, {len({t.layer for t in sample})} layers")
    rows = [["sweep (simulated, cached activations)", len(result.trials), f"{sweep_s:.1f}", f"{per_sweep:.3f}",
             f"{trial_loop / max(result.ran, 1):.3f}"],
            ["straightforward coremltools loop", len(sample), f"{loop_s:.1f}",
             f"{loop_s / len(sample):.3f}", f"{per_loop:.3f}"]]
    print(format_table(["method", "trials", "wall s", "s/trial (all in)", "s/trial (trial only)"], rows))
    split_rows = [["sweep", k, f"{v:.2f}", f"{100 * v / sweep_s:.0f} %"] for k, v in result.timing.items()
                  if k not in ("total", "compression_cpu")]
    split_rows.insert(next(i for i, r in enumerate(split_rows) if r[1] == "compression") + 1,
                      ["sweep", "  (k-means and quantization on the workers, CPU s)",
                       f"{result.timing.get('compression_cpu', 0.0):.2f}", ""])
    split_rows += [["coremltools loop", k, f"{v:.2f}", f"{100 * v / loop_s:.0f} %"] for k, v in loop_split.items()]
    print("where the time goes (compression = waiting for k-means/quantization; activation_cache = recording the "
          "cut activations once):")
    print(format_table(["path", "phase", "s", "share"], split_rows))
    print(f"speedup per trial {speedup:.1f}x (sweep all in / loop trial only); compared trials whose metric equals the coremltools loop's: "
          f"{agree}/{len(sample)}; trials not evaluated (simulated weight equal to fp16 or another trial's): "
          f"{result.deduplicated}")
    kmeans_s = _palette_seconds(bench.model, result, args.kmeans) if args.model == "digits" else None
    if kmeans_s is not None:
        print(f"the sweep's palettes alone, computed again on one thread with no cache: {kmeans_s:.2f} s")
    print(json.dumps({"speedup": round(speedup, 2), "model": args.model, "device": args.device,
                      "sweep_s": round(sweep_s, 3), "loop_s": round(loop_s, 3),
                      "sweep_s_per_trial": round(per_sweep, 4), "loop_s_per_trial": round(per_loop, 4),
                      "trials": len(result.trials), "compared": len(sample), "agree": agree,
                      "deduplicated": result.deduplicated, "kmeans": args.kmeans, "convert_s": round(convert_s, 2),
                      **({"kmeans_s": round(kmeans_s, 3)} if kmeans_s is not None else {}),
                      "timing": {k: round(v, 3) for k, v in result.timing.items()},
                      "loop_timing": {k: round(v, 3) for k, v in loop_split.items()}}))


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
