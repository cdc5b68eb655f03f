"""Benchmark: coremltools' own compression routine vs the simulation engine on one big fp16 weight.

Prints a table (wall time, speed-up, weight MSE of each) and, last, a JSON line of headline
figures. coremltools is timed on the numeric routine its pass calls for one weight
(``blockwise_compress`` / ``compress_by_magnitude``), without the graph plumbing around it;
the engine is timed producing the decompressed weight and its parameters. Asserts nothing.

    python bench/simulate.py [--size 4096] [--repeat 1]
"""
from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # coremltools' per-pass progress bars would bury the table

import argparse
import json
import logging
import time

import numpy as np
import torch

from coreml_opt.simulate import simulate


def _ct_routines():
    from coremltools.optimize import _utils as ct_utils
    from coremltools.optimize.coreml._quantization_passes import (linear_quantize_weights, palettize_weights,
                                                                  prune_weights)

    def quant(w, nbits, blocks):
        params = linear_quantize_weights.blockwise_compress(w, nbits, "LINEAR_SYMMETRIC", True, blocks)
        return lambda: linear_quantize_weights.decompress(params)

    def pal(w, nbits, blocks):
        params = palettize_weights.blockwise_compress(w, "KMEANS", nbits, blocks)
        return lambda: ct_utils.lut_to_dense(params.indices, params.lut, params.vector_axis)

    def prune(w, sparsity):
        params = prune_weights.compress_by_magnitude(w, sparsity)
        return lambda: prune_weights.decompress(params)

    return {
        "int8 per-channel": ("int8", lambda w: quant(w, 8, [1, 0]), "blockwise_compress"),
        "int4 per-block 32": ("int4/block32", lambda w: quant(w, 4, [1, 32]), "blockwise_compress"),
        "pal4 per-tensor": ("pal4", lambda w: pal(w, 4, [0, 0]), "blockwise_compress (kmeans1d)"),
        "pal4 per-grouped-channel 16": ("pal4/g16", lambda w: pal(w, 4, [16, 0]), "blockwise_compress (kmeans1d)"),
        "prune 50% magnitude": ("prune50", lambda w: prune(w, 0.5), "compress_by_magnitude"),
    }


def _timed(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="weight is size x size (default 4096)")
    parser.add_argument("--repeat", type=int, default=1, help="best of N runs for each timing")
    args = parser.parse_args()
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    logging.getLogger("coreml_opt").setLevel(logging.ERROR)

    rng = np.random.RandomState(0)
    w16 = (rng.standard_normal((args.size, args.size)) * 0.02).astype(np.float16)
    reference = w16.astype(np.float64)
    weight = torch.from_numpy(w16.astype(np.float32))
    print(f"weight {args.size}x{args.size} fp16, torch threads {torch.get_num_threads()}")
    header = f"{'mode':<30}{'coremltools routine':<32}{'ct s':>8}{'ours s':>8}{'speedup':>9}{'ct MSE':>12}{'our MSE':>12}{'ratio':>8}"
    print(header)
    print("-" * len(header))
    small = w16[:64, :64].copy()  # warm both up: imports, thread pools, first-call allocations
    for spec, routine, _ in _ct_routines().values():
        routine(small.copy())
        simulate(spec, torch.from_numpy(small.astype(np.float32)), "linear", kmeans="fast")
    figures: dict[str, float] = {}
    speedups = []
    for name, (spec, routine, label) in _ct_routines().items():
        ct_time, decompress = _timed(lambda: routine(w16.copy()), args.repeat)
        ct_mse = float(np.mean((decompress().astype(np.float64) - reference) ** 2))
        kmeans = "fast" if spec.startswith("pal") else "exact"
        our_time, result = _timed(lambda: simulate(spec, weight, "linear", kmeans=kmeans), args.repeat)
        our_mse = float(torch.mean((result.weight.double() - weight.double()) ** 2))
        ratio = our_mse / ct_mse if ct_mse > 0 else (1.0 if our_mse == 0 else float("inf"))
        speedup = ct_time / our_time
        speedups.append(speedup)
        print(f"{name:<30}{label:<32}{ct_time:>8.3f}{our_time:>8.3f}{speedup:>8.1f}x{ct_mse:>12.4e}{our_mse:>12.4e}"
              f"{ratio:>8.4f}")
        key = spec.replace("/", "_").replace("block", "b")
        figures[f"{key}_speedup"] = round(speedup, 2)
        figures[f"{key}_mse_ratio"] = round(ratio, 5)
    if args.size * args.size > 65520:
        print("note: prune50 MSE is 0 for both: np.percentile on > 65,519 fp16 values returns NaN in "
              "coremltools 9 + numpy 2, so nothing is pruned (the engine reproduces it)")
    figures["pal4_g16_speedup"] = figures.pop("pal4_g16_speedup")
    figures["pal4_g16_mse_ratio"] = figures.pop("pal4_g16_mse_ratio")
    figures["min_speedup"] = round(min(speedups), 2)
    figures["size"] = args.size
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
