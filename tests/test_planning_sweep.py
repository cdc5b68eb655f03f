"""The planner on a real sensitivity sweep of the example model: plans, validation, emitted package, CLI."""
from __future__ import annotations

import argparse
import contextlib
import io
import json

import pytest
import yaml

from coreml_opt.errors import CoreMLOptError, PlanError
from coreml_opt.planning import PlanningSession, plan_from_sweep
from coreml_opt.planning.cli import add_plan_parser

CANDIDATES = ["int8", "pal4", "pal2", "int4/block32"]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, digits_model):
    """A finished sweep of the digits CNN on its held-out split (real analyser)."""
    from coreml_opt.sensitivity import analyse

    out = tmp_path_factory.mktemp("sweep")
    analyse("coreml_opt.zoo:digits_cnn", (1, 1, 8, 8), "coreml_opt.sensitivity.examples:digits_heldout", "accuracy",
            candidates=CANDIDATES, out_dir=out, progress=False)
    return out


@pytest.fixture(scope="module")
def session(sweep_dir):
    return PlanningSession.open(sweep_dir)


def plan_cli(*argv: str) -> tuple[int, str, str]:
    """`coreml-opt plan ...` through add_plan_parser, as cli.run would call it."""
    parser = argparse.ArgumentParser(prog="coreml-opt")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", *argv])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = args.func(args)
        except CoreMLOptError as exc:
            print(f"error: {exc}", file=err)
            code = 2
    return code, out.getvalue(), err.getvalue()


def test_sizes_count_every_weight_of_the_model(session):
    problem = session.problem
    # features.0 (288) and classifier.4 (640) are below the threshold: fixed fp16 cost, still weights.
    assert set(problem.fixed) == {"features.0.weight", "classifier.4.weight"}
    assert problem.total_params == 121_760
    assert problem.budget_bytes(bpw=4) == 60_880


def test_solved_plan_meets_its_size_budget_and_is_measured(session):
    result = session.plan(bpw=3)
    assert result.bytes <= session.problem.budget_bytes(bpw=3)
    assert result.bits_per_weight <= 3
    assert result.measured_metric is not None
    assert result.measured_drop == pytest.approx(session.problem.baseline - result.measured_metric)


def test_emitted_package_weight_bytes_match_the_plan_prediction(session, tmp_path):
    from coreml_opt.model.package import load_package

    result = session.plan(bpw=4, validate=False)
    report = session.emit(result, tmp_path / "planned.mlpackage")
    stored = load_package(tmp_path / "planned.mlpackage", load_weights=False).inventory.total_bytes
    assert abs(stored - result.bytes) <= 0.01 * result.bytes
    assert stored == report.bytes_after
    compressed = {w.torch_name: w.spec for w in report.weights}
    assert all(compressed[layer] == spec for layer, spec in result.specs.items())


def test_max_drop_plan_measures_within_the_budget(session):
    result = session.plan(max_drop=0.005)
    assert result.measured_drop <= 0.005
    assert result.bytes < session.problem.fp16_bytes  # it did compress something


def test_infeasible_budget_names_the_smallest_reachable_size(session):
    smallest = sum(min(o.bytes for o in c.options) for c in session.problem.choices) + session.problem.fixed_bytes
    with pytest.raises(PlanError, match=f"smallest size reachable.*{smallest:,} bytes"):
        session.plan(size=smallest - 1)


def test_cli_writes_a_foundation_plan_and_the_package(sweep_dir, tmp_path):
    from coreml_opt.plan import Plan

    code, out, err = plan_cli(str(sweep_dir), "--bpw", "4", "-o", str(tmp_path / "plan.yaml"),
                              "--emit", str(tmp_path / "m.mlpackage"), "--json")
    assert code == 0, err
    summary = json.loads(out)
    plan = Plan.load(tmp_path / "plan.yaml")
    assert plan.target == "iOS18" and plan.global_spec is None
    assert {k: str(v) for k, v in plan.layers.items()} == summary["layers"]
    assert (tmp_path / "m.mlpackage").is_dir()
    assert abs(summary["emitted_bytes"] - summary["bytes"]) <= 0.01 * summary["bytes"]
    assert yaml.safe_load((tmp_path / "plan.yaml").read_text())["layers"]


def test_cli_max_drop_is_in_percent_points_for_accuracy(sweep_dir):
    code, out, err = plan_cli(str(sweep_dir), "--max-drop", "0.5", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["measured_drop"] <= 0.005


def test_cli_infeasible_budget_is_one_clear_line(sweep_dir):
    code, out, err = plan_cli(str(sweep_dir), "--bpw", "0.5")
    assert code == 2
    assert err.startswith("error: budget 0.5 bits per weight") and "smallest size reachable" in err
    assert len(err.strip().splitlines()) == 1


def test_front_plots_solved_greedy_and_uniform(session, tmp_path):
    points = session.front((2.5, 4), plot=tmp_path / "front.png")
    kinds = {p.kind for p in points}
    assert kinds == {"solved", "greedy", "uniform"}
    assert (tmp_path / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for bits in ("2.5", "4"):
        solved = next(p for p in points if p.kind == "solved" and p.label == bits)
        greedy = next(p for p in points if p.kind == "greedy" and p.label == bits)
        assert solved.predicted_drop <= greedy.predicted_drop + 1e-12  # exact beats the heuristic on its objective


def test_plan_from_sweep_saves_the_yaml(sweep_dir, tmp_path):
    result = plan_from_sweep(sweep_dir, ratio=3, validate=False, output=tmp_path / "p.yaml")
    assert result.measured_metric is None
    assert (tmp_path / "p.yaml").is_file()
    assert result.bytes <= result.problem.fp16_bytes / 3


def test_cli_emit_measure_runs_the_package_next_to_the_simulated_figure(sweep_dir, tmp_path):
    from coreml_opt.sensitivity.examples import digits_heldout

    code, out, err = plan_cli(str(sweep_dir), "--bpw", "3", "--emit", str(tmp_path / "m.mlpackage"), "--measure",
                              "--json")
    assert code == 0, err
    summary = json.loads(out)
    measured = summary["measured_on_package"]
    assert measured["simulated"] == summary["measured_metric"] and measured["metric_name"] == "accuracy"
    samples = len(digits_heldout())
    # fp16 activations in the package vs fp32 in the simulation may flip a sample or two, no more
    assert abs(measured["measured"] - measured["simulated"]) <= 2 / samples
    assert measured["drop"] == pytest.approx(summary["baseline"] - measured["measured"])
    code, out, err = plan_cli(str(sweep_dir), "--bpw", "3", "--emit", str(tmp_path / "t.mlpackage"), "--measure")
    assert code == 0 and out.strip().splitlines()[-1].startswith("accuracy measured on the package"), err


def test_cli_measure_without_emit_is_one_line(sweep_dir, tmp_path):
    code, out, err = plan_cli(str(sweep_dir), "--bpw", "3", "--measure")
    assert code == 2 and err.startswith("error: --measure: needs --emit") and len(err.strip().splitlines()) == 1
