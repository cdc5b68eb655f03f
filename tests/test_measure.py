"""`--measure`: the emitted package run by the package runtime, reported next to the simulated figure."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli

DATA = "calibration_data/digits"


@pytest.mark.parametrize("spec", ["pal2", "int4/block32"])
def test_compress_measure_equals_the_simulated_figure_and_differs_from_the_reference(example_mlpackage, tmp_path,
                                                                                     spec):
    out = tmp_path / "c.mlpackage"
    code, stdout, stderr = run_cli("compress", str(example_mlpackage), "--spec", spec, "-o", str(out),
                                   "--measure", "--data", DATA, "--metric", "kl", "--json")
    assert code == 0, stderr
    measured = json.loads(stdout)["measured"]
    assert measured["metric_name"] == "kl" and measured["reference"] == 0.0
    assert measured["measured"] > 0.0  # the compressed package, not the input, was run
    assert measured["measured"] == measured["simulated"]  # simulation == what the package computes
    assert measured["drop"] == pytest.approx(measured["measured"])


def test_compress_measure_prints_both_figures(example_mlpackage, tmp_path):
    code, stdout, stderr = run_cli("compress", str(example_mlpackage), "--spec", "pal2", "-o",
                                   str(tmp_path / "c.mlpackage"), "--measure", "--data", DATA)
    assert code == 0, stderr
    line = stdout.strip().splitlines()[-1]
    assert line.startswith("accuracy measured on the package (fp32 runtime) ") and ", simulated " in line
    assert "; reference " in line and ", drop " in line
    assert line.count(" %") == 3 and line.endswith(" pp"), line  # accuracy in %, its drop in pp (units.py)


def test_eval_prints_accuracy_in_percent_and_keeps_fractions_in_json(example_mlpackage, tmp_path):
    pal2 = tmp_path / "pal2.mlpackage"
    assert run_cli("compress", str(example_mlpackage), "--spec", "pal2", "-o", str(pal2))[0] == 0
    args = ("eval", str(pal2), "--data", DATA, "--metric", "top1", "--reference", str(example_mlpackage))
    code, stdout, stderr = run_cli(*args)
    assert code == 0, stderr
    raw = json.loads(run_cli(*args, "--json")[1])
    assert 0 <= raw["metric"] <= 1 and raw["reference"] == 1.0  # --json keeps metric units
    assert stdout.strip() == (f"top1 {100 * raw['metric']:.2f} % on {raw['samples']} samples "
                              f"({raw['precision']} runtime); reference 100.00 %, drop {100 * raw['drop']:.2f} pp")


def test_compress_measure_refusals_are_one_line_and_write_nothing(example_mlpackage, tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 3, 8, 8), np.float32), y=np.zeros(4, np.int64))
    out = tmp_path / "c.mlpackage"
    for extra, words in ((["--measure"], "--measure: needs evaluation data"),
                         (["--data", DATA], "--data: is used only with --measure"),
                         (["--metric", "kl"], "--metric: is used only with --measure"),
                         (["--measure", "--data", str(tmp_path / "d.npz")], "holds inputs of shape [3, 8, 8]")):
        code, _, stderr = run_cli("compress", str(example_mlpackage), "--spec", "int8", "-o", str(out), *extra)
        assert code == 2 and words in stderr and len(stderr.strip().splitlines()) == 1, stderr
        assert not out.exists()


def _workflow(tmp_path, measure_key: bool):
    import yaml

    doc = {"name": "measured", "model": "coreml_opt.zoo:digits_cnn", "input_shape": [1, 1, 8, 8],
           "plan": {"global": "pal2"}, "eval": {"data": "digits-test", "metric": "accuracy"},
           "stages": [{"data_free": {}}], "out": str(tmp_path / "run")}
    if measure_key:
        doc["eval"]["measure"] = True
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_workflow_measure_reports_each_stage_on_its_package_and_report_shows_both(tmp_path):
    code, stdout, stderr = run_cli("run", str(_workflow(tmp_path, measure_key=False)), "--measure")
    assert code == 0, stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["measured_on_package"] is True
    (stage,) = report["stages"]
    # pal2 moves accuracy; the package itself (fp16 activations) agrees with its weights in PyTorch to a sample
    assert stage["runtime_metric"] is not None and abs(stage["runtime_metric"] - stage["metric"]) <= 2 / 360
    assert abs(report["baseline"]["fp16_package"] - report["baseline"]["fp16"]) <= 2 / 360
    md = (tmp_path / "run" / "report.md").read_text()
    assert "| metric | on package |" in md and f"| {100 * stage['runtime_metric']:.2f} % |" in md  # accuracy in %
    code, stdout, stderr = run_cli("report", str(tmp_path / "run"), "-o", str(tmp_path / "r.html"), "--no-measure")
    assert code == 0, stderr
    page = (tmp_path / "r.md").read_text()
    assert "accuracy on package (runtime)" in page and f"{100 * stage['runtime_metric']:.2f} %" in page
    assert f"{100 * stage['runtime_metric']:.2f} % measured on the package (runtime)" in page  # results table


def test_workflow_measure_key_and_its_absence(tmp_path):
    from coreml_opt.workflows import load_workflow

    assert load_workflow(_workflow(tmp_path, measure_key=True)).measure is True
    assert load_workflow(_workflow(tmp_path, measure_key=False)).measure is False


def test_a_package_the_runtime_cannot_run_is_noted_not_failed(tmp_path):
    import torch
    from torch import nn

    from coreml_opt.model.convert import convert
    from coreml_opt.workflows.runner import measure_on_package

    class Cumulative(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cumsum(self.fc(x), dim=1)

    package = tmp_path / "c.mlpackage"
    convert(Cumulative(), (1, 16), output_path=package)
    notes: list[str] = []
    assert measure_on_package(lambda model: float(model(torch.zeros(1, 16)).sum()), package, notes) is None
    assert len(notes) == 1 and notes[0].startswith("not measured on the package: op type 'cumsum'")


def test_workflow_measure_on_torch_side_stages_and_a_package_the_runtime_cannot_run(tmp_path):
    """A calibration stage (W8A8: activation quantize ops the runtime lacks) keeps status ok with a note."""
    from coreml_opt.workflows import load_workflow, run_workflow

    workflow = load_workflow("workflows/digits-w8a8.yaml")
    workflow.stages[1].options["samples"] = 48
    result = run_workflow(workflow, out=tmp_path, progress=False, measure=True)
    assert result.ok, result.failed and result.failed.error
    data_free, w8a8 = (s.outcome for s in result.stages)
    assert data_free.runtime_metric is not None and abs(data_free.runtime_metric - data_free.metric) <= 2 / 360
    assert w8a8.runtime_metric is None
    assert any(n.startswith("not measured on the package: op type 'quantize'") for n in w8a8.notes)
