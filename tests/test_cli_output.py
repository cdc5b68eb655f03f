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
    for name in ("fp16.mlpackage", "plan.yaml", "data_free.mlpackage", "calibration-skm.mlpackage", "report.md",
                 "report.json"):
        assert str(tmp_path / "out" / name) in written
        assert (tmp_path / "out" / name).exists()


# ---- kind 9: messages that point the way the user went -----------------------------------------
MODELS_PY = ("import torch\n"
             "def build():\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64))\n"
             "def broken():\n    raise ValueError('checkpoint weights.pt not found')\n")


def test_factory_that_raises_is_reported_as_raising_not_as_needing_arguments(tmp_path):
    from coreml_opt.errors import ModelError
    from coreml_opt.model.convert import load_factory

    (tmp_path / "mymodels.py").write_text(MODELS_PY)
    with pytest.raises(ModelError) as exc:
        load_factory(f"{tmp_path / 'mymodels.py'}:broken")
    message = str(exc.value)
    assert "raised ValueError: checkpoint weights.pt not found" in message
    assert "no arguments" not in message and "\n" not in message


def test_model_file_in_the_cwd_that_is_not_importable_gets_the_file_path_hint(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(MODELS_PY)
    monkeypatch.chdir(tmp_path)  # as the `coreml-opt` console script runs: the cwd is not on sys.path
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not (Path(p or ".") / "mymodels.py").exists()])
    monkeypatch.delitem(sys.modules, "mymodels", raising=False)
    code, _, err = run_cli("convert", "mymodels:build", "--input-shape", "1,1,8,8", "-o", "m.mlpackage")
    assert code == 2 and err.count("\n") == 1
    assert "mymodels.py is in the current folder" in err and "mymodels.py:build" in err and "PYTHONPATH=." in err
    code, out, err = run_cli("convert", "mymodels.py:build", "--input-shape", "1,1,8,8", "-o", "m.mlpackage")
    assert code == 0, err  # the fix the message gives works
    assert (tmp_path / "m.mlpackage").is_dir()


def test_user_metric_that_raises_is_one_line_naming_it(tmp_path):
    (tmp_path / "my_metric.py").write_text("def score(model):\n    raise ValueError('labels file missing')\n")
    code, _, err = run_cli("sensitivity", "--model", "coreml_opt.zoo:digits_cnn", "--input-shape", "1,1,8,8",
                           "--metric", f"{tmp_path / 'my_metric.py'}:score", "--candidates", "int8")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "my_metric.py:score" in err and "raised ValueError: labels file missing" in err


def test_target_fix_names_the_option_the_user_gave(example_mlpackage, tmp_path):
    code, _, err = run_cli("compress", str(example_mlpackage), "--spec", "int4", "--target", "iOS16",
                           "-o", str(tmp_path / "o.mlpackage"))
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: --spec int4 (") and "pass --target iOS18" in err and "target:" not in err
    plan = tmp_path / "p.yaml"
    plan.write_text("target: iOS16\nglobal: int4\n")
    code, _, err = run_cli("compress", str(example_mlpackage), "-c", str(plan), "-o", str(tmp_path / "o.mlpackage"))
    assert code == 2 and "set `target: iOS18` in the plan" in err
    assert not (tmp_path / "o.mlpackage").exists()


def test_sweep_file_errors_name_the_file_and_its_target_key(tmp_path):
    sweep = tmp_path / "sw.yaml"
    sweep.write_text("model: coreml_opt.zoo:digits_cnn\ninput_shape: [1, 1, 8, 8]\ncandidates: [int4]\n"
                     "target: iOS16\n")
    code, _, err = run_cli("sensitivity", str(sweep))
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {sweep}: candidate int4") and "`target: iOS18` in a sweep file" in err


def test_unreachable_bits_per_weight_budget_is_stated_in_bits_per_weight(accuracy_sweep):
    code, _, err = run_cli("plan", str(accuracy_sweep), "--bpw", "0.5")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: budget 0.5 bits per weight (")
    assert "bits per weight, " in err.split("smallest size reachable")[1] and "ask for at least that" in err


def test_a_negative_max_drop_is_named_as_given(accuracy_sweep):
    code, _, err = run_cli("plan", str(accuracy_sweep), "--max-drop", "-0.5")
    assert code == 2 and err.startswith("error: --max-drop -0.5: ") and "0.005" not in err


# ---- kind 10: one unit per quantity ------------------------------------------------------------
def test_plan_prints_accuracy_in_percent_drops_in_points_and_writes_no_null_global(accuracy_sweep, tmp_path):
    code, out, err = run_cli("plan", str(accuracy_sweep), "--max-drop", "0.5", "-o", str(tmp_path / "plan.yaml"))
    assert code == 0, err
    assert "budget: accuracy drop <= 0.50 pp" in out and "0.005" not in out
    assert "accuracy: baseline 99.44 %" in out and "KiB" in out and " MB" not in out
    text = (tmp_path / "plan.yaml").read_text()
    assert "global" not in text and "null" not in text


def test_size_budget_in_kb_is_the_kib_the_tables_show():
    from coreml_opt.planning import parse_size

    assert parse_size("60KB") == parse_size("60KiB") == 61_440 and parse_size("1MB") == 2**20


def test_kl_figures_keep_their_significant_digits():
    from coreml_opt.planning.costs import format_drop, format_metric

    assert format_metric(2.56e-08, "kl") == "2.56e-08" and format_drop(0.000394, "kl") == "0.000394"
    assert format_metric(0.9944, "accuracy") == "99.44 %" and format_drop(0.005, "top1") == "0.50 pp"


def test_front_plot_is_titled_and_scaled_from_the_metric_and_marks_points_off_the_chart():
    import matplotlib.pyplot as plt

    from coreml_opt.planning.costs import Problem
    from coreml_opt.planning.pareto import Point, front_figure

    problem = Problem([], [], metric="kl", baseline=2.56e-08, higher_is_better=False)
    points = [Point("solved", "3", 1, 3.0, 0.012, 0.012), Point("solved", "4", 1, 4.0, 0.001, 0.001),
              Point("uniform", "pal2", 1, 2.1, 0.5, 0.5), Point("uniform", "int8", 1, 8.2, 0.0, 1e-6)]
    fig = front_figure(problem, points)
    ax = fig.axes[0]
    assert "kl" in ax.get_title() and "accuracy" not in ax.get_title() and ax.get_ylabel().startswith("kl")
    assert ax.get_ylim()[0] >= 0  # kl is never negative
    labels = [t.get_text() for t in ax.texts]
    assert any(t.startswith("pal2 (0.5, off scale)") for t in labels)
    assert "uniform, off scale (value in label)" in [t.get_text() for t in ax.get_legend().get_texts()]
    plt.close(fig)


def test_report_on_a_kl_sweep_names_kl_not_accuracy(tmp_path, digits_model):
    from coreml_opt.sensitivity import analyse

    sweep = tmp_path / "kl"
    analyse("coreml_opt.zoo:digits_cnn", (1, 1, 8, 8), "coreml_opt.sensitivity.examples:digits_heldout", "kl",
            candidates=["int8", "pal2"], out_dir=sweep, progress=False)
    code, out, err = run_cli("report", str(sweep), "-o", str(tmp_path / "r.html"), "--no-measure")
    assert code == 0, err
    for page in (tmp_path / "r.html", tmp_path / "r.md"):
        text = page.read_text()
        assert "Size vs kl" in text and "Size vs accuracy" not in text and "accuracy drop" not in text
    assert str(tmp_path / "r.html") in out and str(tmp_path / "r.md") in out
