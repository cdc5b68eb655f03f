"""The package runtime against Core ML itself (``MLModel.predict``), on the same packages, several spec kinds.

Core ML predicts only on macOS: elsewhere every test here skips with the reason. Never faked.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from coreml_opt import zoo
from coreml_opt.runtime import load_runtime


def _coreml_reason() -> str | None:
    """Why Core ML cannot predict here (None when it can)."""
    if sys.platform != "darwin":
        return f"Core ML's MLModel.predict runs only on macOS (this is {sys.platform})"
    try:
        import coremltools.libcoremlpython  # noqa: F401
    except ImportError as exc:
        return f"coremltools' native predict library is missing ({exc})"
    return None


pytestmark = pytest.mark.skipif(_coreml_reason() is not None, reason=_coreml_reason() or "")

SPECS = ["none", "int8", "int4/block32", "pal4", "pal4/g16", "prune50", "prune2:4+pal4"]
# fp16 compute on CPU/GPU/ANE vs the runtime's fp16 mode (each op rounded to fp16): a few fp16 ulps per op
TOLERANCE = 1e-2  # max |Core ML - runtime| / max |runtime|, the same bound `convert` checks packages with


@pytest.fixture(scope="module")
def digits_inputs(digits_data) -> np.ndarray:
    x_test = digits_data[2]
    return np.asarray(x_test[:32], dtype=np.float32).reshape(-1, *zoo.EXAMPLE_INPUT_SHAPE[1:])


@pytest.mark.parametrize("spec", SPECS)
def test_runtime_matches_core_ml_on_the_digits_package(spec, example_mlpackage, digits_inputs, tmp_path):
    import coremltools as ct

    from coreml_opt.compress import compress
    from coreml_opt.plan import load_plan

    package = example_mlpackage
    if spec != "none":
        package = tmp_path / "c.mlpackage"
        compress(example_mlpackage, load_plan(None, spec=spec, target="iOS18"), package)
    mlmodel = ct.models.MLModel(str(package), compute_units=ct.ComputeUnit.CPU_ONLY)
    runtime = load_runtime(package, precision="fp16")
    name_in, name_out = runtime.graph.inputs[0].name, runtime.graph.outputs[0]
    ours = runtime({name_in: torch.from_numpy(digits_inputs)})[name_out].numpy()
    theirs = np.concatenate([mlmodel.predict({name_in: x[None]})[name_out] for x in digits_inputs])
    scale = float(np.abs(ours).max())
    assert float(np.abs(theirs - ours).max()) / scale <= TOLERANCE
    assert (theirs.argmax(1) == ours.argmax(1)).mean() == 1.0


@pytest.mark.parametrize("name", ["lenet5", "mobilenet", "efficientnet", "encoder", "upnet"])
def test_runtime_matches_core_ml_on_the_runtime_test_models(name, tmp_path):
    import coremltools as ct

    from runtime_models import MODELS, convert_model

    model, example = MODELS[name]()
    package = convert_model(model, example, tmp_path / f"{name}.mlpackage")
    mlmodel = ct.models.MLModel(str(package), compute_units=ct.ComputeUnit.CPU_ONLY)
    runtime = load_runtime(package, precision="fp16")
    name_out = runtime.graph.outputs[0]
    ours = runtime({"x": example})[name_out].numpy()
    theirs = mlmodel.predict({"x": example.numpy()})[name_out]
    assert float(np.abs(theirs - ours).max()) / float(np.abs(ours).max()) <= TOLERANCE
