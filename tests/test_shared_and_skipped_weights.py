"""Weights read by several ops are one layer, and specs coremltools would skip are never emitted or scored.

Issue 11, kinds 3 and 4: a tied embedding + LM head and a conv + conv_transpose sharing one weight;
a depthwise conv (960x1x3x3) under vector palettization; threshold pruning short of its minimum.
Every expectation comes from what coremltools 9 itself emits for these small models.
"""
from __future__ import annotations

import json

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import run_cli


class _TiedLM(nn.Module):
    """Embedding and LM head sharing one weight (an ``nn.Embedding`` becomes ``gather``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(128, 64)
        self.head = nn.Linear(64, 128, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)))


class _ConvTied(nn.Module):
    """One 32x32x3x3 weight read by a conv and by a conv_transpose (output channels on different axes)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(32, 32, 3, 3) * 0.1)

    def forward(self, x):
        return F.conv_transpose2d(torch.relu(F.conv2d(x, self.w, padding=1)), self.w, padding=1)


class _Depthwise(nn.Module):
    """A pointwise conv to 960 channels, a 960x1x3x3 depthwise conv, and a pointwise conv back."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pw = nn.Conv2d(8, 960, 1)
        self.dw = nn.Conv2d(960, 960, 3, padding=1, groups=960)
        self.fc = nn.Conv2d(960, 16, 1)

    def forward(self, x):
        return self.fc(torch.relu(self.dw(torch.relu(self.pw(x)))))


@pytest.fixture(scope="session")
def small_packages(tmp_path_factory) -> dict[str, Path]:
    """The three models converted once for iOS18 (the tied LM with int32 token ids, via ct.convert)."""
    import coremltools as ct

    from coreml_opt.model.convert import convert

    root = tmp_path_factory.mktemp("shared")
    out = {"convtied": root / "convtied.mlpackage", "dw": root / "dw.mlpackage", "tiedlm": root / "tiedlm.mlpackage"}
    convert(_ConvTied(), (1, 32, 8, 8), target="iOS18", output_path=out["convtied"])
    convert(_Depthwise(), (1, 8, 4, 4), target="iOS18", output_path=out["dw"])
    traced = torch.jit.trace(_TiedLM().eval(), torch.zeros(1, 5, dtype=torch.long))
    ct.convert(traced, inputs=[ct.TensorType(name="x", shape=(1, 5), dtype=np.int32)], convert_to="mlprogram",
               minimum_deployment_target=ct.target.iOS18,
               compute_precision=ct.precision.FLOAT16).save(str(out["tiedlm"]))
    return out


def _plan(tmp_path: Path, text: str) -> str:
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    return str(path)


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_inventory_names_every_reader_of_a_weight(small_packages):
    from coreml_opt.model.package import load_package

    kinds = {name: [w.reader_type for w in load_package(path, load_weights=False).inventory.weights]
             for name, path in small_packages.items()}
    assert kinds == {"convtied": ["conv+conv_transpose"], "dw": ["conv", "conv(groups=960)", "conv"],
                     "tiedlm": ["gather+linear"]}
    code, out, _ = run_cli("inspect", str(small_packages["tiedlm"]))
    assert code == 0 and "gather+linear" in out


def test_tied_lm_head_compresses_with_one_op_type_configured(small_packages, tmp_path):
    """`op_types: {linear: int8}` used to end in coremltools' "compression config conflict" traceback."""
    from coreml_opt.compress import compress
    from coreml_opt.model.package import load_package
    from coreml_opt.plan import Plan
    from coreml_opt.simulate import simulate_weight

    for spec in ("int8", "pal4"):
        out = tmp_path / f"tied-{spec}.mlpackage"
        report = compress(small_packages["tiedlm"], Plan.load(_plan(tmp_path, f"op_types:\n  linear: {spec}\n")), out)
        (row,) = report.weights
        assert row.spec == spec and row.compression != "fp16"
        assert row.bytes_after == row.bytes_predicted
    # the emitted weight is the simulation's (int8 here: palettes are covered by the fidelity tests)
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    loaded = load_package(small_packages["tiedlm"])
    (weight,) = loaded.inventory.weights
    program = cto.decompress_weights(ct.models.MLModel(str(tmp_path / "tied-int8.mlpackage")))._mil_program
    (emitted,) = [op.inputs["weight"].val for op in program.functions["main"].operations if op.op_type == "linear"]
    expected = simulate_weight("int8", loaded.weight_values(weight.name).astype(np.float32), weight.reader_type)
    np.testing.assert_array_equal(np.asarray(emitted, np.float32), expected)


