"""`coreml-opt eval`: a package scored on Linux by the runtime; bad packages are one line and exit 2."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import runtime_models as rm
from coreml_opt import zoo
from coreml_opt.cli import run
from coreml_opt.data import load_dataset

DATA = "calibration_data/digits"


def test_eval_json_accuracy_matches_the_torch_model_and_states_the_drop(example_mlpackage, capsys):
    assert run(["eval", str(example_mlpackage), "--data", DATA, "--metric", "accuracy",
                "--reference", "coreml_opt.zoo:digits_cnn", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    data = load_dataset(DATA)
    with torch.no_grad():
        expected = zoo.evaluate_accuracy(zoo.digits_cnn(), data.x, data.y)
    assert abs(result["metric"] - expected) <= 1 / len(data)  # fp16 weights may flip at most one sample
    assert result["reference"] == pytest.approx(expected)
    assert result["drop"] == pytest.approx(result["reference"] - result["metric"])


def test_eval_top1_against_itself_is_one_in_both_precisions(example_mlpackage, capsys):
    for precision in ("fp32", "fp16"):
        assert run(["eval", str(example_mlpackage), "--data", DATA, "--metric", "top1", "--precision", precision,
                    "--reference", str(example_mlpackage), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["metric"] == 1.0


def _one_line_exit_2(argv, capsys, fragment):
    capsys.readouterr()  # drop what building the test input printed
    assert run(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in captured.err, captured.err
    assert captured.out == ""


def test_eval_unknown_op_is_one_line(tmp_path, capsys):
    class Cumulative(torch.nn.Module):
        def forward(self, x):
            return torch.cumsum(x, dim=1)

    path = rm.convert_model(Cumulative().eval(), torch.rand(1, 5), tmp_path / "cumsum.mlpackage")
    _one_line_exit_2(["eval", str(path), "--data", DATA, "--metric", "accuracy"], capsys, "'cumsum'")


def test_eval_neuralnetwork_and_missing_weights_are_one_line(example_mlpackage, tmp_path, capsys):
    import coremltools as ct

    traced = torch.jit.trace(zoo.digits_cnn().eval(), torch.rand(*zoo.EXAMPLE_INPUT_SHAPE))
    nn_model = ct.convert(traced, inputs=[ct.TensorType(shape=zoo.EXAMPLE_INPUT_SHAPE)], convert_to="neuralnetwork")
    nn_model.save(str(tmp_path / "digits.mlmodel"))
    _one_line_exit_2(["eval", str(tmp_path / "digits.mlmodel"), "--data", DATA], capsys, "neuralnetwork")
    broken = tmp_path / "broken.mlpackage"
    shutil.copytree(example_mlpackage, broken)
    (broken / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").unlink()
    _one_line_exit_2(["eval", str(broken), "--data", DATA], capsys, "weight.bin")


def test_eval_wrong_data_shape_and_missing_reference_are_one_line(example_mlpackage, tmp_path, capsys):
    import numpy as np

    np.savez(tmp_path / "d.npz", x=np.zeros((4, 3, 8, 8), np.float32))
    _one_line_exit_2(["eval", str(example_mlpackage), "--data", str(tmp_path / "d.npz")], capsys, "shape")
    _one_line_exit_2(["eval", str(example_mlpackage), "--data", DATA, "--metric", "kl"], capsys, "--reference")


def test_help_lists_eval():
    from coreml_opt.cli import build_parser

    assert "eval" in build_parser().format_help()
