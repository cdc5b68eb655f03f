"""Non-finite values stop the work in one line: NaN/inf weights chosen for compression, compressions that
overflow fp16 (affine scales of weights near ±60,000), and NaN/inf met by a metric (``min(200, nan)`` is 200)."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import run_cli
from coreml_opt.metrics import METRICS, MetricError
from coreml_opt.simulate import apply_spec, simulate
from coreml_opt.spec import parse_spec

SENTINEL = 1234.0  # an fp16 value the tiny model's weights hold only where the test puts NaN


class TwoLinear(nn.Module):
    """144 -> 128 -> 10: fc1.weight (18,432 values) is compressed by global specs, fc2 (1,280) is not."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(144, 128), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _model(seed: int) -> TwoLinear:
    torch.manual_seed(seed)
    return TwoLinear().eval()


@pytest.fixture(scope="session")
def nonfinite_packages(tmp_path_factory) -> dict[str, Path]:
    """Real conversions: 'nan' has three NaNs in fc1.weight (coremltools' converter refuses NaN weights, so
    the fp16 blob is patched after conversion); 'big' has fc1.weight uniform in ±60,000 (finite in fp16)."""
    from coreml_opt.model.convert import convert, save_package

    folder = tmp_path_factory.mktemp("nonfinite")
    nan_model = _model(0)
    with torch.no_grad():
        for i, j in ((0, 0), (5, 7), (9, 9)):
            nan_model.fc1.weight[i, j] = SENTINEL
    convert(nan_model, (1, 144), target="iOS18", output_path=folder / "nan.mlpackage")
    blob = folder / "nan.mlpackage" / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    data = blob.read_bytes()
    assert data.count(np.float16(SENTINEL).tobytes()) == 3
    blob.write_bytes(data.replace(np.float16(SENTINEL).tobytes(), np.array([np.nan], np.float16).tobytes()))
    big_model = _model(1)
    with torch.no_grad():
        big_model.fc1.weight.uniform_(-60000.0, 60000.0)
    # its fp16 activations overflow, so `convert` refuses to write it (model/check.py); saved here unchecked
    save_package(convert(big_model, (1, 144), target="iOS18")[0], folder / "big.mlpackage")
    return {"nan": folder / "nan.mlpackage", "big": folder / "big.mlpackage"}


def _one_line_refusal(package: Path, spec: str, tmp_path: Path, *fragments: str) -> None:
    out = tmp_path / "out" / "o.mlpackage"
    out.parent.mkdir()
    code, stdout, stderr = run_cli("compress", str(package), "--spec", spec, "-o", str(out))
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr and stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert list(out.parent.iterdir()) == []  # nothing written, no temp folder


@pytest.mark.parametrize("spec", ["pal4", "prune50", "int8", "pal4/g16"])
def test_compress_refuses_a_weight_holding_nan(nonfinite_packages, spec, tmp_path):
    """pal4 was a scikit-learn traceback, prune50 a 0 %-sparse package over its predicted bytes, int8 spread the
    three NaNs to 432 values: all wrote with exit 0."""
    _one_line_refusal(nonfinite_packages["nan"], spec, tmp_path, "'fc1.weight'", f"spec {spec}",
                      "3 of its 18432 values are NaN or inf")


@pytest.mark.parametrize("spec", ["int8/tensor", "int8", "pal4/uniform", "pal4+lut8"])
def test_compress_refuses_a_spec_whose_scale_overflows_fp16(nonfinite_packages, spec, tmp_path):
    """Weights near ±60,000: coremltools emits an all-NaN weight for these specs (simulated first, so refused)."""
    _one_line_refusal(nonfinite_packages["big"], spec, tmp_path, "'fc1.weight'", f"spec {spec}",
                      "compressing it gives 18432 of 18432 values NaN or inf", "pal8")


def test_kmeans_palettes_of_large_finite_weights_are_emitted(nonfinite_packages, tmp_path):
    """k-means palettes are means of the weight's values, so they stay finite: compress writes them."""
    import coremltools as ct
    from test_simulate_helpers import decompressed_weights

    out = tmp_path / "pal.mlpackage"
    code, _, stderr = run_cli("compress", str(nonfinite_packages["big"]), "--spec", "pal2", "-o", str(out))
    assert code == 0, stderr
    emitted = decompressed_weights(ct.models.MLModel(str(out), skip_model_load=True))
    assert all(np.isfinite(v.astype(np.float32)).all() for v in emitted.values())


def test_simulated_compression_in_sweeps_and_plans_names_the_layer():
    """apply_spec (sweeps, plan validation) refuses what compress refuses, naming the torch parameter."""
    from coreml_opt.simulate import NonFiniteWeightError

    model = _model(2)
    with torch.no_grad():
        model.fc1.weight[1, 1] = math.inf
        model.fc2.weight.uniform_(-60000.0, 60000.0)
        model.fc2.weight[0, 0] = 70000.0  # finite in fp32, inf in fp16
    with pytest.raises(NonFiniteWeightError, match=r"weight 'fc1.weight' \(spec pal4\): 1 of its 18432"):
        with apply_spec(model, "fc1.weight", "pal4"):
            pass
    beyond = r"weight 'fc2.weight' \(spec int8\): 1 of its 1280 values lie beyond fp16's"
    with pytest.raises(NonFiniteWeightError, match=beyond):
        with apply_spec(model, "fc2.weight", "int8"):
            pass
    with torch.no_grad():
        model.fc2.weight[0, 0] = 0.0
    with pytest.raises(NonFiniteWeightError, match="compressing it gives 1280 of 1280"):
        with apply_spec(model, "fc2.weight", "int8/tensor"):
            pass
    assert torch.equal(simulate("none", model.fc1.weight).weight.isinf(), model.fc1.weight.isinf())


