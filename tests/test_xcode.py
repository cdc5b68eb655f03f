"""The Xcode build-phase step: skips unchanged inputs, reruns on change, reproducible bytes, Xcode issue lines."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

from coreml_opt.errors import PlanError
from coreml_opt.plan import Plan
from coreml_opt.workflows import load_workflow
from coreml_opt.xcode import (
    declared_file_warnings,
    issue_for_error,
    prepare,
    prepare_workflow,
    resolve_arguments,
    stamp_path,
    work_dir,
)

PLAN = """\
target: iOS18
global: pal4/g16
op_types:
  linear: int4/block32
layers:
  classifier.0: int8
skip: [features.0]
"""


def _snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Relative path -> (mtime_ns, bytes) of every file and folder under ``root`` (folders: empty bytes)."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in [root, *sorted(root.rglob("*"))]}


def _contents(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _run_script_env(monkeypatch, inputs: list[Path], output: Path) -> None:
    """The environment Xcode gives a Run Script phase with these input files and one output file."""
    monkeypatch.setenv("SCRIPT_INPUT_FILE_COUNT", str(len(inputs)))
    for i, path in enumerate(inputs):
        monkeypatch.setenv(f"SCRIPT_INPUT_FILE_{i}", str(path))
    monkeypatch.setenv("SCRIPT_OUTPUT_FILE_COUNT", "1")
    monkeypatch.setenv("SCRIPT_OUTPUT_FILE_0", str(output))


@pytest.fixture
def plan_file(tmp_path) -> Path:
    path = tmp_path / "digits-plan.yaml"
    path.write_text(PLAN)
    return path


def test_second_run_does_not_compress_and_leaves_output_untouched(tmp_path, example_mlpackage, plan_file,
                                                                  monkeypatch, caplog):
    output = tmp_path / "derived" / "Digits.mlpackage"
    # First run as Xcode calls it: no arguments, files from the Run Script phase's environment.
    _run_script_env(monkeypatch, [plan_file, example_mlpackage], output)
    code, out, err = run_cli("xcode-prep")
    assert code == 0, err
    assert f"wrote {output}" in out and "error:" not in err and "warning:" not in err
    assert stamp_path(output).is_file() and not (output / stamp_path(output).name).exists()
    before = _snapshot(output)

    caplog.set_level(logging.INFO, logger="coreml_opt")
    result = prepare(example_mlpackage, plan_file, output, env=os.environ)
    assert result.status == "up-to-date" and result.report is None and result.warnings == []
    assert not any("compressing" in r.getMessage() for r in caplog.records)
    assert any("up to date" in r.getMessage() for r in caplog.records)

    code, out, err = run_cli("xcode-prep", str(example_mlpackage), "-c", str(plan_file), "-o", str(output))
    assert code == 0 and "is up to date" in out and "wrote" not in out
    assert _snapshot(output) == before  # bytes and mtimes of every file and folder


def test_changed_plan_or_tampered_output_reruns(tmp_path, example_mlpackage, plan_file):
    output = tmp_path / "Digits.mlpackage"
    first = prepare(example_mlpackage, plan_file, output)
    assert first.status == "compressed"
    int4 = {w.name for w in first.report.weights if w.spec == "int4/block32"}
    plan_file.write_text(PLAN.replace("linear: int4/block32", "linear: int8"))
    second = prepare(example_mlpackage, plan_file, output)
    assert second.status == "compressed"
    assert int4 and {w.name for w in second.report.weights if w.spec == "int8"} >= int4
    assert {w.name: w.compression for w in second.report.weights if w.name in int4} != \
           {w.name: w.compression for w in first.report.weights if w.name in int4}
    (output / "Manifest.json").write_text((output / "Manifest.json").read_text() + " ")
    assert prepare(example_mlpackage, plan_file, output).status == "compressed"
    assert prepare(example_mlpackage, plan_file, output).status == "up-to-date"


def test_same_inputs_give_byte_identical_packages_across_processes(tmp_path, example_mlpackage, plan_file):
    here = tmp_path / "a" / "Digits.mlpackage"
    there = tmp_path / "b" / "Other.mlpackage"
    prepare(example_mlpackage, plan_file, here)
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "coreml_opt", "xcode-prep", str(example_mlpackage),
                           "-c", str(plan_file), "-o", str(there)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    a, b = _contents(here), _contents(there)
    assert sorted(a) == ["Data/com.apple.CoreML/model.mlmodel", "Data/com.apple.CoreML/weights/weight.bin",
                         "Manifest.json"]
    assert a == b


def test_bad_plan_prints_xcode_error_with_plan_line_and_writes_nothing(tmp_path, example_mlpackage):
    plan = tmp_path / "plan.yaml"
    plan.write_text("target: iOS18\nglobal: pal4/g16\nlayers:\n  featurs.3: int8\n")
    output = tmp_path / "out" / "Digits.mlpackage"
    code, out, err = run_cli("xcode-prep", str(example_mlpackage), "-c", str(plan), "-o", str(output))
    assert code != 0
    assert err.startswith(f"{plan}:4: error: layer 'featurs.3': matches no weight in the model; did you mean "
                          "'features.3'"), err
    assert not output.exists() and not stamp_path(output).exists()


@pytest.mark.parametrize("text, line, fragment", [
    ("global: pal4\nop_types:\n  conv: pal3/g7x\n", 3, "op_types.conv"),
    ("global: pal4\nlayers:\n  a: int8\n  b: int5\n", 4, "layers.b"),
    ("target: iOS18\nglobl: pal4\n", 2, "unknown field(s) ['globl']"),
    ("global: int8\ntarget: iOS99\n", 2, "unknown deployment target 'iOS99'"),
    ("global: int8\nkmeans: slow\n\n", 2, "kmeans 'slow'"),
    ("global: int8\nlayers:\n  a: [int8\n", 4, "not valid YAML"),
])
def test_plan_errors_point_at_their_yaml_line(tmp_path, text, line, fragment):
    plan = tmp_path / "plan.yaml"
    plan.write_text(text)
    with pytest.raises(Exception) as info:
        Plan.load(plan)
    issue = issue_for_error(info.value, plan)
    assert (issue.file, issue.line) == (plan, line)
    assert str(issue).startswith(f"{plan}:{line}: error: ") and fragment in str(issue)


def test_errors_without_a_plan_line_are_plain_xcode_errors(tmp_path, plan_file):
    code, _, err = run_cli("xcode-prep", str(tmp_path / "missing.mlpackage"), "-c", str(plan_file),
                           "-o", str(tmp_path / "o.mlpackage"))
    assert code != 0 and err.startswith(f"error: {tmp_path / 'missing.mlpackage'}: does not exist")
    issue = issue_for_error(PlanError("weight 'w'", "was skipped by coremltools", "choose another spec"), plan_file)
    assert str(issue) == "error: weight 'w': was skipped by coremltools; choose another spec"


def test_missing_arguments_and_undeclared_files(tmp_path):
    env = {"SCRIPT_INPUT_FILE_COUNT": "1", "SCRIPT_INPUT_FILE_0": "/p/Models/Digits.mlpackage"}
    with pytest.raises(Exception, match="plan"):
        resolve_arguments(None, None, "/d/out.mlpackage", env)
    code, _, err = run_cli("xcode-prep")
    assert code != 0 and err.startswith("error: xcode-prep MODEL: was not given")
    model, plan, output = Path("/p/Models/Digits.mlpackage"), Path("/p/plan.yaml"), Path("/d/Digits.mlpackage")
    warnings = [str(w) for w in declared_file_warnings([model, plan], output, env)]
    assert len(warnings) == 2 and all(w.startswith("warning: ") for w in warnings)
    assert "/p/plan.yaml is not among the Run Script phase's Input Files" in warnings[0]
    assert "Output Files" in warnings[1]
    assert declared_file_warnings([model, plan], output, {}) == []


# ---- -w workflow.yaml -------------------------------------------------------------------------
WORKFLOW = """\
name: digits-xcode
model: coreml_opt.zoo:digits_cnn
input_shape: [1, 1, 8, 8]
target: iOS18
plan: {global: pal4}
eval: {data: digits-test, metric: accuracy}
stages:
  - data_free: {}
