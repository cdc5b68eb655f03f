"""Sensitivity sweeps on the real example model: outputs, agreement with coremltools, suffix evaluation."""
from __future__ import annotations

import csv

import coremltools as ct
import pytest
import torch
from torch import nn

from coreml_opt.model.convert import fold_batchnorm
from coreml_opt.sensitivity import DEFAULT_LADDER, analyse, load_sweep, make_evaluator
from coreml_opt.sensitivity.examples import digits_heldout
from coreml_opt.sensitivity.reference import compress_one_layer, decompressed_consts, load_consts
from coreml_opt.storage import predicted_bytes

SHAPE = (1, 1, 8, 8)
LAYERS = ["features.3.weight", "features.7.weight", "features.10.weight", "classifier.0.weight",
          "classifier.2.weight"]


@pytest.fixture(scope="module")
def heldout():
    return digits_heldout()


@pytest.fixture(scope="module")
def full_sweep(tmp_path_factory, digits_model, heldout):
    """All layers x the plain ladder (the default without data), accuracy on the held-out split, written to a
    directory."""
    out = tmp_path_factory.mktemp("sweep") / "digits"
    return analyse(digits_model, SHAPE, heldout, metric="accuracy", out_dir=out, progress=False,
                   candidates=list(DEFAULT_LADDER)), out


def test_full_sweep_covers_every_layer_and_candidate(full_sweep):
    result, out = full_sweep
    assert [layer.layer for layer in result.layers] == LAYERS
    assert [layer.coreml_name for layer in result.layers][0] == "features_3_weight_to_fp16"
    assert result.candidates == list(DEFAULT_LADDER) and result.complete
    assert {(t.layer, t.spec) for t in result.trials} == {(l, s) for l in LAYERS for s in DEFAULT_LADDER}
    assert result.baseline > 0.95 and all(0.0 <= t.metric <= 1.0 for t in result.trials)
    assert all(t.drop == pytest.approx(result.baseline - t.metric) for t in result.trials)
    assert {"compression", "evaluation", "activation_cache", "total"} <= set(result.timing)