@pytest.mark.parametrize("name", list(METRICS))
@pytest.mark.parametrize("where", ["outputs", "reference"])
def test_every_metric_refuses_nan_or_inf(name, where):
    """psnr/sqnr reported 200 dB for a NaN output (min(200, nan) is 200); the others NaN or a wrong argmax."""
    ref = torch.randn(16, 10, generator=torch.Generator().manual_seed(0))
    out = ref + 0.01
    bad = out if where == "outputs" else ref
    bad[3, 4] = math.nan
    bad[5, 0] = math.inf
    labels = torch.zeros(16, dtype=torch.int64)
    with pytest.raises(MetricError, match=f"metric {name}: .*2 NaN/inf values of 160") as info:
        METRICS[name].score(out, ref, labels)
    assert "\n" not in str(info.value)


def test_sweep_stops_on_nan_in_the_data(tmp_path):
    """One NaN pixel made every psnr trial 200 dB, drop 0, exit 0."""
    from coreml_opt import zoo

    _, _, x, y = zoo.digits_split()
    x = np.asarray(x[:32], np.float32).reshape(-1, 1, 8, 8).copy()
    x[3, 0, 2, 2] = np.nan
    data = tmp_path / "data_nan.npz"
    np.savez(data, x=x, y=np.asarray(y[:32]))
    code, _, stderr = run_cli("sensitivity", "--model", "coreml_opt.zoo:digits_cnn", "--input-shape", "1,1,8,8",
                              "--data", str(data), "--metric", "psnr", "--candidates", "pal1", "--no-progress",
                              "--out", str(tmp_path / "sweep"))
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1, stderr
    assert str(data) in lines[0] and "1 of its 2048 input values are NaN or inf" in lines[0]
    assert not (tmp_path / "sweep" / "sweep.json").exists()


