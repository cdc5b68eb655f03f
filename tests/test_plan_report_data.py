"""Plan-half vs report-half: `plan --emit --report-data` on the digits example, and the mixed-precision baselines'
exact byte budgets on a real sweep (per-tensor LUT candidates) and the packages they emit."""
from __future__ import annotations

import json

import pytest

from coreml_opt.planning import PlanningSession, make_plan, plan_bytes
from coreml_opt.planning.baselines import BASELINES, baseline_plans, uniform_lut

from test_planning_sweep import plan_cli

PLAN_HALF = "coreml_opt.sensitivity.examples:digits_plan_half"
REPORT_HALF = "coreml_opt.sensitivity.examples:digits_report_half"
LUTS = ["pal2", "pal3", "pal4", "pal6"]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, digits_model):
    """A finished sweep of the digits CNN on the plan half of its held-out split, per-tensor LUTs (real analyser)."""
    from coreml_opt.sensitivity import analyse

    out = tmp_path_factory.mktemp("halves")
    analyse("coreml_opt.zoo:digits_cnn", (1, 1, 8, 8), PLAN_HALF, "accuracy", candidates=LUTS, out_dir=out,
            progress=False)
    return out


def test_halves_are_disjoint_halves_of_the_heldout_split():
    from coreml_opt.sensitivity.examples import digits_heldout, digits_plan_half, digits_report_half

    whole, plan, report = digits_heldout(), digits_plan_half(), digits_report_half()
    assert len(plan) + len(report) == len(whole) and (plan.x == whole.x[0::2]).all() and (report.x == whole.x[1::2]).all()


def test_report_data_prints_plan_and_report_columns_side_by_side(sweep_dir, tmp_path):
    code, out, err = plan_cli(str(sweep_dir), "--bpw", "4", "--emit", str(tmp_path / "m.mlpackage"),
                              "--report-data", REPORT_HALF)
    assert code == 0, err
    header = next(line for line in out.splitlines() if line.startswith("accuracy "))
    assert header.split() == ["accuracy", "plan", "data", "report", "data"]
    assert f"plan data: {PLAN_HALF} (planned on); report data: {REPORT_HALF} (never planned on)" in out
    package_row = next(line for line in out.splitlines() if line.startswith("plan, package"))
    assert package_row.count("%") == 2  # a figure in each column


def test_report_data_json_measures_the_package_on_the_other_half(sweep_dir, tmp_path):
    from coreml_opt.sensitivity.examples import digits_report_half

    code, out, err = plan_cli(str(sweep_dir), "--bpw", "3", "--emit", str(tmp_path / "m.mlpackage"),
                              "--report-data", REPORT_HALF, "--json")
    assert code == 0, err
    summary = json.loads(out)
    plan_side, report_side = summary["measured_on_package"], summary["measured_on_report_data"]
    assert plan_side["simulated"] == summary["measured_metric"] and plan_side["reference"] == summary["baseline"]
    # the report half's own baseline and figures, not the plan half's (different samples)
    session = PlanningSession.open(sweep_dir)
    report_eval = session.evaluator_for(REPORT_HALF)
    assert report_side["reference"] == pytest.approx(session.measure_with({}, report_eval))
    assert report_side["simulated"] == pytest.approx(session.measure_with(summary["layers"], report_eval))
    n = len(digits_report_half())
    assert abs(report_side["measured"] - report_side["simulated"]) <= 2 / n  # fp16 package activations, no more
    assert report_side["drop"] == pytest.approx(report_side["reference"] - report_side["measured"])


@pytest.mark.parametrize("extra, words", [
    ([], "--report-data nowhere/digits: "),
    (["--no-validate"], "--report-data nowhere/digits: compares with the plan-data figures"),
])
def test_report_data_refusals_are_one_line_and_write_nothing(sweep_dir, tmp_path, extra, words):
    target = tmp_path / "m.mlpackage"
    code, out, err = plan_cli(str(sweep_dir), "--bpw", "4", "--emit", str(target), "--report-data",
                              "nowhere/digits", *extra)
    assert code == 2 and err.startswith(f"error: {words}") and len(err.strip().splitlines()) == 1, err
    assert not target.exists()


def test_report_data_needs_emit(sweep_dir):
    code, out, err = plan_cli(str(sweep_dir), "--bpw", "4", "--report-data", REPORT_HALF)
    assert code == 2 and err.startswith(f"error: --report-data {REPORT_HALF}: needs --emit"), err


@pytest.mark.parametrize("bpw", [3.0, 4.0, 5.0])
def test_baselines_meet_their_budget_exactly_in_bytes_and_the_package_agrees(sweep_dir, example_mlpackage, tmp_path,
                                                                            bpw):
    from coreml_opt.compress import compress

    session = PlanningSession.open(sweep_dir, measure=False)
    problem = session.problem
    budget = problem.budget_bytes(bpw=bpw)
    plans = baseline_plans(problem, bpw)
    assert set(plans) == set(BASELINES)
    for name, specs in plans.items():
        size = plan_bytes(problem, specs)
        if name != "uniform":
            assert size <= budget, name
        report = compress(example_mlpackage, make_plan(problem, specs), tmp_path / f"{name}.mlpackage")
        assert report.bytes_after == size, name  # the byte model is exact: every byte the package stores
    spec, uniform = uniform_lut(problem, bpw)
    assert spec == {3.0: "pal3", 4.0: "pal4", 5.0: "pal4"}[bpw] and set(uniform.values()) == {spec}


def test_report_data_on_a_package_sweep_runs_the_package_on_the_report_half(example_mlpackage, tmp_path):
    from coreml_opt.evaluation import evaluate_package
    from coreml_opt.sensitivity import analyse_package

    sweep = tmp_path / "sweep"
    analyse_package(example_mlpackage, "calibration_data/digits", metric="kl", candidates="pal4,pal2", progress=False,
                    out_dir=sweep)
    emitted = tmp_path / "planned.mlpackage"
    code, out, err = plan_cli(str(sweep), "--bpw", "4", "--emit", str(emitted), "--report-data", REPORT_HALF, "--json")
    assert code == 0, err
    report_side = json.loads(out)["measured_on_report_data"]
    # proxies compare with the uncompressed package itself, on the report half: its baseline KL is 0
    assert report_side["reference"] == 0.0
    shipped = evaluate_package(emitted, REPORT_HALF, "kl", reference=str(example_mlpackage))
    assert report_side["measured"] == pytest.approx(shipped.metric, rel=1e-6, abs=1e-12)
    assert report_side["simulated"] == pytest.approx(shipped.metric, rel=1e-4, abs=1e-10)
