"""Data-free vs calibration vs fine-tuning accuracy on the digits CNN at pal4, pal2 and int4.

Each row runs one workflow (all three stages from the same plan) and reports top-1 accuracy on the
digits held-out split, measured in PyTorch on the weights each emitted .mlpackage holds. Calibration
uses the shipped calibration_data/digits (200 training images); fine-tuning distils from the
uncompressed model on the training split. Prints a table, then one JSON line of the accuracies.

    python bench/workflows.py [--epochs 2] [--out out/bench-workflows]
"""
from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # coremltools' per-pass progress bars would bury the table

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = {  # key: (spec, calibration method, fine-tuning method, learning rate)
    "pal4": ("pal4", "skm", "dkm", 5e-4),
    "pal2": ("pal2", "skm", "dkm", 5e-4),
    "int4": ("int4", "gptq", "qat", 1e-4),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs over the 1,437 training digits")
    parser.add_argument("--out", help="keep the packages here (default: a temporary folder)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logging.getLogger("coremltools").setLevel(logging.ERROR)

    from coreml_opt.report.tables import format_table
    from coreml_opt.workflows import parse_workflow, run_workflow

    out_root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-workflows-"))
    results: dict[str, dict[str, float]] = {}
    rows = []
    for key, (spec, calibration, finetune, lr) in CASES.items():
        workflow = parse_workflow({
            "name": f"bench-{key}", "model": "coreml_opt.zoo:digits_cnn", "input_shape": [1, 1, 8, 8],
            "target": "iOS18", "plan": {"global": spec}, "eval": {"data": "digits-test", "metric": "accuracy"},
            "stages": [{"data_free": {}},
                       {"calibration": {"method": calibration, "data": str(ROOT / "calibration_data/digits"),
                                        "samples": 200}},
                       {"finetune": {"method": finetune, "data": "digits-train", "epochs": args.epochs, "lr": lr,
                                     "distill": {"temperature": 2.0}}}],
        }, f"bench:{key}")
        start = time.perf_counter()
        result = run_workflow(workflow, out=out_root / key, progress=False)
        if not result.ok:
            print(f"{key}: stage {result.failed.name} failed: {result.failed.error}", file=sys.stderr)
            return 1
        by_kind = {s.kind: s for s in result.stages}
        results[key] = {"data_free": by_kind["data_free"].outcome.metric,
                        "calibration": by_kind["calibration"].outcome.metric,
                        "finetune": by_kind["finetune"].outcome.metric}
        bits = by_kind["finetune"].outcome.inventory.bits_per_weight
        rows.append([key, f"{calibration}/{finetune}", f"{100 * result.baseline['fp16']:.2f}",
                     *(f"{100 * v:.2f}" for v in results[key].values()), f"{bits:.2f}",
                     f"{time.perf_counter() - start:.0f}"])
    print(format_table(["plan", "calib/finetune", "fp16 %", "data-free %", "calibration %", "fine-tuning %",
                        "bits/w", "seconds"], rows))
    print("accuracy: top-1 on the digits held-out split (360 images), on each package's own weights")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
