"""Paths named in YAML files resolve beside the file; output paths fail in one line and are never left
partial, empty or littered with temp folders (issue 11, kinds 7 and 8)."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from coreml_opt.errors import DataError, OutputError, PlanError
from coreml_opt.model.package import atomic_output, clean_stale_outputs, load_package
from coreml_opt.plan import Plan
from coreml_opt.workflows import load_workflow

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


def _one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("error")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def _temp_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


# ---- kind 7: every relative path in a YAML file resolves beside that file ------------------------------
@pytest.fixture
def decoy_cwd(tmp_path, monkeypatch) -> Path:
    """A working directory holding files named like the ones the YAML files name (which must not be used)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "plan.yaml").write_text("global: int8\n")
    np.savez(cwd / "calib.npz", x=np.zeros((2, 1, 8, 8), np.float32))
    monkeypatch.chdir(cwd)
    return cwd


def test_workflow_paths_resolve_beside_the_workflow_not_the_cwd(tmp_path, decoy_cwd):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "plan.yaml").write_text("global: pal4\n")
    np.savez(folder / "calib.npz", x=np.ones((2, 1, 8, 8), np.float32))
    (folder / "wf.yaml").write_text(textwrap.dedent("""\
        model: coreml_opt.zoo:digits_cnn
        input_shape: [1, 1, 8, 8]
        plan: plan.yaml
        eval: {data: calib.npz, metric: kl}
        auto_plan: {sensitivity: {data: calib.npz}, budget: {bpw: 4}}
        stages:
          - calibration: {method: skm, data: calib.npz}
          - finetune: {method: dkm, data: digits-train}
        out: results
        """))
    workflow = load_workflow(folder / "wf.yaml")
    assert str(workflow.plan.global_spec) == "pal4"  # not the cwd's int8 plan
    beside = str(folder / "calib.npz")
    assert workflow.eval_data == beside and workflow.stages[0].options["data"] == beside
    assert workflow.auto_plan["sensitivity"]["data"] == beside
    assert workflow.stages[1].options["data"] == "digits-train"  # built-in names stay names
    assert workflow.out == folder / "results"


def test_xcode_plan_file_of_a_workflow_is_the_one_beside_it(tmp_path, decoy_cwd):
    from coreml_opt.xcode_issues import workflow_plan_file

    workflow = tmp_path / "models" / "wf.yaml"
    assert workflow_plan_file({"plan": "plan.yaml"}, workflow) == (tmp_path / "models" / "plan.yaml").absolute()


def test_sweep_file_data_and_out_resolve_beside_the_file(tmp_path, decoy_cwd):
    from coreml_opt.sensitivity.__main__ import _from_yaml, build_parser

    folder = tmp_path / "sweeps"
    folder.mkdir()
    sweep = folder / "s.yaml"
    sweep.write_text("model: coreml_opt.zoo:digits_cnn\ninput_shape: [1, 1, 8, 8]\ndata: calib.npz\nout: res\n")
    parser = build_parser()
    args = _from_yaml(str(sweep), parser.parse_args([str(sweep)]), parser)
    assert args.data == str(folder / "calib.npz") and args.out == str(folder / "res")
    sweep.write_text("model: coreml_opt.zoo:digits_cnn\ninput_shape: [1, 1, 8, 8]\n"
                     "data: coreml_opt.sensitivity.examples:digits_heldout\n")
    args = _from_yaml(str(sweep), parser.parse_args([str(sweep)]), parser)
    assert args.data == "coreml_opt.sensitivity.examples:digits_heldout"  # factories stay factories


def test_paths_beside_a_yaml_file_are_normalised(tmp_path, decoy_cwd):
    """``out: ../sweeps_out/digits`` prints as ``…/sweeps_out/digits``, not ``…/sweeps/../sweeps_out/digits``."""
    from coreml_opt.sensitivity.__main__ import _from_yaml, build_parser

    folder = tmp_path / "sweeps"
    folder.mkdir()
    sweep = folder / "s.yaml"
    sweep.write_text("model: coreml_opt.zoo:digits_cnn\ninput_shape: [1, 1, 8, 8]\n"
                     "data: ./data/../calib.npz\nout: ../sweeps_out/digits\n")
    parser = build_parser()
    args = _from_yaml(str(sweep), parser.parse_args([str(sweep)]), parser)
    assert args.out == str(tmp_path / "sweeps_out" / "digits") and args.data == str(folder / "calib.npz")
    (folder / "wf.yaml").write_text("model: coreml_opt.zoo:digits_cnn\ninput_shape: [1, 1, 8, 8]\n"
                                    "plan: {global: pal4}\nstages: [{data_free: {}}]\nout: ../out/./wf\n")
    assert load_workflow(folder / "wf.yaml").out == tmp_path / "out" / "wf"
    assert ".." not in str(load_workflow(folder / "wf.yaml").out)