"""


def _error_line(err: str) -> str:
    """The one Xcode ``error:`` line of stderr (in-process runs may also show coremltools' progress bars)."""
    lines = [line for line in err.splitlines() if "error: " in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def workflow_file(tmp_path) -> Path:
    path = tmp_path / "Models" / "digits-xcode.yaml"
    path.parent.mkdir()
    path.write_text(WORKFLOW)
    return path


@pytest.mark.slow  # runs the workflow end to end several times
def test_workflow_second_run_does_no_work_and_same_inputs_give_identical_bytes(tmp_path, workflow_file, plan_file,
                                                                               monkeypatch, caplog):
    output = tmp_path / "derived" / "Digits.mlpackage"
    # As Xcode calls it: a plan and the workflow among the inputs; the one with stages: is taken as -w.
    _run_script_env(monkeypatch, [plan_file, workflow_file], output)
    code, out, err = run_cli("xcode-prep")
    assert code == 0, err
    assert f"wrote {output} (stage data_free of workflow digits-xcode" in out and "warning:" not in err
    assert (work_dir(output) / "report.json").is_file() and (work_dir(output) / "data_free.mlpackage").is_dir()
    before = _snapshot(output)

    caplog.set_level(logging.INFO, logger="coreml_opt")
    result = prepare_workflow(workflow_file, output, env=os.environ)
    assert result.status == "up-to-date" and result.workflow is None and result.warnings == []
    assert not any("running" in r.getMessage() for r in caplog.records)
    code, out, err = run_cli("xcode-prep", "-w", str(workflow_file), "-o", str(output))
    assert code == 0 and "is up to date" in out and "wrote" not in out, err
    assert _snapshot(output) == before  # bytes and mtimes of every file and folder

    there = tmp_path / "elsewhere" / "Other.mlpackage"  # another process, another output path
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCRIPT_")}
    done = subprocess.run([sys.executable, "-m", "coreml_opt", "xcode-prep", "-w", str(workflow_file),
                           "-o", str(there)], env={**env, "PYTHONHASHSEED": "4321"}, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert sorted(_contents(output)) == ["Data/com.apple.CoreML/model.mlmodel",
                                         "Data/com.apple.CoreML/weights/weight.bin", "Manifest.json"]
    assert _contents(output) == _contents(there)


@pytest.mark.slow  # runs the workflow end to end several times
def test_changed_workflow_reruns_and_a_failing_stage_leaves_output_untouched(tmp_path, workflow_file):
    output = tmp_path / "Digits.mlpackage"
    first = prepare_workflow(workflow_file, output)
    assert first.status == "compressed" and first.stage == "data_free"
    pal4 = _contents(output)
    workflow_file.write_text(WORKFLOW.replace("global: pal4", "global: pal2"))
    second = prepare_workflow(workflow_file, output)
    assert second.status == "compressed"
    weight_bytes = [r.workflow.stages[0].outcome.inventory.total_bytes for r in (first, second)]
    assert weight_bytes[1] < weight_bytes[0] and _contents(output) != pal4
    before, stamp = _snapshot(output), stamp_path(output).read_bytes()

    empty = tmp_path / "calibration-data-without-images"  # exists (checked at load), fails when the stage reads it
    empty.mkdir()
    workflow_file.write_text(WORKFLOW.replace("global: pal4", "global: pal2")
                             + f"  - calibration: {{method: skm, data: {empty}}}\n")
    code, out, err = run_cli("xcode-prep", "-w", str(workflow_file), "-o", str(output))
    assert code != 0 and "wrote" not in out
    assert _error_line(err).startswith(f"{workflow_file}:9: error: stages[1]: stage calibration-skm failed: DataError: ")
    assert _snapshot(output) == before and stamp_path(output).read_bytes() == stamp
    report = (work_dir(output) / "report.json").read_text()
    assert '"failed_stage": "calibration-skm"' in report


def test_workflow_errors_point_at_their_yaml_line(tmp_path, workflow_file, example_mlpackage):
    output = tmp_path / "out" / "Digits.mlpackage"
    workflow_file.write_text(WORKFLOW.replace("  - data_free: {}", "  - data_free: {kmeanz: fast}"))
    code, _, err = run_cli("xcode-prep", "-w", str(workflow_file), "-o", str(output))
    assert code != 0
    assert _error_line(err).startswith(f"{workflow_file}:8: error: stages[0].data_free.kmeanz: is not a known key")
    assert not output.exists() and not stamp_path(output).exists() and not work_dir(output).exists()

    cases = [("eval: {data: digits-test, metric: accuracy}\n", "eval: {data: digits-test, metrc: accuracy}\n", 6,
              "eval.metrc: is not a known key"),
             ("target: iOS18\n", "target: iOS99\n", 4, "target: unknown deployment target 'iOS99'"),
             ("plan: {global: pal4}\n", "plan:\n  layers: {a: int8}\n  global: pal9\n", 7,
              "plan: global: unsupported palette size")]
    for old, new, line, fragment in cases:
        workflow_file.write_text(WORKFLOW.replace(old, new))
        with pytest.raises(Exception) as info:
            load_workflow(workflow_file.absolute())
        issue = str(issue_for_error(info.value, workflow=workflow_file))
        assert issue.startswith(f"{workflow_file}:{line}: error: {fragment}"), issue

    plan = workflow_file.parent / "plan.yaml"  # a plan file the workflow names: its errors point into it
    plan.write_text("global: pal4\nlayers:\n  featurs.3: int8\n")
    workflow_file.write_text(WORKFLOW.replace("plan: {global: pal4}", "plan: plan.yaml"))
    code, _, err = run_cli("xcode-prep", "-w", str(workflow_file), "-o", str(output))
    assert code != 0 and _error_line(err).startswith(f"{plan}:3: error: layer 'featurs.3': matches no weight")
    assert not output.exists()

    code, _, err = run_cli("xcode-prep", str(example_mlpackage), "-w", str(workflow_file), "-o", str(output))
    assert code != 0 and _error_line(err).startswith(f"error: {example_mlpackage}: is an .mlpackage, but a workflow "
                                                     "starts from the PyTorch factory")
    code, _, err = run_cli("xcode-prep", "-w", str(workflow_file), "--stage", "finetune", "-o", str(output))
    assert code != 0 and "--stage finetune: is not a stage of" in err and "['data_free']" in err
    code, _, err = run_cli("xcode-prep", str(example_mlpackage), "-c", str(plan), "--stage", "data_free",
                           "-o", str(output))
    assert code != 0 and _error_line(err).startswith("error: --stage data_free: applies to workflows only")


def test_workflow_inputs_are_found_among_script_files(tmp_path, workflow_file, plan_file):
    env = {"SCRIPT_INPUT_FILE_COUNT": "3", "SCRIPT_INPUT_FILE_0": "/p/Models/Digits.mlpackage",
           "SCRIPT_INPUT_FILE_1": str(plan_file), "SCRIPT_INPUT_FILE_2": str(workflow_file),
           "SCRIPT_OUTPUT_FILE_COUNT": "1", "SCRIPT_OUTPUT_FILE_0": "/d/Digits.mlpackage"}
    assert resolve_arguments(None, None, None, env) == (None, None, str(workflow_file), "/d/Digits.mlpackage")
    assert resolve_arguments(None, str(plan_file), None, env) == (
        "/p/Models/Digits.mlpackage", str(plan_file), None, "/d/Digits.mlpackage")
    without = {**env, "SCRIPT_INPUT_FILE_COUNT": "2"}
    assert resolve_arguments(None, None, None, without).plan == str(plan_file)


def test_a_compensated_plan_takes_its_calibration_data_and_reruns_when_the_data_change(tmp_path, example_mlpackage):
    """A plan with +gptq/+bc specs (what `plan` writes from a sweep with data) compresses from --data, exactly as
    `compress --data` does; the data are an input of the stamp; without them, one line and nothing written."""
    import shutil

    plan = tmp_path / "plan.yaml"
    plan.write_text("target: iOS18\nglobal: pal4+gptq+bc\n")
    data = tmp_path / "calib"
    shutil.copytree(Path(__file__).resolve().parents[1] / "calibration_data" / "digits", data)
    output = tmp_path / "derived" / "Digits.mlpackage"
    args = ["xcode-prep", str(example_mlpackage), "-c", str(plan), "-o", str(output)]
    code, out, err = run_cli(*args)
    assert code == 2 and "need calibration data" in err and "--data" in err and err.count("\n") == 1, err
    assert not output.exists() and not stamp_path(output).exists()

    code, out, err = run_cli(*args, "--data", str(data))
    assert code == 0 and f"wrote {output}" in out, err
    reference = tmp_path / "reference.mlpackage"
    code, _, err = run_cli("compress", str(example_mlpackage), "-c", str(plan), "--data", str(data), "-o",
                           str(reference))
    assert code == 0, err
    weights = "Data/com.apple.CoreML/weights/weight.bin"
    assert _contents(output)[weights] == _contents(reference)[weights]

    code, out, err = run_cli(*args, "--data", str(data))
    assert code == 0 and "is up to date (model, plan, data" in out, err
    first, second = sorted(data.glob("*.png"))[:2]
    shutil.copyfile(second, first)  # other calibration data: other statistics, other biases
    code, out, err = run_cli(*args, "--data", str(data))
    assert code == 0 and f"wrote {output}" in out, err
    assert _contents(output)[weights] != _contents(reference)[weights]

    workflow = Path(__file__).resolve().parents[1] / "workflows" / "digits-pal2.yaml"
    code, out, err = run_cli("xcode-prep", "-w", str(workflow), "-o", str(tmp_path / "w.mlpackage"), "--data", str(data))
    assert code == 2 and "applies to plans (-c) only" in err and err.count("\n") == 1, err