class NanHead(nn.Module):
    """A model whose output is NaN for some inputs (log of a negative activation)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(self.fc(x.flatten(1)))


@pytest.mark.parametrize("metric", ["psnr", "sqnr"])
def test_sweep_stops_on_nan_in_the_model_output(metric):
    from coreml_opt.sensitivity import analyse

    torch.manual_seed(3)
    data = [(torch.rand(16, 1, 8, 8), torch.zeros(16, dtype=torch.int64))]
    with pytest.raises(MetricError, match=f"metric {metric}: the reference outputs .* hold .* NaN/inf"):
        analyse(NanHead().eval(), (1, 1, 8, 8), data, metric=metric, candidates="pal1", progress=False)


def test_user_metric_returning_nan_stops():
    from coreml_opt.sensitivity import Evaluator

    evaluator = Evaluator(lambda model: float("nan"), None)
    with pytest.raises(MetricError, match="gave nan"):
        evaluator(_model(4))


def test_plan_refuses_a_sweep_without_a_finite_baseline():
    """A sweep.json stores a NaN baseline as null: measuring a plan against it compared as 'met'."""
    from coreml_opt.errors import PlanError
    from coreml_opt.planning.costs import build_problem
    from coreml_opt.planning.planner import _drop

    sweep = {"layers": [{"layer": "fc1.weight", "params": 18432, "fp16_bytes": 36864}], "baseline": None,
             "metric": "psnr"}
    problem = build_problem(sweep, [{"layer": "fc1.weight", "spec": "pal1", "drop": 0.0, "bytes": 2304}])
    assert math.isnan(problem.baseline)
    with pytest.raises(PlanError, match="baseline psnr is nan"):
        _drop(problem, 40.0)


def test_copying_the_nan_fixture_keeps_it_readable(nonfinite_packages, tmp_path):
    """The patched package is a valid package: inspect reads it (exit 0)."""
    copy = tmp_path / "nan.mlpackage"
    shutil.copytree(nonfinite_packages["nan"], copy)
    code, stdout, stderr = run_cli("inspect", str(copy))
    assert code == 0 and "fc1.weight" in stdout, stderr


def test_example_accuracy_refuses_nan_logits():
    """zoo.evaluate_accuracy (the example's table) counted NaN logits' argmax as a prediction."""
    from coreml_opt import zoo

    x = torch.rand(8, 144)
    x[2, 0] = math.nan
    with pytest.raises(MetricError, match="metric accuracy: .*NaN/inf"):
        zoo.evaluate_accuracy(_model(5), x, torch.zeros(8, dtype=torch.int64))


class Overflow(nn.Module):
    """Finite weights and data; output 0 is exp(94 * fc's row 0), finite at 0.9 per weight, inf once pal1 merges
    row 0's 0.9s and row 1's 1.1s into one palette entry of 1.0."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64, bias=False)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.weight[0], self.fc.weight[1] = 0.9, 1.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x.flatten(1))
        return torch.cat([torch.exp(94.0 * y[:, :1]), y[:, 1:]], dim=1)


def test_sweep_names_the_trial_whose_outputs_are_not_finite():
    from coreml_opt.sensitivity import analyse

    data = [(torch.full((4, 1, 8, 8), 1 / 64), torch.zeros(4, dtype=torch.int64))]
    with pytest.raises(MetricError, match=r"metric sqnr with layer 'fc.weight' compressed by pal1: the model's "
                                          r"outputs hold \d+ NaN/inf"):
        analyse(Overflow().eval(), (1, 1, 8, 8), data, metric="sqnr", candidates="pal1", progress=False)


def test_data_holding_nan_or_inf_is_refused_wherever_it_is_loaded():
    """Evaluation, calibration and fine-tuning data all become a Dataset: NaN/inf inputs stop there."""
    from coreml_opt.data import Dataset, load_iterable
    from coreml_opt.errors import DataError

    x = torch.rand(4, 3)
    x[1, 2] = math.inf
    with pytest.raises(DataError, match="calib: 1 of its 12 input values are NaN or inf"):
        Dataset(x, source="calib")
    with pytest.raises(DataError, match="iterable: 1 of its 12"):
        load_iterable([x])


def test_a_workflow_stage_that_leaves_nan_weights_stops_before_export():
    from coreml_opt.errors import PlanError
    from coreml_opt.workflows.stages import check_finite_weights

    model = _model(6)
    check_finite_weights("gptq", model)
    with torch.no_grad():
        model.fc2.weight[0, :3] = math.nan
    with pytest.raises(PlanError, match="stage gptq: left 3 of 1280 values of 'fc2.weight' NaN or inf"):
        check_finite_weights("gptq", model)


def test_convert_names_a_nan_or_inf_parameter_in_one_line():
    """coremltools' converter failed on a NaN weight with "tensor value not consistent", advising to check the op."""
    from coreml_opt.errors import ModelError
    from coreml_opt.model.convert import convert

    model = _model(7)
    with torch.no_grad():
        model.fc1.weight[2, 3] = math.nan
        model.fc2.bias[0] = math.inf
    with pytest.raises(ModelError, match=r"TwoLinear: parameter 'fc1.weight' holds 1 NaN/inf values of 18432") as info:
        convert(model, (1, 144))
    assert "\n" not in str(info.value)


def test_sweep_skips_specs_whose_scales_overflow_and_plans_cannot_pick_them(tmp_path):
    """Weights near ±60,000: int8/tensor would be a trial compress refuses; it is a skipped trial with its reason,
    while pal2 (finite) is measured."""
    from coreml_opt.sensitivity import analyse

    model = _model(8)
    with torch.no_grad():
        model.fc1.weight.uniform_(-60000.0, 60000.0)
    data = [(torch.rand(8, 144), torch.zeros(8, dtype=torch.int64))]
    result = analyse(model, (1, 144), data, metric="sqnr", candidates="int8/tensor,pal2", progress=False,
                     out_dir=tmp_path / "sweep")
    skipped = {(t["layer"], t["spec"]): t["reason"] for t in result.skipped_trials}
    assert "compressing it gives 18432 of 18432 values NaN or inf" in skipped[("fc1.weight", "int8/tensor")]
    assert {(t.layer, t.spec) for t in result.trials} >= {("fc1.weight", "pal2")}
    assert ("fc1.weight", "int8/tensor") not in {(t.layer, t.spec) for t in result.trials}
    assert result.complete


@pytest.mark.parametrize("package, spec", [("big", "int8/tensor"), ("big", "int8"), ("big", "pal4/uniform"),
                                           ("big", "pal4+lut8"), ("nan", "int8"), ("nan", "prune50")])
def test_refusals_rest_on_what_coremltools_really_emits(nonfinite_packages, package, spec):
    """coremltools' own passes, run without the check, emit NaN/inf exactly where the simulation puts them."""
    import coremltools as ct
    from test_simulate_helpers import compress as coremltools_compress
    from test_simulate_helpers import decompressed_weights

    from coreml_opt.model.package import load_package
    from coreml_opt.simulate.core import handler_for
    from coreml_opt.simulate.numerics import to_working_values

    path = nonfinite_packages[package]
    weight = torch.from_numpy(load_package(path).weight_values("fc1_weight_to_fp16").astype(np.float32))
    emitted = coremltools_compress(ct.models.MLModel(str(path), skip_model_load=True), spec)
    (value,) = [v for k, v in decompressed_weights(emitted).items() if k.startswith("fc1")]
    parsed = parse_spec(spec)
    simulated = handler_for(parsed)(parsed, to_working_values(weight), "linear", "exact").weight  # unchecked
    assert np.array_equal(~np.isfinite(value.astype(np.float32)), ~torch.isfinite(simulated).numpy())
    assert (~np.isfinite(value.astype(np.float32))).any()