def test_sweep_writes_every_output_file(full_sweep):
    result, out = full_sweep
    for name in ("trials.csv", "trials.json", "sweep.json", "summary.md", "heatmap.png", "sensitivity.sqlite"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == 30 and {"layer", "spec", "bytes", "metric", "drop"} <= set(rows[0])
    sweep, trials = load_sweep(out)
    assert sweep["metric"] == "accuracy" and sweep["higher_is_better"] is True and sweep["target"] == "iOS18"
    assert sweep["input_shape"] == list(SHAPE) and sweep["baseline"] == result.baseline
    assert [l["layer"] for l in sweep["layers"]] == LAYERS and sweep["layers"][0]["fp16_bytes"] > 0
    assert [(t.layer, t.spec, t.metric, t.bytes) for t in trials] == \
        [(t.layer, t.spec, t.metric, t.bytes) for t in result.trials]
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "most sensitive layer first" in (out / "summary.md").read_text()


def test_trial_bytes_are_the_byte_model_of_the_fp16_weight(full_sweep, digits_model):
    result, _ = full_sweep
    folded = fold_batchnorm(digits_model)
    for t in result.trials[::7]:
        weight = folded.get_parameter(t.layer).detach().to(torch.float16).numpy()
        assert t.bytes == predicted_bytes(t.spec, weight.shape, t.op_type, weight=weight)
        assert t.bytes < t.fp16_bytes


@pytest.mark.parametrize("layer,spec", [("features.7.weight", "pal2"), ("features.3.weight", "int4/block32"),
                                        ("classifier.0.weight", "prune50"), ("features.10.weight", "pal6"),
                                        ("classifier.2.weight", "int8")])
def test_trials_equal_coremltools_compress_decompress_evaluate(full_sweep, psnr_sweep, example_mlpackage,
                                                               digits_model, heldout, layer, spec):
    """coremltools compresses the package with an op_name config for one layer; same metric, same drop."""
    result, _ = full_sweep
    folded = fold_batchnorm(digits_model)
    mlmodel = ct.models.MLModel(str(example_mlpackage), skip_model_load=True)
    info = next(l for l in result.layers if l.layer == layer)
    model = load_consts(folded, decompressed_consts(compress_one_layer(mlmodel, info, spec)))
    baseline_model = load_consts(folded, decompressed_consts(mlmodel))
    for sweep, metric in ((result, "accuracy"), (psnr_sweep, "psnr")):
        evaluate = make_evaluator(digits_model, heldout, metric)
        trial = next(t for t in sweep.trials if (t.layer, t.spec) == (layer, spec))
        assert evaluate(baseline_model) == sweep.baseline
        assert evaluate(model) == trial.metric
        assert sweep.baseline - evaluate(model) == trial.drop


@pytest.fixture(scope="module")
def psnr_sweep(digits_model, heldout):
    return analyse(digits_model, SHAPE, heldout, metric="psnr", progress=False,
                   candidates="int8,int4/block32,pal6,pal2,prune50")


def test_suffix_evaluation_changes_no_result(psnr_sweep, digits_model, heldout):
    full = analyse(digits_model, SHAPE, heldout, metric="psnr", candidates="int8,pal2,prune50",
                   progress=False, use_suffix=False)
    by_key = {(t.layer, t.spec): t.metric for t in psnr_sweep.trials}
    assert len(full.trials) == 15
    assert all(by_key[(t.layer, t.spec)] == t.metric for t in full.trials)
    assert len({t.metric for t in full.trials}) > 10  # psnr tells trials apart


def test_kl_drop_is_how_much_worse(digits_model, heldout):
    result = analyse(digits_model, SHAPE, heldout, metric="kl", candidates="pal2", progress=False)
    assert result.higher_is_better is False and result.fp32_metric == pytest.approx(0.0, abs=1e-12)
    assert all(t.drop == pytest.approx(t.metric - result.baseline) and t.drop > 0 for t in result.trials)


class _Tied(nn.Module):
    """Embedding and output projection share one weight; forward has no fx-traceable control flow issue."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(100, 64)
        self.mid = nn.Linear(64, 64)
        self.head = nn.Linear(64, 100, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(self.embed(x.long().clamp(0, 99)))))


class _Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so trials run full forward passes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x.flatten(1))
        if h.sum() > 1e9:
            h = -h
        return self.b(torch.relu(h))


class _InPlace(nn.Module):
    """Residual blocks whose forward changes an activation in place after a layer read it: by a
    method (``mul_``), by ``out=``, or with the layers defined out of call order."""

    def __init__(self, how: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.how = how
        if how == "reordered":  # b before a: cuts are checked in definition order
            self.b = nn.Linear(64, 64)
            self.a = nn.Linear(64, 64)
        else:
            self.a = nn.Linear(64, 64)
            self.b = nn.Linear(64, 64)
        self.c = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x.flatten(1)))
        y = self.b(h)
        if self.how == "out":
            torch.mul(h, 2.0, out=h)
        else:
            h.mul_(2.0)
        z = torch.relu(y + h)
        return self.c(z) + self.c(h)


@pytest.mark.parametrize("how", ["method", "out", "reordered"])
def test_suffix_never_starts_from_an_activation_changed_in_place(how):
    data = torch.rand(40, 64)
    kwargs = dict(metric="sqnr", candidates="int8,int4/block32,pal2", progress=False, include_all=True)
    fast = analyse(_InPlace(how), (1, 64), data, **kwargs)
    slow = analyse(_InPlace(how), (1, 64), data, use_suffix=False, **kwargs)
    assert len(fast.trials) == 9 and len({t.metric for t in fast.trials}) > 5
    assert [t.metric for t in fast.trials] == [t.metric for t in slow.trials]


def test_cuts_without_in_place_changes_are_kept(digits_model, heldout):
    from coreml_opt.model.convert import fold_batchnorm
    from coreml_opt.sensitivity.evaluate import run_batches
    from coreml_opt.sensitivity.layers import fp16_copy
    from coreml_opt.sensitivity.suffix import SuffixRunner

    base = fp16_copy(fold_batchnorm(digits_model))
    names = ["features.3.weight", "features.7.weight", "classifier.0.weight"]
    runner = SuffixRunner(base, {name: (name,) for name in names})
    batches = [heldout.x[:100], heldout.x[100:]]
    expected = run_batches(base, batches)
    runner.prepare(batches, expected)
    assert sorted(runner.available) == sorted(names)
    for name in names:
        assert all(torch.equal(a, b) for a, b in zip(runner.outputs(name), expected))


def test_tied_weights_are_one_layer():
    data = torch.randint(0, 100, (32, 6)).float()
    result = analyse(_Tied(), (1, 6), data, metric="cosine", candidates="int8", progress=False)
    tied = next(l for l in result.layers if l.layer == "embed.weight")
    assert tied.aliases == ("head.weight",) and tied.op_type == "gather+linear"
    assert [l.layer for l in result.layers] == ["embed.weight", "mid.weight"]
    assert len(result.trials) == 2


def test_untraceable_model_falls_back_to_full_forward():
    data = torch.rand(40, 64)
    fast = analyse(_Branchy(), (1, 64), data, metric="sqnr", candidates="pal2", progress=False,
                   include_all=True)
    slow = analyse(_Branchy(), (1, 64), data, metric="sqnr", candidates="pal2", progress=False,
                   include_all=True, use_suffix=False)
    assert [t.metric for t in fast.trials] == [t.metric for t in slow.trials] and len(fast.trials) == 2


@pytest.mark.parametrize("field, value, fragment", [
    ("max_trials", "five", "max_trials"),
    ("time_budget", [1, 2], "time_budget"),
    ("kmeans", "slow", "not one of"),
    ("all_layers", "yes", "must be true or false"),
])
def test_sweep_file_fields_are_checked_like_options(tmp_path, field, value, fragment):
    import yaml

    from conftest import run_cli

    sweep = {"model": "coreml_opt.zoo:digits_cnn", "input_shape": [1, 1, 8, 8], "metric": "kl",
             "candidates": ["int8"], "out": str(tmp_path / "out"), field: value}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    code, _, stderr = run_cli("sensitivity", str(path))
    assert code == 2 and stderr.count("\n") == 1 and fragment in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


def test_command_line_options_override_the_sweep_file(tmp_path):
    """`sensitivity sweep.yaml --out elsewhere --candidates int8` writes elsewhere with int8 only: a flag the user
    typed wins over the file's field (it used to be silently ignored)."""
    import json

    from conftest import run_cli

    sweep = tmp_path / "s.yaml"
    sweep.write_text("model: coreml_opt.zoo:digits_cnn\ninput_shape: [1, 1, 8, 8]\n"
                     "data: coreml_opt.sensitivity.examples:digits_heldout\nmetric: kl\n"
                     "candidates: [int8, pal4]\nout: from_file\n")
    code, out, err = run_cli("sensitivity", str(sweep), "--out", str(tmp_path / "from_flag"), "--candidates", "int8",
                             "--no-progress")
    assert code == 0, err
    assert (tmp_path / "from_flag" / "sweep.json").exists() and not (tmp_path / "from_file").exists()
    assert json.loads((tmp_path / "from_flag" / "sweep.json").read_text())["candidates"] == ["int8"]
