"""The main job on the bundled example: digits CNN -> ML Program -> compressed package, with a report.

Runs offline: the model trains on scikit-learn's bundled digits data (cached after the first run).
Accuracy of the compressed model is measured on the PyTorch model with simulated compression,
which equals the weights Core ML reconstructs from the package (see the fidelity tests).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .compress import CompressionReport, compress
from .plan import Plan, load_plan

logger = logging.getLogger(__name__)

# Mixed precision for the digits CNN: 4-bit palettes per 16 channels for convs, 8-bit for the
# first classifier layer (the most sensitive), and the tiny first conv stays fp16.
EXAMPLE_PLAN = {
    "target": "iOS18",
    "global": "pal4/g16",
    "op_types": {"linear": "int4/block32"},
    "layers": {"classifier.0": "int8"},
    "skip": ["features.0"],
}


@dataclass
class ExampleResult:
    """Paths and figures of one example run."""

    out: Path
    model_path: Path
    compressed_path: Path
    plan_path: Path
    report: CompressionReport
    accuracy: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        from .report.tables import compression_table

        lines = [compression_table(self.report), ""]
        for key, value in self.accuracy.items():
            lines.append(f"accuracy {key:<24s} {100 * value:6.2f} %")
        lines += ["", f"plan:       {self.plan_path}", f"model:      {self.model_path}",
                  f"compressed: {self.compressed_path}"]
        return "\n".join(lines)


def run_example(out: str | os.PathLike = "out/example", spec: str | None = None,
                plan_path: str | os.PathLike | None = None) -> ExampleResult:
    """Build (or load) the digits CNN, convert it, compress it by a plan and measure accuracy."""
    from .model.convert import convert, example_inputs, fold_batchnorm
    from .model.package import make_output_folder
    from .zoo import EXAMPLE_INPUT_SHAPE, digits_cnn, digits_split, evaluate_accuracy

    out = Path(out)
    make_output_folder(out)
    plan = load_plan(plan_path, spec=spec) if (plan_path or spec) else Plan.from_dict(EXAMPLE_PLAN, "example plan")
    model = digits_cnn()
    _, _, x_test, y_test = digits_split()
    model_path = out / "digits.mlpackage"
    convert(model, EXAMPLE_INPUT_SHAPE, target=plan.target or "iOS18", output_path=model_path)
    saved_plan = plan.save(out / "plan.yaml")
    compressed_path = out / "digits-compressed.mlpackage"
    report = compress(model_path, plan, compressed_path)
    folded = fold_batchnorm(model, example_inputs(model, EXAMPLE_INPUT_SHAPE))
    accuracy = {"fp32 (PyTorch)": evaluate_accuracy(folded, x_test, y_test)}
    accuracy.update(_simulated_accuracy(folded, report, x_test, y_test))
    return ExampleResult(out, model_path, compressed_path, saved_plan, report, accuracy)


def _simulated_accuracy(model, report: CompressionReport, x_test, y_test) -> dict[str, float]:
    """Accuracy with fp16 weights and with the plan's compression simulated in PyTorch."""
    from .simulate import apply_plan
    from .spec import NoneSpec, parse_spec
    from .zoo import evaluate_accuracy

    fp16 = {w.torch_name: NoneSpec() for w in report.weights if w.torch_name}
    compressed = {w.torch_name: parse_spec(w.spec) for w in report.weights if w.torch_name}
    out = {}
    with apply_plan(model, fp16):
        out["fp16 weights"] = evaluate_accuracy(model, x_test, y_test)
    with apply_plan(model, compressed):
        out["compressed (simulated)"] = evaluate_accuracy(model, x_test, y_test)
    return out
