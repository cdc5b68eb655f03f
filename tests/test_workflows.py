"""Workflows: every example YAML runs end to end, packages hold the plan, failures keep earlier outputs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from coreml_opt.errors import PlanError
from coreml_opt.model.package import load_package
from coreml_opt.plan import Plan
from coreml_opt.workflows import WorkflowError, load_workflow, parse_workflow, run_workflow
from coreml_opt.workflows.training import distillation_loss

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "workflows").glob("*.yaml"))


def _expected(spec) -> str:
    """The inventory's compression text a spec must produce."""
    kind = spec.parts[0].technique
    if kind == "palettize":
        return f"palettized {spec.nbits}-bit"
    if kind == "quantize":
        return "quantized"
    return "sparse"


def _shrink(workflow):
    """Keep the test fast on 2 CPU cores: few calibration samples and training steps."""
    for stage in workflow.stages:
        if stage.kind == "calibration":
            stage.options["samples"] = 48
        if stage.kind == "finetune":
            stage.options["max_steps"] = 3
    return workflow


def test_examples_exist():
    assert len(EXAMPLES) >= 4


@pytest.mark.slow  # every bundled workflow end to end: 2 to 7 minutes each on a loaded 2-core machine
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_workflow_emits_packages_compressed_as_planned(path, tmp_path):
    workflow = _shrink(load_workflow(path))
    result = run_workflow(workflow, out=tmp_path, progress=False)
    assert result.ok, result.failed and result.failed.error
    base = load_package(tmp_path / "fp16.mlpackage", load_weights=False).inventory
    resolved = workflow.plan.resolve(base)
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["status"] for s in report["stages"]] == ["ok"] * len(workflow.stages)
    for stage, record in zip(workflow.stages, report["stages"]):
        package = tmp_path / f"{stage.name}.mlpackage"
        inventory = load_package(package, load_weights=False).inventory
        by_torch = {w.torch_name: w for w in inventory.weights}
        for weight in base.weights:
            got = by_torch[weight.torch_name].compression  # every weight keeps its torch name
            spec = resolved[weight.name]
            if spec.is_none:
                assert got == "fp16", (stage.name, weight.torch_name, got)
            else:
                assert _expected(spec) in got, (stage.name, weight.torch_name, spec, got)
        assert 0.0 <= record["metric"] <= 1.0 and not math.isnan(record["metric"])
        assert record["weight_bytes"] < base.total_bytes
        if stage.kind != "data_free":  # torch weights were checked against the package
            assert set(record["max_relative_diff"]) == {w.torch_name[:-len(".weight")] for w in base.weights
                                                        if not resolved[w.name].is_none}
    assert "| fp16 package |" in (tmp_path / "report.md").read_text()


def _failing_yaml(tmp_path: Path) -> Path:
    (tmp_path / "empty-data").mkdir(exist_ok=True)  # exists (checked when the workflow loads), holds no images
    doc = {"name": "fails-last", "model": "coreml_opt.zoo:digits_cnn", "input_shape": [1, 1, 8, 8],
           "plan": {"global": "pal4"},
           "stages": [{"data_free": {}},
                      {"finetune": {"method": "dkm", "data": str(tmp_path / "empty-data"), "max_steps": 1}}],
           "out": str(tmp_path / "out")}
    path = tmp_path / "fails.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_failing_last_stage_keeps_earlier_outputs_and_names_the_stage(tmp_path):
    code, out, err = run_cli("run", str(_failing_yaml(tmp_path)))
    assert code == 1
    assert "stage finetune-dkm failed" in err and "empty-data" in err and "contains no images" in err
    assert (tmp_path / "out" / "data_free.mlpackage" / "Manifest.json").is_file()
    assert not (tmp_path / "out" / "finetune-dkm.mlpackage").exists()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["failed_stage"] == "finetune-dkm" and not report["ok"]
    assert [s["status"] for s in report["stages"]] == ["ok", "failed"]
    assert "**stage finetune-dkm failed**" in (tmp_path / "out" / "report.md").read_text()
    assert "| data_free |" in out


@pytest.mark.parametrize("change, key", [
    ({"epocs": 2}, "stages[1].finetune.epocs"),
    ({"epochs": 0}, "stages[1].finetune.epochs"),
    ({"method": "gptq"}, "stages[1].finetune.method"),
    ({"distill": {"temperature": -1}}, "stages[1].finetune.distill.temperature"),
])
def test_bad_workflow_values_are_one_line_errors_naming_file_and_key(tmp_path, change, key):
    doc = yaml.safe_load(_failing_yaml(tmp_path).read_text())
    doc["stages"][1]["finetune"].update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(WorkflowError) as info:
        load_workflow(path)
    assert str(info.value).startswith(f"{path}: {key}:")
    code, out, err = run_cli("run", str(path))
    assert code == 2 and err.count("\n") == 1 and key in err