def test_bundled_yaml_files_name_paths_that_exist_beside_them():
    for path in [*(ROOT / "workflows").glob("*.yaml"), *(ROOT / "sensitivity").glob("*.yaml")]:
        text = path.read_text()
        for line in text.splitlines():
            if "calibration_data/" in line:
                assert "../calibration_data/" in line, (path, line)
                assert (path.parent / "../calibration_data/digits").is_dir()


@pytest.mark.parametrize("argv, fragment", [
    (["compress", "{model}", "--spec", "int8", "-o", "{tmp}/x.mlmodel"], "x.mlmodel: is an .mlmodel path"),
    (["compress", "{model}", "--spec", "int8", "-o", "{tmp}/out-noext"], "out-noext: does not end in .mlpackage"),
    (["convert", "coreml_opt.zoo:digits_cnn", "--input-shape", "1,1,8,8", "-o", "{tmp}/foo"],
     "foo: does not end in .mlpackage"),
])
def test_output_paths_without_the_mlpackage_suffix_are_one_line(argv, fragment, example_mlpackage, tmp_path):
    argv = [a.format(model=example_mlpackage, tmp=tmp_path) for a in argv]
    code, _, err = run_cli(*argv)
    _one_line_error(code, err, fragment, ".mlpackage")
    assert list(tmp_path.iterdir()) == []


