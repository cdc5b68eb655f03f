"""Torch-side workflow stages fail, writing nothing, when their package leaves a planned layer uncompressed
(issue 11, kind 6): optimize.torch's SKM, GPTQ and DKM skip ConvTranspose2d without an error."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from coreml_opt.model.package import load_package
from coreml_opt.workflows import parse_workflow, run_workflow


class _UpConvNet(nn.Module):
    """Conv -> ConvTranspose2d (2,304 weights, above the threshold) -> Linear on 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(16, 16, 3, padding=1),
                                  nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


STAGES = {
    "calibration-skm": ("pal4", {"calibration": {"method": "skm", "data": "digits-train", "samples": 32}}),
    "calibration-gptq": ("int4", {"calibration": {"method": "gptq", "data": "digits-train", "samples": 32}}),
    "finetune-dkm": ("pal4", {"finetune": {"method": "dkm", "data": "digits-train", "max_steps": 2,
                                           "distill": {"temperature": 2.0}}}),
}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_that_skips_a_planned_conv_transpose_fails_and_writes_no_package(name, tmp_path):
    spec, stage = STAGES[name]
    torch.manual_seed(0)
    workflow = parse_workflow({"model": _UpConvNet(), "input_shape": [1, 1, 8, 8], "plan": {"global": spec},
                               "stages": [{"data_free": {}}, stage]}, "test")
    result = run_workflow(workflow, out=tmp_path, progress=False)
    data_free, torch_stage = result.stages
    assert data_free.status == "ok"  # coremltools' passes compress the transposed conv
    compressions = {w.torch_name: w.compression for w in data_free.outcome.inventory.weights}
    assert compressions["body.2.weight"] != "fp16"
    assert torch_stage.name == name and torch_stage.status == "failed"
    assert "layer 'body.2'" in torch_stage.error and "was skipped by" in torch_stage.error, torch_stage.error
    assert not (tmp_path / f"{name}.mlpackage").exists()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["failed_stage"] == name and not report["ok"]
    assert load_package(tmp_path / "data_free.mlpackage", load_weights=False).inventory.bits_per_weight < 8
