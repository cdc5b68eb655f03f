"""Sweep speed without changing a result: channels_last evaluation, skipped duplicate trials, the device option."""
from __future__ import annotations

import coremltools as ct
import pytest
import torch
from torch import nn

from conftest import run_cli
from coreml_opt.errors import ModelError
from coreml_opt.evaluation import Evaluator
from coreml_opt.model.convert import fold_batchnorm
from coreml_opt.sensitivity import analyse, make_evaluator
from coreml_opt.sensitivity.examples import digits_heldout
from coreml_opt.sensitivity.reference import coreml_trial

SHAPE = (1, 1, 8, 8)
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


@pytest.fixture(scope="module")
def heldout():
    return digits_heldout()


@pytest.fixture(scope="module")
def kl_sweep(digits_model, heldout):
    return analyse(digits_model, SHAPE, heldout, metric="kl", candidates="int8,pal4,prune50", progress=False)


def test_conv_nets_evaluate_in_channels_last(digits_model, heldout):
    evaluate = make_evaluator(digits_model, heldout, "kl")
    assert evaluate.channels_last is True
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x in evaluate.batches)


@pytest.mark.parametrize("layer,spec", [("features.3.weight", "pal4"), ("features.7.weight", "int8"),
                                        ("features.10.weight", "prune50")])
def test_channels_last_sweep_equals_the_coremltools_loop(kl_sweep, example_mlpackage, digits_model, heldout,
                                                         layer, spec):
    """The sweep (cached suffixes, channels_last) and the coremltools loop (full forward through the same
    evaluator) give the same KL bit for bit; evaluated in NCHW the same weights give another value, so a
    layout that differed between the two paths would show."""
    mlmodel = ct.models.MLModel(str(example_mlpackage), skip_model_load=True)
    folded = fold_batchnorm(digits_model)
    info = next(l for l in kl_sweep.layers if l.layer == layer)
    trial = next(t for t in kl_sweep.trials if (t.layer, t.spec) == (layer, spec))
    assert coreml_trial(mlmodel, folded, info, spec, make_evaluator(digits_model, heldout, "kl")) == trial.metric

    nchw = Evaluator("kl", heldout, None)
    nchw.channels_last = False  # decided before the first module is placed
    nchw.reference = torch.cat(nchw.outputs(fold_batchnorm(digits_model)))
    values = {coreml_trial(mlmodel, folded, info, spec, nchw), trial.metric}
    assert len(values) == 2


class _FewValues(nn.Module):
    """A conv whose weights take four values (every palette of 4+ entries reproduces them exactly) and a
    linear layer with ordinary random weights."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(16, 32, 3)
        levels = torch.tensor([-0.5, -0.25, 0.25, 0.5])
        with torch.no_grad():
            self.conv.weight.copy_(levels[torch.randint(0, 4, self.conv.weight.shape, generator=gen)] / 4)
        self.head = nn.Linear(32 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


def test_duplicate_trials_are_not_evaluated_and_keep_their_rows():
    torch.manual_seed(0)
    model, shape = _FewValues().eval(), (1, 16, 8, 8)
    kwargs = dict(metric="psnr", candidates="int8,pal6,pal4,pal2,prune50", progress=False)
    fast = analyse(model, shape, **kwargs)
    every = analyse(model, shape, dedupe=False, **kwargs)
    rows = [(t.layer, t.spec, t.metric, t.drop, t.bytes) for t in every.trials]
    assert [(t.layer, t.spec, t.metric, t.drop, t.bytes) for t in fast.trials] == rows
    equal_to_fp16 = [t for t in every.trials if t.layer == "conv.weight" and t.spec.startswith("pal")]
    assert len(equal_to_fp16) == 3 and all(t.metric == every.baseline for t in equal_to_fp16)
    assert fast.deduplicated == 3 and every.deduplicated == 0


@NO_GPU
def test_cuda_without_a_gpu_is_one_line(tmp_path, digits_model, example_mlpackage):
    with pytest.raises(ModelError, match="device 'cuda'.*no CUDA GPU"):
        analyse(digits_model, SHAPE, metric="kl", candidates="int8", progress=False, device="cuda")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("model: coreml_opt.zoo:digits_cnn\ninput_shape: [1, 1, 8, 8]\ndevice: cuda\n")
    for argv in (["sensitivity", "--model", "coreml_opt.zoo:digits_cnn", "--input-shape", "1,1,8,8",
                  "--device", "cuda", "--no-progress"],
                 ["sensitivity", str(sweep), "--no-progress"],
                 ["sensitivity", "--model", str(example_mlpackage), "--device", "cuda", "--no-progress"],
                 ["eval", str(example_mlpackage), "--data", "calibration_data/digits", "--device", "cuda"]):
        code, out, err = run_cli(*argv)
        lines = [line for line in err.splitlines() if line.startswith("error")]
        assert code == 2 and len(lines) == 1 and "device 'cuda'" in lines[0] and "--device cpu" in lines[0], argv
        assert "Traceback" not in err and out == ""


def test_an_unknown_device_in_a_sweep_file_is_one_line(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("model: coreml_opt.zoo:digits_cnn\ninput_shape: [1, 1, 8, 8]\ndevice: gpu\n")
    code, _, err = run_cli("sensitivity", str(sweep), "--no-progress")
    assert code == 2 and "device" in err and "'gpu'" in err and "Traceback" not in err