# ---- kind 8: keys inside plan mappings, unwritable outputs, kills -------------------------------------
def test_unknown_op_type_in_a_plan_is_one_line_with_the_known_ones(example_mlpackage, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("global: int8\nop_types: {Linear: pal4}\n")
    code, _, err = run_cli("compress", str(example_mlpackage), "-c", str(plan), "-o", str(tmp_path / "o.mlpackage"))
    _one_line_error(code, err, "op_types.Linear", "is not a Core ML op type", "did you mean 'linear'", "conv")
    assert not (tmp_path / "o.mlpackage").exists()
    with pytest.raises(PlanError):
        Plan(op_types={"Conv2d": Plan.from_spec("int8").global_spec})
    assert Plan.from_dict({"op_types": {"linear": "pal4"}}).op_types  # the real name still works


def test_output_inside_the_input_package_is_refused(example_mlpackage, tmp_path):
    model = tmp_path / "in.mlpackage"
    shutil.copytree(example_mlpackage, model)
    before = sorted(str(p.relative_to(model)) for p in model.rglob("*"))
    for output in (model / "Data" / "out.mlpackage", model):
        code, _, err = run_cli("compress", str(model), "--spec", "int8", "-o", str(output))
        _one_line_error(code, err, str(output))
    assert sorted(str(p.relative_to(model)) for p in model.rglob("*")) == before
    from coreml_opt.model.package import check_package_output

    with pytest.raises(OutputError, match="holds the input model"):  # replacing it would delete the input
        check_package_output(tmp_path / "x.mlpackage", tmp_path / "x.mlpackage" / "in.mlpackage")


@pytest.fixture
def report_dir(example_mlpackage, tmp_path) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copytree(example_mlpackage, folder / "digits.mlpackage")
    return folder


def _commands(model: Path, output_dir: Path, run_dir: Path) -> dict[str, list[str]]:
    return {"compress": ["compress", str(model), "--spec", "int8", "-o", str(output_dir / "o.mlpackage")],
            "convert": ["convert", "coreml_opt.zoo:digits_cnn", "--input-shape", "1,1,8,8",
                        "-o", str(output_dir / "o.mlpackage")],
            "report": ["report", str(run_dir), "--no-measure", "-o", str(output_dir / "r.html")]}


@pytest.mark.parametrize("command", ["compress", "convert", "report"])
def test_output_folder_that_cannot_be_created_is_one_line(command, example_mlpackage, report_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(*_commands(example_mlpackage, blocker / "sub", report_dir)[command])
    _one_line_error(code, err, "cannot be written: a folder on its path is a file", str(blocker / "sub"))
    if command != "report":
        assert "Running" not in err  # refused before any work
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("command", ["compress", "convert", "report"])
def test_read_only_output_folder_is_one_line(command, example_mlpackage, report_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, _, err = run_cli(*_commands(example_mlpackage, locked, report_dir)[command])
    finally:
        locked.chmod(0o755)
    _one_line_error(code, err, "cannot be written", "permission denied")
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("command, target", [("compress", "coreml_opt.compress.normalize_package"),
                                             ("report", "pathlib.Path.write_text"),
                                             ("convert", "coreml_opt.model.package.os.replace")])
def test_full_disk_while_writing_is_one_line_and_leaves_nothing(command, target, example_mlpackage, report_dir,
                                                                 tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[0]) if args else None)

    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(target, disk_full)
    code, _, err = run_cli(*_commands(example_mlpackage, out, report_dir)[command])
    _one_line_error(code, err, "cannot be written: the disk is full", "free space")
    assert list(out.iterdir()) == []


def test_input_read_errors_are_not_reported_as_the_output(tmp_path):
    with pytest.raises(PermissionError):
        with atomic_output(tmp_path / "o.txt") as tmp:
            raise PermissionError(errno.EACCES, "Permission denied", "/some/input.npz")
    assert list(tmp_path.iterdir()) == []


_HOLD = """
import os, signal, sys
from pathlib import Path
from coreml_opt.model import package

out, mode = Path(sys.argv[1]), sys.argv[2]
def die(*args):
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "writing":
    with package.atomic_output(out) as tmp:
        tmp.mkdir(); (tmp / "new").write_text("partial")
        print("ready", flush=True); sys.stdin.read()
elif mode == "between-renames":  # no RENAME_EXCHANGE: old moved aside, killed before the new one moves in
    package._exchange = lambda new, old: False
    real = os.replace
    def replace(src, dst):
        real(src, dst)
        if str(dst).endswith(".old"):
            die()
    package.os.replace = replace
    with package.atomic_output(out) as tmp:
        tmp.mkdir(); (tmp / "new").write_text("new")
elif mode == "after-exchange":
    real = package._exchange
    package._exchange = lambda new, old: real(new, old) and die()
    with package.atomic_output(out) as tmp:
        tmp.mkdir(); (tmp / "new").write_text("new")
"""


def _run_holder(tmp_path: Path, out: Path, mode: str) -> None:
    script = tmp_path / "hold.py"
    script.write_text(_HOLD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script), str(out), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env, text=True)
    if mode == "writing":
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()
    proc.stdin.close()
    assert proc.returncode == -signal.SIGKILL


def _old_output(folder: Path) -> Path:
    out = folder / "o.mlpackage"
    out.mkdir()
    (out / "old").write_text("old")
    return out


def test_killed_write_keeps_the_old_output_and_its_temp_folder_goes_at_the_next_write(tmp_path, example_mlpackage):
    folder = tmp_path / "out"
    folder.mkdir()
    out = _old_output(folder)
    _run_holder(tmp_path, out, "writing")
    assert (out / "old").read_text() == "old" and len(_temp_folders(folder)) == 1  # killed mid-write
    code, _, err = run_cli("compress", str(example_mlpackage), "--spec", "int8", "-o", str(out))  # the next run
    assert code == 0, err
    assert _temp_folders(folder) == [] and load_package(out, load_weights=False).inventory.weights


def test_kill_between_the_two_renames_puts_the_old_output_back(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    out = _old_output(folder)
    _run_holder(tmp_path, out, "between-renames")
    assert not out.exists() and len(_temp_folders(folder)) == 1  # the window the fallback leaves
    assert clean_stale_outputs(out) and (out / "old").read_text() == "old" and _temp_folders(folder) == []


def test_the_old_output_is_swapped_for_the_new_in_one_step(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    out = _old_output(folder)
    _run_holder(tmp_path, out, "after-exchange")  # killed right after the swap, before cleaning up
    assert sorted(os.listdir(out)) == ["new"]
    clean_stale_outputs(out)
    assert _temp_folders(folder) == [] and sorted(os.listdir(out)) == ["new"]


def test_a_live_writers_temp_folder_is_left_alone(tmp_path):
    out = tmp_path / "o.mlpackage"
    with atomic_output(out) as tmp:
        tmp.mkdir()
        assert clean_stale_outputs(out) == [] and len(_temp_folders(tmp_path)) == 1
    assert _temp_folders(tmp_path) == []


# ---- kind 8: sweep.json data paths -------------------------------------------------------------------
def test_sweep_json_data_path_works_from_another_cwd_and_names_sweep_json_when_missing(tmp_path, monkeypatch,
                                                                                         digits_data):
    from coreml_opt.planning import PlanningSession
    from coreml_opt.sensitivity import analyse

    work = tmp_path / "work"
    work.mkdir()
    x_test, y_test = digits_data[2][:64], digits_data[3][:64]
    np.savez(work / "data64.npz", x=np.asarray(x_test, np.float32), y=np.asarray(y_test))
    monkeypatch.chdir(work)
    analyse("coreml_opt.zoo:digits_cnn", (1, 1, 8, 8), "data64.npz", "accuracy", candidates=["int8"],
            out_dir="sweep", progress=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    session = PlanningSession.open(work / "sweep")
    assert session.can_measure
    (work / "data64.npz").unlink()
    with pytest.raises(DataError) as info:
        PlanningSession.open(work / "sweep")
    assert str(info.value).startswith(f"{work / 'sweep' / 'sweep.json'}: data ") and "data64.npz" in str(info.value)


def test_temp_folders_left_by_older_versions_go_once_an_hour_old(tmp_path):
    out = tmp_path / "o.mlpackage"
    old, fresh, other = (tmp_path / ".o.mlpackage.ab12cd34.tmp", tmp_path / ".o.mlpackage.zz99yy88.tmp",
                         tmp_path / ".o.mlpackage.x.mlpackage.ab12cd34.tmp")  # another output's name
    for folder in (old, fresh, other):
        (folder / "o.mlpackage").mkdir(parents=True)
        if folder is not fresh:
            os.utime(folder, (0, 0))  # written in 1970: long stale
    with atomic_output(out) as tmp:
        tmp.write_text("x")
    assert _temp_folders(tmp_path) == sorted([fresh.name, other.name]) and out.read_text() == "x"


@pytest.mark.parametrize("argv", [["run", str(ROOT / "workflows" / "digits-pal2.yaml"), "--out", "{out}"],
                                  ["example", "--out", "{out}"],
                                  ["sensitivity", "--model", "coreml_opt.zoo:digits_cnn", "--input-shape", "1,1,8,8",
                                   "--candidates", "int8", "--out", "{out}"]])
def test_output_folders_that_cannot_be_created_are_one_line(argv, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(*[a.format(out=blocker / "sub") for a in argv])
    _one_line_error(code, err, "cannot be written: a folder on its path is a file", str(blocker / "sub"))


def test_a_file_factory_recorded_in_sweep_json_is_found_from_any_cwd(tmp_path, monkeypatch):
    """sweep.json stores a ``path/to/file.py:fn`` model and data factory relative to itself; ``plan`` read them
    against the cwd (it passed only where the relative path happened to resolve from the repository root)."""
    import json
    import subprocess
    import sys

    models = tmp_path / "models"
    models.mkdir()
    (models / "my_zoo.py").write_text("def digits_cnn():\n    from coreml_opt import zoo\n\n    return zoo.digits_cnn()\n\n\n"
                                      "def digits_data():\n    from coreml_opt.sensitivity.examples import digits_heldout"
                                      "\n\n    return digits_heldout()\n")
    sens = tmp_path / "deep" / "er" / "sens"
    data = f"{models / 'my_zoo.py'}:digits_data"
    code, _, err = run_cli("sensitivity", "--model", f"{models / 'my_zoo.py'}:digits_cnn", "--input-shape", "1,1,8,8",
                           "--data", data, "--metric", "kl", "--candidates", "int8,pal2", "--out", str(sens),
                           "--no-progress")
    assert code == 0, err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([sys.executable, "-m", "coreml_opt.cli", "plan", str(sens), "--bpw", "6", "--json"],
                          cwd=elsewhere, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)