def test_tied_lm_head_cli_compress_exits_0(small_packages, tmp_path):
    code, out, err = run_cli("compress", str(small_packages["tiedlm"]), "-c",
                             _plan(tmp_path, "op_types:\n  linear: int8\n"), "-o", str(tmp_path / "o.mlpackage"))
    assert code == 0, err
    assert "Traceback" not in err and "quantized int8" in out


@pytest.mark.parametrize("plan_text", ["op_types:\n  conv_transpose: int8\n", "layers:\n  w: pal4\n",
                                       "global: int8/tensor\n"])
def test_weight_shared_by_conv_and_conv_transpose_refuses_axis_specs_before_work(small_packages, tmp_path,
                                                                                  plan_text):
    """coremltools cannot pick a channel axis for it and skips quantization and palettization."""
    out = tmp_path / "o.mlpackage"
    code, _, err = run_cli("compress", str(small_packages["convtied"]), "-c", _plan(tmp_path, plan_text),
                           "-o", str(out))
    assert code == 2
    assert "shared by conv and conv_transpose" in _one_error_line(err)
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "plan.yaml"]


def test_coremltools_skips_the_shared_conv_weight_as_refused(small_packages):
    """The ground truth of the refusal above: coremltools leaves the weight fp16 for int8 and pal4."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    from coreml_opt.spec import parse_spec

    mlmodel = ct.models.MLModel(str(small_packages["convtied"]))
    for spec, function in (("int8/tensor", cto.linear_quantize_weights), ("pal4", cto.palettize_weights)):
        config = cto.OptimizationConfig(op_name_configs={"w_to_fp16": parse_spec(spec).coreml_config(0)})
        ops = function(mlmodel, config).get_spec().mlProgram.functions["main"].block_specializations
        assert not [op for block in ops.values() for op in block.operations if op.type.startswith("constexpr_")]


def test_weight_shared_by_conv_and_conv_transpose_can_be_pruned(small_packages, tmp_path):
    from coreml_opt.compress import compress
    from coreml_opt.plan import Plan

    report = compress(small_packages["convtied"], Plan.load(_plan(tmp_path, "layers:\n  w: prune50\n")),
                      tmp_path / "o.mlpackage")
    (row,) = report.weights
    assert row.compression == "sparse 50%" and row.bytes_after == row.bytes_predicted


def test_conflicting_op_type_specs_on_a_shared_weight_are_refused_in_one_line(small_packages, tmp_path):
    code, _, err = run_cli("compress", str(small_packages["convtied"]), "-c",
                           _plan(tmp_path, "op_types:\n  conv: prune50\n  conv_transpose: prune75\n"),
                           "-o", str(tmp_path / "o.mlpackage"))
    assert code == 2 and "shared by ops with different specs" in _one_error_line(err)


def test_vector_palettization_of_a_depthwise_conv_is_a_skip_in_the_simulation(small_packages):
    """coremltools' is_cluster_dim_valid: 960 groups leave one channel per group, which vec2 cannot divide."""
    from coreml_opt.model.package import load_package
    from coreml_opt.simulate import simulate

    loaded = load_package(small_packages["dw"])
    by_name = loaded.inventory.by_name()
    dw = by_name["dw_weight_to_fp16"]
    result = simulate("pal2/vec2", torch.from_numpy(loaded.weight_values(dw.name).astype(np.float32)),
                      dw.reader_type)
    assert result.skipped and "groups=960" in result.skipped
    pw = by_name["pw_weight_to_fp16"]  # same channel count, not grouped: compressed
    assert simulate("pal2/vec2", torch.from_numpy(loaded.weight_values(pw.name).astype(np.float32)),
                    pw.reader_type).skipped is None


def test_coremltools_skips_vector_palettization_of_the_depthwise_conv(small_packages):
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    from coreml_opt.spec import parse_spec

    config = cto.OptimizationConfig(global_config=parse_spec("pal2/vec2").coreml_config(0))
    compressed = cto.palettize_weights(ct.models.MLModel(str(small_packages["dw"])), config)
    block = compressed.get_spec().mlProgram.functions["main"].block_specializations
    lut_outputs = {op.outputs[0].name for b in block.values() for op in b.operations
                   if op.type == "constexpr_lut_to_dense"}
    assert not any(name.startswith("dw_weight") for name in lut_outputs)
    assert any(name.startswith("pw_weight") for name in lut_outputs)


def test_compress_leaves_depthwise_conv_fp16_under_global_vector_palettization(small_packages, tmp_path):
    """A global spec leaves the depthwise conv in fp16 as coremltools does, and names it; by name it is refused."""
    out = tmp_path / "o.mlpackage"
    code, stdout, err = run_cli("compress", str(small_packages["dw"]), "--spec", "pal2/vec2", "-o", str(out), "--json")
    assert code == 0, err
    skipped = json.loads(stdout)["skipped"]
    assert [name for name in skipped if name.startswith("dw_weight")] and "groups=960" in str(skipped)
    plan = tmp_path / "plan.yaml"
    plan.write_text("layers:\n  dw: pal2/vec2\n")
    out2 = tmp_path / "o2.mlpackage"
    code, _, err = run_cli("compress", str(small_packages["dw"]), "-c", str(plan), "-o", str(out2))
    assert code == 2
    line = _one_error_line(err)
    assert "dw_weight_to_fp16" in line and "groups=960" in line
    assert not out2.exists()


