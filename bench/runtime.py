"""Benchmark: the package runtime vs torch eager, per batch, on a CNN and a transformer encoder.

Converts the MobileNetV2-style CNN and the transformer encoder of ``tests/runtime_models.py`` (iOS18,
fp16 package), then times, in one run and interleaved, the torch model (fp32 eager, no_grad) and the runtime
(fp32 and fp16 modes) on the same batches. Prints a table and, last, one JSON line. Asserts nothing.

    python bench/runtime.py [--batch 32] [--repeat 20] [--device cpu]
"""
from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # coremltools' per-pass progress bars would bury the table

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import runtime_models as rm  # noqa: E402

from coreml_opt.runtime import load_runtime  # noqa: E402


def _time_pair(first, second, repeat: int) -> tuple[float, float]:
    """Median seconds of each, timed alternately so load on a shared machine hits both alike."""
    first(), second()  # warm-up
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeat):
        for fn, bucket in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    figures = {"batch": args.batch, "device": args.device, "threads": torch.get_num_threads()}
    print(f"{'model':<12}{'mode':<8}{'torch ms':>10}{'runtime ms':>12}{'ratio':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("mobilenet", "encoder"):
            model, example = rm.MODELS[name]()
            path = rm.convert_model(model, example, Path(tmp) / f"{name}.mlpackage")
            gen = torch.Generator().manual_seed(0)
            if example.is_floating_point():
                x = torch.rand((args.batch, *example.shape[1:]), generator=gen)
                torch_x = x
            else:
                x = torch.randint(0, 50, (args.batch, *example.shape[1:]), generator=gen, dtype=example.dtype)
                torch_x = x.long()
            model = model.to(args.device)
            x, torch_x = x.to(args.device), torch_x.to(args.device)

            def eager():
                with torch.no_grad():
                    model(torch_x)
            for precision in ("fp32", "fp16"):
                runtime = load_runtime(path, device=args.device, precision=precision)
                runtime({"x": x})  # decides batching once
                ours, theirs = _time_pair(lambda: runtime({"x": x}), eager, args.repeat)
                ratio = ours / theirs
                print(f"{name:<12}{precision:<8}{theirs * 1e3:>10.2f}{ours * 1e3:>12.2f}{ratio:>7.2f}x"
                      + f"  ({runtime.batching})")
                figures[f"{name}_{precision}_ratio"] = round(ratio, 3)
                figures[f"{name}_{precision}_batching"] = runtime.batching
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
