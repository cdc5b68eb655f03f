"""What the commands print: only JSON under --json, quiet coremltools, one line on Ctrl-C, files named, units."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def accuracy_sweep(tmp_path_factory, digits_model) -> Path:
    """A small finished accuracy sweep of the digits CNN (real analyser, two candidates)."""
    from coreml_opt.sensitivity import analyse

    out = tmp_path_factory.mktemp("acc-sweep")
    analyse("coreml_opt.zoo:digits_cnn", (1, 1, 8, 8), "coreml_opt.sensitivity.examples:digits_heldout", "accuracy",
            candidates=["int8", "pal2"], out_dir=out, progress=False)
    return out


def _cli_subprocess(*argv: str, extra_path: Path | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m coreml_opt.cli ARGV` in a fresh interpreter (real fd 1/2, import-time warnings included)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in (ROOT, extra_path) if p))
    env.pop("TQDM_DISABLE", None)
    return subprocess.run([sys.executable, "-m", "coreml_opt.cli", *argv], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=600)


# ---- kind 11: noise and silence -----------------------------------------------------------------
def test_plan_json_is_the_only_stdout_even_when_the_solver_writes_from_c(accuracy_sweep, monkeypatch, capfd):
    import scipy.optimize

    real_milp = scipy.optimize.milp

    def chatty_milp(*args, **kwargs):  # HiGHS writes MIP diagnostics with printf, below Python's sys.stdout
        os.write(1, b"HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();\n")
        return real_milp(*args, **kwargs)

    monkeypatch.setattr(scipy.optimize, "milp", chatty_milp)
    code, out, err = run_cli("plan", str(accuracy_sweep), "--max-drop", "0.05", "--json")
    assert code == 0, err
    json.loads(out)
    assert "Highs" not in capfd.readouterr().out


def test_ctrl_c_during_a_sweep_is_one_line_and_exit_130(tmp_path):
    (tmp_path / "interrupting_data.py").write_text(
        "def digits():\n    raise KeyboardInterrupt  # as if the user pressed Ctrl-C while data loads\n")
    done = _cli_subprocess("sensitivity", "--model", "coreml_opt.zoo:digits_cnn", "--input-shape", "1,1,8,8",
                           "--data", "interrupting_data:digits", "--candidates", "int8", "--out",
                           str(tmp_path / "sens"), extra_path=tmp_path)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1
    assert "interrupted" in done.stderr and "resume" in done.stderr


def test_run_is_quiet_and_names_every_package_it_wrote(tmp_path):
    doc = {"name": "quiet", "model": "coreml_opt.zoo:digits_cnn", "input_shape": [1, 1, 8, 8],
           "plan": {"global": "pal2"}, "eval": {"data": "digits-test", "metric": "accuracy"},
           "stages": [{"data_free": {}},
                      {"calibration": {"method": "skm", "data": str(ROOT / "calibration_data" / "digits"),
                                       "samples": 16, "batch_size": 8}}],
           "out": str(tmp_path / "out")}
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump(doc))
    done = _cli_subprocess("run", str(tmp_path / "wf.yaml"))
    assert done.returncode == 0, done.stderr
    for noise in ("INFO", "sensitive_k_means", "Failed to load", "Warning", "it/s"):
        assert noise not in done.stderr, done.stderr
    written = done.stdout.strip().splitlines()[-1]
    for name in ("data_free.mlpackage", "calibration-skm.mlpackage", "report.md", "report.json"):
        assert str(tmp_path / "out" / name) in written
        assert (tmp_path / "out" / name).exists()