def test_sweep_records_depthwise_vector_palettization_as_skipped():
    from coreml_opt.sensitivity.sweep import analyse

    data = torch.rand(8, 8, 4, 4)
    result = analyse(_Depthwise(), (1, 8, 4, 4), data, metric="cosine", candidates="pal2/vec2", progress=False)
    scored = {(t.layer, t.spec) for t in result.trials}
    assert scored == {("pw.weight", "pal2/vec2"), ("fc.weight", "pal2/vec2")}
    (skip,) = result.skipped_trials
    assert skip["layer"] == "dw.weight" and "groups=960" in skip["reason"]
    assert next(l for l in result.layers if l.layer == "dw.weight").op_type == "conv(groups=960)"


def test_sweep_records_threshold_pruning_short_of_its_minimum_as_skipped():
    """Sparsity depends on the values: a trial coremltools would skip is a skipped trial, not a score."""
    from coreml_opt.sensitivity.sweep import analyse

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    with torch.no_grad():
        model[0].weight.mul_(100.0)  # nothing below 0.001 in the first layer
        model[2].weight.zero_()
    result = analyse(model, (1, 64), torch.rand(8, 64), metric="cosine", candidates="thresh0.001/min30",
                     progress=False)
    assert [t.layer for t in result.trials] == ["2.weight"]
    (skip,) = result.skipped_trials
    assert skip["layer"] == "0.weight" and "minimum_sparsity_percentile" in skip["reason"]


def test_global_threshold_pruning_compresses_the_layers_that_reach_the_minimum(example_mlpackage, tmp_path):
    """On the digits model only features.7 has 40 % of |w| <= 0.02; the others are reported and stay fp16."""
    out = tmp_path / "o.mlpackage"
    code, stdout, err = run_cli("compress", str(example_mlpackage), "--spec", "thresh0.02/min40", "-o", str(out))
    assert code == 0, err
    assert out.exists()
    from coreml_opt.model.package import load_package

    after = {w.torch_name: w.compression for w in load_package(out, load_weights=False).inventory.weights}
    assert after["features.7.weight"].startswith("sparse")
    assert after["features.3.weight"] == "fp16" and after["classifier.0.weight"] == "fp16"
    assert "left features_3_weight_to_fp16 in fp16" in stdout and "minimum_sparsity_percentile" in stdout
    assert "left features_7_weight_to_fp16" not in stdout


def test_global_threshold_pruning_bytes_equal_the_prediction(example_mlpackage, tmp_path):
    from coreml_opt.compress import compress
    from coreml_opt.plan import Plan

    report = compress(example_mlpackage, Plan.from_spec("thresh0.02/min40"), tmp_path / "o.mlpackage")
    assert report.bytes_after == report.bytes_predicted
    assert "features_3_weight_to_fp16" in report.skipped and "features_7_weight_to_fp16" not in report.skipped


def test_per_layer_threshold_pruning_short_of_its_minimum_is_refused(example_mlpackage, tmp_path):
    out = tmp_path / "o.mlpackage"
    code, _, err = run_cli("compress", str(example_mlpackage), "-c",
                           _plan(tmp_path, "layers:\n  features.3: thresh0.02/min40\n"), "-o", str(out))
    assert code == 2 and "features.3" in _one_error_line(err)
    assert not out.exists()