@pytest.mark.parametrize("where", ["stage", "auto_plan", "eval"])
def test_a_missing_data_path_fails_when_the_workflow_loads_and_nothing_is_written(tmp_path, where):
    """Checked before the sweep or any stage runs: one line naming the file, the key and the resolved path."""
    doc = {"name": "missing", "model": "coreml_opt.zoo:digits_cnn", "input_shape": [1, 1, 8, 8],
           "auto_plan": {"sensitivity": {"metric": "kl", "data": "digits-test"}, "budget": {"bpw": 4}},
           "stages": [{"data_free": {"data": "digits-test"}}], "out": str(tmp_path / "out")}
    key = {"stage": "stages[0].data_free.data", "auto_plan": "auto_plan.sensitivity.data", "eval": "eval.data"}[where]
    if where == "stage":
        doc["stages"][0]["data_free"]["data"] = "calib"
    elif where == "auto_plan":
        doc["auto_plan"]["sensitivity"]["data"] = "calib"
    else:
        doc["eval"] = {"data": "calib", "metric": "kl"}
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(doc))
    code, out, err = run_cli("run", str(path))
    assert code == 2 and err.count("\n") == 1, err
    assert f"{path}: {key}: {tmp_path / 'calib'} does not exist" in err
    assert not (tmp_path / "out").exists()


def test_unknown_top_level_key_is_rejected():
    with pytest.raises(WorkflowError, match="wf.yaml: stagess: is not a known key"):
        parse_workflow({"model": "coreml_opt.zoo:digits_cnn", "stagess": []}, "wf.yaml")


def test_spec_a_method_cannot_express_fails_before_any_stage_runs(tmp_path):
    workflow = parse_workflow({"model": "coreml_opt.zoo:digits_cnn", "input_shape": [1, 1, 8, 8],
                               "plan": {"global": "int4/block32"},
                               "stages": [{"data_free": {}}, {"finetune": {"method": "qat", "data": "digits-train"}}]},
                              "wf.yaml")
    with pytest.raises(PlanError, match=r"layer 'features.3' \(spec int4/block32\): QAT cannot express it"):
        run_workflow(workflow, out=tmp_path, progress=False)
    assert not (tmp_path / "data_free.mlpackage").exists()


def test_distillation_loss_is_zero_for_the_teacher_and_grows_with_disagreement():
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    assert float(distillation_loss(logits, logits, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(logits.flip(1), logits, 2.0)) > 0.1


def test_auto_plan_runs_sensitivity_then_the_planner_before_the_stages(tmp_path):
    workflow = load_workflow(ROOT / "workflows" / "digits-auto-plan.yaml")
    assert workflow.auto_plan["budget"] == {"bpw": 3}
    result = run_workflow(workflow, out=tmp_path, progress=False)
    assert result.ok, result.failed and result.failed.error
    auto = json.loads((tmp_path / "report.json").read_text())["plan"]["auto_plan"]
    assert auto["bits_per_weight"] <= 3.0
    assert (tmp_path / "sensitivity" / "trials.json").is_file()
    saved = Plan.load(tmp_path / "plan.yaml")
    assert saved.layers and saved == workflow.plan  # the planner's per-layer plan drove the stages
    stage = load_package(tmp_path / "data_free.mlpackage", load_weights=False).inventory
    assert 8 * stage.total_bytes / stage.total_params <= 3.0 + 1e-9


def test_auto_plan_with_calibration_data_in_its_data_free_stage_plans_compensated_specs(tmp_path):
    """Every stage data_free with the calibration `data:` it needs: the auto-plan's sweep tries the calibrated
    ladder (+gptq, +bc rungs), and the stage ships them from that data's statistics."""
    spec = {"model": "coreml_opt.zoo:digits_cnn", "input_shape": [1, 1, 8, 8], "target": "iOS18",
            "auto_plan": {"sensitivity": {"metric": "kl", "data": "digits-test"}, "budget": {"bpw": 4}},
            "eval": {"data": "digits-test", "metric": "accuracy"}, "stages": [{"data_free": {"data": "digits-test"}}]}
    workflow = parse_workflow(spec, str(tmp_path / "wf.yaml"))
    result = run_workflow(workflow, out=tmp_path / "out", progress=False)
    assert result.ok, result.failed and result.failed.error
    tried = {t["spec"] for t in json.loads((tmp_path / "out" / "sensitivity" / "trials.json").read_text())}
    assert "int8+bc" in tried and "pal4+gptq+bc" in tried
    chosen = {str(s) for s in Plan.load(tmp_path / "out" / "plan.yaml").layers.values()}
    assert any("+bc" in s for s in chosen), chosen
    stage = load_package(tmp_path / "out" / "data_free.mlpackage", load_weights=False).inventory
    assert 8 * stage.total_bytes / stage.total_params <= 4.0 + 1e-9
    data_free_only = parse_workflow({**spec, "stages": [{"data_free": {}}]}, str(tmp_path / "wf.yaml"))
    run_workflow(data_free_only, out=tmp_path / "plain", progress=False)
    assert not any("+" in s for s in (str(v) for v in Plan.load(tmp_path / "plain" / "plan.yaml").layers.values()))


def test_auto_plan_budget_is_validated():
    with pytest.raises(WorkflowError, match="auto_plan.budget: needs one of bpw, size, ratio"):
        parse_workflow({"model": "coreml_opt.zoo:digits_cnn", "input_shape": [1, 1, 8, 8],
                        "auto_plan": {"budget": {"bpw": 3, "size": "1MB"}}, "stages": [{"data_free": {}}]}, "wf.yaml")
