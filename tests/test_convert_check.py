"""`convert` runs the package it wrote (package runtime) on the traced example and refuses one that disagrees."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from coreml_opt import zoo
from coreml_opt.errors import ModelError
from coreml_opt.model import check
from coreml_opt.model import convert as cv


@pytest.fixture(scope="module")
def digits_folded(digits_model):
    example = cv.example_inputs(digits_model, zoo.EXAMPLE_INPUT_SHAPE)
    return cv.fold_batchnorm(digits_model, example).eval(), example


def test_digits_package_agrees_with_torch_within_the_tolerance(example_mlpackage, digits_folded):
    model, example = digits_folded
    result = check.compare_package(example_mlpackage, model, example)
    assert result.skipped is None and not result.overflow
    assert 0 < result.max_error < check.FP32_TOLERANCE / 10  # measured 3.7e-4


def test_package_that_differs_from_the_torch_model_is_refused(example_mlpackage, digits_folded):
    model, example = digits_folded
    changed = copy.deepcopy(model)
    with torch.no_grad():  # the torch model the package is compared with, one weight 5 % off
        last = [m for m in changed.modules() if isinstance(m, nn.Linear)][-1]
        last.weight.mul_(1.05)
    assert check.compare_package(example_mlpackage, changed, example).max_error > check.FP32_TOLERANCE
    with pytest.raises(ModelError) as exc:
        check.check_package(example_mlpackage, changed, example, "digits")
    msg = str(exc.value)
    assert msg.startswith("digits: the converted package's output ") and "nothing was written" in msg
    assert "\n" not in msg


_MODELS = '''
import torch
from torch import nn

class Overflow(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 8)
        with torch.no_grad():
            self.fc.weight.fill_(0.05)
            self.fc.bias.fill_(0.0)

    def forward(self, x):
        h = self.fc(x) * 800.0
        return (h * h) / 1000.0

class Cumulative(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        return torch.cumsum(self.fc(x), dim=1)
'''


@pytest.fixture
def models(tmp_path, monkeypatch):
    (tmp_path / "check_models_j.py").write_text(_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_fp16_activation_overflow_is_refused_and_nothing_is_written(models):
    from conftest import run_cli

    out = models / "o.mlpackage"
    code, _, stderr = run_cli("convert", "check_models_j:Overflow", "--input-shape", "1,16", "-o", str(out))
    assert code == 2, stderr
    assert stderr.startswith("error: check_models_j:Overflow: the converted package's output ")
    assert "inf/NaN when run in fp16" in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists()
    assert sorted(p.name for p in models.iterdir() if not p.name.startswith("__")) == ["check_models_j.py"]


def test_op_the_runtime_lacks_skips_the_check_and_writes_the_package(models, caplog):
    out = models / "c.mlpackage"
    with caplog.at_level(logging.WARNING, logger="coreml_opt.model.check"):
        cv.convert("check_models_j:Cumulative", (1, 16), output_path=out)
    assert (out / "Manifest.json").exists()
    notes = [r.getMessage() for r in caplog.records if r.name == "coreml_opt.model.check"]
    assert len(notes) == 1 and "was not checked against PyTorch" in notes[0] and "'cumsum'" in notes[0]


class _Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(300, 32)
        self.fc = nn.Linear(32, 4)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(ids) * mask.unsqueeze(-1))


def test_check_feeds_every_input_int_ids_too(tmp_path):
    model = _Tokens().eval()
    specs = ["ids:1,16:int32", "mask:1,16"]
    out = tmp_path / "tok.mlpackage"
    cv.convert(model, inputs=specs, output_path=out)
    result = check.compare_package(out, model, cv.example_inputs(model, specs))
    assert result.skipped is None and 0 < result.max_error < check.FP32_TOLERANCE


def test_workflow_export_checks_its_package_too(models):
    import importlib

    from coreml_opt.workflows.export import export_package

    model = importlib.import_module("check_models_j").Overflow().eval()
    out = models / "stage.mlpackage"
    with pytest.raises(ModelError, match=r"inf/NaN when run in fp16.*nothing was written"):
        export_package(model, copy.deepcopy(model), (1, 16), "iOS18", out, planned={})
    assert not out.exists()


def test_outputs_torch_itself_makes_non_finite_are_compared_where_finite(example_mlpackage, digits_folded):
    model, example = digits_folded

    class HalfInf(nn.Module):
        """The digits CNN whose first logit is inf in torch: the other logits are still compared."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.inner(x).clone()
            out[:, 0] = float("inf")
            return out

    result = check.compare_package(example_mlpackage, HalfInf(), example)
    assert 0 < result.max_error < check.FP32_TOLERANCE and not result.overflow
    assert check.relative_error(torch.tensor([1.0, float("inf")]), torch.tensor([1.0, 2.0])) == float("inf")