class _TiedConvPair(nn.Module):
    """A Conv2d and a ConvTranspose2d module tied to one weight, then a pointwise conv."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.up = nn.ConvTranspose2d(32, 32, 3, padding=1, bias=False)
        self.up.weight = self.conv.weight
        self.fc = nn.Conv2d(32, 128, 1)

    def forward(self, x):
        return self.fc(self.up(torch.relu(self.conv(x))))


def test_planned_budget_on_a_shared_weight_emits(tmp_path):
    """The sweep scores only what compress can emit on the shared weight, so the plan's package is written
    with exactly the predicted bytes (it used to score int8/pal4 there, which coremltools skips)."""
    from coreml_opt.model.convert import convert
    from coreml_opt.planning.session import PlanningSession
    from coreml_opt.sensitivity.sweep import analyse

    result = analyse(_TiedConvPair(), (1, 32, 4, 4), torch.rand(8, 32, 4, 4), metric="cosine",
                     candidates="int8,pal4,prune50", out_dir=tmp_path / "sweep", progress=False)
    (shared,) = [layer for layer in result.layers if layer.aliases]
    assert shared.op_type == "conv+conv_transpose"
    assert {t.spec for t in result.trials if t.layer == shared.layer} == {"prune50"}
    assert {s["spec"] for s in result.skipped_trials if s["layer"] == shared.layer} == {"int8", "pal4"}
    session = PlanningSession.open(tmp_path / "sweep", measure=False)
    plan = session.plan(bpw=8, validate=False)
    convert(_TiedConvPair(), (1, 32, 4, 4), target="iOS18", output_path=tmp_path / "m.mlpackage")
    report = session.emit(plan, tmp_path / "o.mlpackage", model_package=tmp_path / "m.mlpackage")
    assert all(w.bytes_after == w.bytes_predicted for w in report.weights)
    assert report.bytes_after == plan.bytes


def test_plan_measurement_simulates_a_depthwise_conv_as_coremltools_emits_it():
    """apply_plan (plan validation, examples) sees the module's groups: vec2 on a depthwise conv stays fp16."""
    from coreml_opt.simulate import apply_plan

    model = _Depthwise()
    before = model.dw.weight.detach().to(torch.float16).float()
    with apply_plan(model, {"dw.weight": "pal2/vec2", "pw.weight": "pal2/vec2"}) as results:
        assert results["dw.weight"].skipped and torch.equal(model.dw.weight.detach(), before)
        assert results["pw.weight"].skipped is None


def test_every_trial_a_sweep_records_is_one_compress_emits(small_packages, tmp_path):
    """Each scored (layer, spec) of a depthwise model compresses per layer, to exactly the trial's bytes;
    each one coremltools would skip is a skipped trial instead."""
    import shutil

    from coreml_opt.compress import compress
    from coreml_opt.plan import Plan
    from coreml_opt.sensitivity.sweep import analyse

    result = analyse(_Depthwise(), (1, 8, 4, 4), torch.rand(8, 8, 4, 4), metric="cosine", progress=False,
                     candidates="int8,int4/block32,pal2/vec2,prune2:4,thresh0.01/min30")
    assert {(s["layer"], s["spec"]) for s in result.skipped_trials} >= {
        ("dw.weight", "pal2/vec2"), ("dw.weight", "prune2:4"), ("dw.weight", "thresh0.01/min30")}
    assert result.trials
    for trial in result.trials:
        out = tmp_path / "o.mlpackage"
        report = compress(small_packages["dw"], Plan.from_dict({"layers": {trial.layer: trial.spec}}), out)
        (row,) = [w for w in report.weights if w.torch_name == trial.layer]
        assert (row.compression != "fp16", row.bytes_after) == (True, trial.bytes), trial
        shutil.rmtree(out)


def test_readme_threshold_spec_on_the_digits_model_names_every_layer_it_leaves(example_mlpackage, tmp_path):
    """The README's `thresh0.001/min30`: no digits layer reaches 30 %; each is named, none is an error."""
    out = tmp_path / "o.mlpackage"
    code, stdout, err = run_cli("compress", str(example_mlpackage), "--spec", "thresh0.001/min30", "-o", str(out))
    assert code == 0, err
    left = [line for line in stdout.splitlines() if line.startswith("left ")]
    assert len(left) == 5 and all("minimum_sparsity_percentile 0.3" in line for line in left)
    assert out.exists()


class _TwoLinearsEqualBias(nn.Module):
    """Two linears whose biases are equal: coremltools stores them as one const read by both ops."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.fc1, self.fc2 = nn.Linear(128, 128), nn.Linear(128, 128)  # >= 100 elements: deduplicated
        with torch.no_grad():
            self.fc2.bias.copy_(self.fc1.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("layers", [{"fc1": "pal4", "fc2": "int8"}, {"fc1": "pal4", "fc2": "prune50"},
                                    {"fc1": "pal4"}])
def test_a_mixed_plan_does_not_reach_a_bias_shared_with_another_op(tmp_path, layers):
    """A multi-pass plan keyed its configs by the reading op, which also reached the deduplicated bias read by the
    other linear: coremltools' "compression config conflict" traceback (seen on a transformer's in-proj biases)."""
    from coreml_opt.compress import compress
    from coreml_opt.model.convert import convert
    from coreml_opt.plan import Plan

    path = tmp_path / "bias.mlpackage"
    convert(_TwoLinearsEqualBias().eval(), (1, 128), target="iOS18", output_path=path)
    plan = Plan.from_dict({"layers": {**layers, "fc2" if "fc2" not in layers else "fc1": "none"}
                           if len(layers) == 1 else layers})
    report = compress(path, plan, tmp_path / "out.mlpackage")
    assert report.bytes_after == report.bytes_predicted
