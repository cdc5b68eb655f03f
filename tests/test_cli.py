"""The `coreml-opt` CLI: inspect, compress, convert, and one-line errors with nothing half-written."""
from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest

from conftest import run_cli


@pytest.fixture(scope="module")
def compressed_package(example_mlpackage, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "pal.mlpackage"
    code, stdout, stderr = run_cli("compress", str(example_mlpackage), "--spec", "pal4/g16", "-o", str(out))
    assert code == 0, stderr
    return out, stdout


def test_compress_prints_before_after_and_predicted_bytes(compressed_package):
    out, stdout = compressed_package
    assert out.is_dir()
    assert "features_7_weight_to_fp16" in stdout and "pal4/g16" in stdout
    total = [line for line in stdout.splitlines() if line.startswith("total")][0]
    numbers = [int(tok) for tok in total.split()[1:4]]
    before, after, predicted = numbers
    assert after < before / 3 and abs(after - predicted) <= 0.01 * after


def test_inspect_reports_compression_per_weight(compressed_package):
    out, _ = compressed_package
    code, stdout, _ = run_cli("inspect", str(out), "--json")
    assert code == 0
    data = json.loads(stdout)
    weights = {w["torch_name"]: w for w in data["weights"]}
    for key in ("name", "op_type", "op_name", "shape", "params", "bytes", "compression", "torch_name"):
        assert key in weights["features.7.weight"]
    assert weights["features.7.weight"]["compression"] == "palettized 4-bit (6 LUTs)"
    assert weights["features.0.weight"]["compression"] == "fp16"
    assert data["total_bytes"] == sum(w["bytes"] for w in data["weights"])
    assert 4.0 < data["bits_per_weight"] < 5.0

    code, table, _ = run_cli("inspect", str(out))
    assert code == 0 and "palettized 4-bit (6 LUTs)" in table and table.splitlines()[-1].startswith("total")

    code, text, _ = run_cli("inspect", str(out), "--csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert {r["torch_name"]: r["compression"] for r in rows}["classifier.0.weight"] == "palettized 4-bit (8 LUTs)"


def test_convert_cli_writes_package_with_torch_names(tmp_path):
    out = tmp_path / "d.mlpackage"
    code, stdout, stderr = run_cli("convert", "coreml_opt.zoo:digits_cnn", "--input-shape", "1,1,8,8", "-o", str(out))
    assert code == 0, stderr
    code, stdout, _ = run_cli("inspect", str(out), "--json")
    assert {w["torch_name"] for w in json.loads(stdout)["weights"]} >= {"features.3.weight", "classifier.0.weight"}


def _truncated_copy(src, dst):
    shutil.copytree(src, dst)
    weights = dst / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return dst


def _neuralnetwork_package(dst):
    import coremltools as ct
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    builder = NeuralNetworkBuilder([("x", datatypes.Array(4))], [("y", datatypes.Array(3))])
    builder.add_inner_product("fc", W=np.ones((3, 4)), b=None, input_channels=4, output_channels=3, has_bias=False,
                              input_name="x", output_name="y")
    ct.models.utils.save_spec(builder.spec, str(dst))
    return dst


def _plan(tmp_path, text):
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    return ["-c", str(path)]


@pytest.mark.parametrize("case, fragments", [
    ("missing", ["does not exist"]),
    ("not_package", ["not an .mlpackage", "Manifest.json"]),
    ("truncated", ["weight.bin", "is truncated", "re-export"]),
    ("neuralnetwork", ["neuralNetwork model, not an ML Program", "mlprogram"]),
    ("unknown_layer", ["layer 'features.8'", "matches no weight", "did you mean"]),
    ("int4_ios16", ["int4 needs iOS18", "the target is iOS16"]),
    ("block_not_dividing", ["block size 40 does not divide input-channel dim 32", "override this layer"]),
    ("bad_spec", ["'int3' is not a known compression", "use e.g."]),
])
def test_bad_input_is_one_line_error_and_nothing_written(case, fragments, example_mlpackage, tmp_path):
    model = str(example_mlpackage)
    args = ["--spec", "int8"]
    if case == "missing":
        model = str(tmp_path / "nope.mlpackage")
    elif case == "not_package":
        (tmp_path / "folder").mkdir()
        model = str(tmp_path / "folder")
    elif case == "truncated":
        model = str(_truncated_copy(example_mlpackage, tmp_path / "cut.mlpackage"))
    elif case == "neuralnetwork":
        model = str(_neuralnetwork_package(tmp_path / "nn.mlpackage"))
    elif case == "unknown_layer":
        args = _plan(tmp_path, "global: int8\nlayers:\n  features.8: pal4\n")
    elif case == "int4_ios16":
        args = ["--spec", "int4", "--target", "iOS16"]
    elif case == "block_not_dividing":
        args = ["--spec", "int4/block40"]  # fits no weight (a few misfits are left in fp16)
    elif case == "bad_spec":
        args = ["--spec", "int3"]
    out = tmp_path / "out" / "o.mlpackage"
    code, stdout, stderr = run_cli("compress", model, *args, "-o", str(out))
    assert code != 0, stdout
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_inspect_errors_are_one_line(tmp_path):
    code, _, stderr = run_cli("inspect", str(tmp_path / "missing.mlpackage"))
    assert code == 2 and stderr.count("\n") == 1 and "does not exist" in stderr


def test_interrupted_compress_leaves_nothing(example_mlpackage, tmp_path, monkeypatch):
    import coremltools as ct

    def interrupted(self, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(ct.models.MLModel, "save", interrupted)
    out = tmp_path / "o.mlpackage"
    code, _, stderr = run_cli("compress", str(example_mlpackage), "--spec", "int8", "-o", str(out))
    assert code == 130 and "interrupted" in stderr
    assert list(tmp_path.iterdir()) == []


def test_global_verbose_flag_reaches_the_sensitivity_subcommand(tmp_path):
    code, _, stderr = run_cli("-v", "sensitivity", "--model", "no_such_module:factory", "--input-shape", "1,1,8,8",
                              "--out", str(tmp_path / "sens"))
    assert code == 2 and "no_such_module" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "sens").exists()


def test_help_lists_every_subcommand():
    from coreml_opt.cli import build_parser

    text = build_parser().format_help()
    for command in ("sensitivity", "convert", "inspect", "compress", "example", "plan", "run", "report", "xcode-prep"):
        assert command in text


def test_failed_move_into_place_restores_the_previous_output(tmp_path, monkeypatch):
    import os

    from coreml_opt.model.package import atomic_output

    out = tmp_path / "out.mlpackage"
    out.mkdir()
    (out / "old.txt").write_text("previous")
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(src).endswith("out.mlpackage") and ".tmp" in str(src) and not str(src).endswith(".old"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    monkeypatch.setattr("coreml_opt.model.package._exchange", lambda new, old: False)  # the two-rename fallback
    with pytest.raises(OSError):
        with atomic_output(out) as tmp:
            tmp.mkdir()
            (tmp / "new.txt").write_text("new")
    assert (out / "old.txt").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mlpackage"]


def test_readme_example_job_writes_packages_plan_and_reports_accuracy(tmp_path):
    code, stdout, stderr = run_cli("example", "--out", str(tmp_path / "example"))
    assert code == 0, stderr
    assert (tmp_path / "example" / "digits.mlpackage").is_dir()
    assert (tmp_path / "example" / "digits-compressed.mlpackage").is_dir()
    assert (tmp_path / "example" / "plan.yaml").is_file()
    accuracy = {line.split()[1]: float(line.split()[-2]) for line in stdout.splitlines() if line.startswith("accuracy")}
    assert accuracy["fp32"] >= 95.0 and accuracy["compressed"] >= 95.0
    total = [line for line in stdout.splitlines() if line.startswith("total")][0].split()
    assert int(total[2]) < int(total[1]) / 2 and total[2] == total[3]  # after < before/2, after == predicted
