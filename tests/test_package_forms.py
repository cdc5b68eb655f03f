"""Every package form coremltools 9 writes is read whole, or refused in one line before any work.

Forms: a top-level ``nn.Sequential`` (names sanitised to ``op_0_…``/``var_0_…``), a package saved by
``coremltools.utils.save_multifunction`` (several functions, or one not named ``main``), and a
function of several blocks. Compressed packages must hold exactly the predicted bytes and the
simulated weights.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import run_cli
from coreml_opt.compress import compress
from coreml_opt.model.package import load_package
from coreml_opt.plan import Plan
from coreml_opt.simulate import simulate


def _seeded(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return module.eval()


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture(scope="session")
def sequential_package(tmp_path_factory) -> tuple[Path, nn.Module]:
    from coreml_opt.model.convert import convert

    model = _seeded(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)), 1)
    path = tmp_path_factory.mktemp("forms") / "seq.mlpackage"
    convert(model, (1, 64), output_path=path)
    return path, model


@pytest.fixture(scope="session")
def function_packages(tmp_path_factory) -> dict[str, Path]:
    """Two single-function packages (different weights) and the multifunction packages made of them."""
    import coremltools as ct

    from coreml_opt.model.convert import convert

    folder = tmp_path_factory.mktemp("functions")
    out = {}
    for label, seed in (("a", 2), ("b", 3)):
        out[label] = folder / f"{label}.mlpackage"
        convert(_seeded(TwoLinear(), seed), (1, 64), output_path=out[label])
    for label, functions in (("two", [("a", "main"), ("b", "other")]), ("shared", [("a", "main"), ("a", "again")]),
                             ("renamed", [("a", "classify")])):
        desc = ct.utils.MultiFunctionDescriptor()
        for source, name in functions:
            desc.add_function(str(out[source]), src_function_name="main", target_function_name=name)
        desc.default_function_name = functions[0][1]
        out[label] = folder / f"{label}.mlpackage"
        ct.utils.save_multifunction(desc, str(out[label]))
    return out


# ---------------------------------------------------------------- (a) top-level nn.Sequential

def test_sequential_weights_are_named_by_const_op_and_mapped_to_torch(sequential_package):
    path, _ = sequential_package
    inventory = load_package(path, load_weights=False).inventory
    assert [(w.name, w.torch_name) for w in inventory.weights] == [
        ("op_0_weight_to_fp16", "0.weight"), ("op_2_weight_to_fp16", "2.weight")]


@pytest.mark.parametrize("spec_text", ["int8", "pal4", "prune50"])
def test_sequential_compresses_to_predicted_bytes_and_simulated_weights(sequential_package, tmp_path, spec_text):
    path, model = sequential_package
    report = compress(path, Plan.from_spec(spec_text), tmp_path / "out.mlpackage")
    assert report.bytes_after == report.bytes_predicted
    assert [w.torch_name for w in report.inventory_after.weights] == ["0.weight", "2.weight"]
    emitted = _decompressed(tmp_path / "out.mlpackage")
    for w in report.weights:
        ours = simulate(spec_text, model.get_parameter(w.torch_name).detach(), "linear").weight.numpy()
        np.testing.assert_array_equal(ours, emitted[w.name])


def test_sequential_layer_override_reaches_coremltools(sequential_package, tmp_path):
    path, _ = sequential_package
    plan = Plan.from_dict({"global": "int8", "layers": {"0.weight": "int4/block32"}})
    report = compress(path, plan, tmp_path / "out.mlpackage")
    kinds = {w.torch_name: w.compression for w in report.inventory_after.weights}
    assert kinds == {"0.weight": "quantized int4", "2.weight": "quantized int8"}
    assert report.bytes_after == report.bytes_predicted


def _decompressed(package: Path) -> dict[str, np.ndarray]:
    """Const op name -> the value coremltools decompresses each conv/linear weight to."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    from coreml_opt.model.inventory import COMPRESSED_SUFFIX

    program = cto.decompress_weights(ct.models.MLModel(str(package), skip_model_load=True))._mil_program
    return {COMPRESSED_SUFFIX.sub("", op.inputs["weight"].op.name): np.asarray(op.inputs["weight"].val, np.float32)
            for op in program.functions["main"].operations if op.op_type in ("linear", "conv")}


# ---------------------------------------------------------------- (c) several functions

def test_multifunction_inventory_lists_every_function(function_packages):
    single = load_package(function_packages["a"], load_weights=False).inventory
    loaded = load_package(function_packages["two"], load_weights=False)
    names = [w.name for w in loaded.inventory.weights]
    assert names == ["fc1_weight_to_fp16", "fc2_weight_to_fp16", "other/fc1_weight_to_fp16", "other/fc2_weight_to_fp16"]
    assert loaded.inventory.total_bytes == 2 * single.total_bytes
    assert loaded.program.functions == ["main", "other"] and loaded.multifunction
    for name, seed in (("fc1_weight_to_fp16", 2), ("other/fc1_weight_to_fp16", 3)):  # each function's own values
        stored = _seeded(TwoLinear(), seed).fc1.weight.detach().to(torch.float16).numpy()
        np.testing.assert_array_equal(loaded.weight_values(name), stored)


def test_multifunction_shared_consts_are_counted_once(function_packages):
    single = load_package(function_packages["a"], load_weights=False).inventory
    shared = load_package(function_packages["shared"], load_weights=False).inventory
    assert [w.name for w in shared.weights] == [w.name for w in single.weights]
    assert shared.total_bytes == single.total_bytes
    assert [len(w.consumers) for w in shared.weights] == [2, 2]


def test_single_function_not_named_main_is_read(function_packages):
    inventory = load_package(function_packages["renamed"], load_weights=False).inventory
    assert [w.name for w in inventory.weights] == ["fc1_weight_to_fp16", "fc2_weight_to_fp16"]
    assert inventory.total_bytes == load_package(function_packages["a"], load_weights=False).inventory.total_bytes


@pytest.mark.parametrize("label", ["two", "renamed"])
def test_compress_refuses_multifunction_package_in_one_line(function_packages, tmp_path, label):
    out = tmp_path / "out.mlpackage"
    code, stdout, stderr = run_cli("compress", str(function_packages[label]), "--spec", "int8", "-o", str(out))
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "multifunction package" in lines[0] and str(function_packages[label]) in lines[0]
    assert "Traceback" not in stderr and not out.exists() and list(tmp_path.iterdir()) == []


def test_function_of_several_blocks_is_refused_in_one_line(function_packages, tmp_path):
    import shutil

    from coremltools.proto import Model_pb2

    from coreml_opt.model.package import _model_proto_path

    package = tmp_path / "blocks.mlpackage"
    shutil.copytree(function_packages["a"], package)
    proto_path = _model_proto_path(package)
    spec = Model_pb2.Model()
    spec.ParseFromString(proto_path.read_bytes())
    function = spec.mlProgram.functions["main"]
    function.block_specializations["CoreML9"].CopyFrom(function.block_specializations[function.opset])
    proto_path.write_bytes(spec.SerializeToString())
    code, stdout, stderr = run_cli("inspect", str(package))
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "one block per function" in stderr


# ---------------------------------------------------------------- (b) fp32 weights

FP32_SPECS = ["int8", "int4/block32", "uint8/asym", "pal8", "pal4/g16", "pal4/pcs", "pal2/vec2", "pal4/uniform",
              "prune50", "prune2:4", "thresh0.05", "prune50+pal4", "pal4+lut8", "prune2:4+int4/block16"]


def _fp32_package(folder: Path, target: int) -> tuple[Path, nn.Module]:
    """A package converted with ``compute_precision=FLOAT32``: its weights are fp32 consts."""
    import coremltools as ct

    model = _seeded(TwoLinear(), 4)
    traced = torch.jit.trace(model, torch.rand(1, 64))
    mlmodel = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=(1, 64))], convert_to="mlprogram",
                         minimum_deployment_target=getattr(ct.target, f"iOS{target}"),
                         compute_precision=ct.precision.FLOAT32)
    path = folder / f"fp32-ios{target}.mlpackage"
    mlmodel.save(str(path))
    return path, model


@pytest.fixture(scope="session")
def fp32_package(tmp_path_factory) -> tuple[Path, nn.Module]:
    return _fp32_package(tmp_path_factory.mktemp("fp32"), 18)


@pytest.fixture(scope="session")
def fp32_ios16_package(tmp_path_factory) -> tuple[Path, nn.Module]:
    return _fp32_package(tmp_path_factory.mktemp("fp32"), 16)


def test_fp32_weights_are_labelled_fp32(fp32_package):
    inventory = load_package(fp32_package[0], load_weights=False).inventory
    assert [(w.name, w.dtype, w.compression, w.bytes) for w in inventory.weights] == [
        ("fc1_weight", "fp32", "fp32", 64 + 128 * 64 * 4), ("fc2_weight", "fp32", "fp32", 64 + 32 * 128 * 4)]
    assert not any(w.is_compressed for w in inventory.weights)


@pytest.mark.parametrize("spec_text", FP32_SPECS)
def test_fp32_package_compresses_to_predicted_bytes_and_simulated_weights(fp32_package, tmp_path, spec_text):
    path, model = fp32_package
    report = compress(path, Plan.from_spec(spec_text), tmp_path / "out.mlpackage")
    assert report.bytes_after == report.bytes_predicted, [(w.name, w.bytes_after, w.bytes_predicted)
                                                          for w in report.weights]
    emitted = _decompressed(tmp_path / "out.mlpackage")
    for w in report.weights:
        torch_path = w.name.replace("_", ".")  # fc1_weight -> fc1.weight
        ours = simulate(spec_text, model.get_parameter(torch_path).detach(), "linear", precision="fp32").weight
        np.testing.assert_array_equal(ours.numpy(), emitted[w.name])


@pytest.mark.parametrize("spec_text", ["int8", "uint8/asym", "pal8", "pal6/uniform", "prune50", "thresh0.05"])
def test_fp32_ios16_package_compresses_to_predicted_bytes(fp32_ios16_package, tmp_path, spec_text):
    report = compress(fp32_ios16_package[0], Plan.from_spec(spec_text), tmp_path / "out.mlpackage")
    assert report.bytes_after == report.bytes_predicted


def test_fp32_package_refuses_fast_kmeans_in_one_line(fp32_package, tmp_path):
    out = tmp_path / "out.mlpackage"
    code, _, stderr = run_cli("compress", str(fp32_package[0]), "--spec", "pal4", "--kmeans", "fast", "-o", str(out))
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "fp32" in stderr and not out.exists()


# ---------------------------------------------------------------- the CLI on each form

def test_cli_inspects_and_compresses_sequential_and_fp32_packages(sequential_package, fp32_package, tmp_path):
    for label, path, dtype in (("seq", sequential_package[0], "fp16"), ("fp32", fp32_package[0], "fp32")):
        code, stdout, stderr = run_cli("inspect", str(path))
        assert code == 0 and stdout.count(f"  {dtype}") == 2, stdout
        out = tmp_path / f"{label}.mlpackage"
        code, stdout, stderr = run_cli("compress", str(path), "--spec", "int4/block32", "-o", str(out))
        assert code == 0 and "Traceback" not in stderr and out.is_dir(), stderr
        assert stdout.count("quantized int4") == 2 and "+0.00%" in stdout, stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32.mlpackage", "seq.mlpackage"]  # no stray temp folder


def test_cli_inspect_lists_every_function(function_packages):
    code, stdout, stderr = run_cli("inspect", str(function_packages["two"]))
    assert code == 0 and "other/fc1_weight_to_fp16" in stdout and "Traceback" not in stderr
    assert "ML Program with functions main, other" in stdout.splitlines()[0]


def test_sweep_layer_names_match_the_sequential_package(sequential_package):
    from coreml_opt.sensitivity.layers import find_layers

    path, model = sequential_package
    names = [w.name for w in load_package(path, load_weights=False).inventory.weights]
    assert [layer.coreml_name for layer in find_layers(model, weight_threshold=0)] == names


def test_apply_plan_in_fp32_holds_the_fp32_package_weights(fp32_package):
    from coreml_opt.simulate import apply_plan

    path, model = fp32_package
    loaded = load_package(path, load_weights=False)
    original = model.fc1.weight.detach().clone()
    expected = simulate("int8", model.fc2.weight.detach(), "linear", precision="fp32").weight
    with apply_plan(model, {"fc1.weight": "none", "fc2.weight": "int8"}, precision="fp32"):
        np.testing.assert_array_equal(model.fc1.weight.detach().numpy(), loaded.weight_values("fc1_weight"))
        assert torch.equal(model.fc2.weight.detach(), expected)
    assert torch.equal(model.fc1.weight.detach(), original)


@pytest.fixture(scope="session")
def mixed_precision_package(tmp_path_factory) -> tuple[Path, nn.Module]:
    """fc1 computed (and stored) in fp16, fc2 kept in fp32 by an FP16ComputePrecision op selector."""
    import coremltools as ct

    model = _seeded(TwoLinear(), 5)
    traced = torch.jit.trace(model, torch.rand(1, 64))
    precision = ct.transform.FP16ComputePrecision(op_selector=lambda op: not op.name.startswith("linear_1"))
    mlmodel = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=(1, 64))], convert_to="mlprogram",
                         minimum_deployment_target=ct.target.iOS18, compute_precision=precision)
    path = tmp_path_factory.mktemp("mixed") / "mixed.mlpackage"
    mlmodel.save(str(path))
    return path, model


@pytest.mark.parametrize("spec_text", ["int8", "prune50+pal4"])
def test_mixed_precision_package_is_predicted_and_simulated_per_weight(mixed_precision_package, tmp_path, spec_text):
    path, model = mixed_precision_package
    before = load_package(path, load_weights=False).inventory
    assert [(w.torch_name or w.name, w.dtype) for w in before.weights] == [("fc1_weight_to_fp16", "fp16"),
                                                                           ("fc2_weight", "fp32")]
    report = compress(path, Plan.from_spec(spec_text), tmp_path / "out.mlpackage")
    assert report.bytes_after == report.bytes_predicted
    emitted = _decompressed(tmp_path / "out.mlpackage")
    for w, param in zip(before.weights, (model.fc1.weight, model.fc2.weight)):
        ours = simulate(spec_text, param.detach(), "linear", precision=w.dtype).weight
        np.testing.assert_array_equal(ours.numpy(), emitted[w.name])


def test_package_sweep_of_an_fp32_package_simulates_and_counts_fp32(fp32_package, tmp_path):
    """A package-only sweep, the planner's bytes and --measure's simulated weights use the stored fp32 precision
    (they assumed fp16: the sweep found no weight to sweep, and --measure simulated fp16 palettes)."""
    from coreml_opt.measure import simulated_overrides
    from coreml_opt.sensitivity import analyse_package

    path, _ = fp32_package
    result = analyse_package(path, None, metric="kl", candidates="int8,pal4,prune50", progress=False,
                             out_dir=tmp_path / "sweep")
    assert {layer.precision for layer in result.layers} == {"fp32"}
    assert [layer.fp16_bytes for layer in result.layers] == [64 + 128 * 64 * 4, 64 + 32 * 128 * 4]
    assert len(result.trials) == 6
    for trial in result.trials:
        plan = Plan.from_dict({"layers": {trial.coreml_name: trial.spec}})
        report = compress(path, plan, tmp_path / f"{trial.coreml_name}-{trial.spec}.mlpackage")
        assert {w.name: w.bytes_after for w in report.weights}[trial.coreml_name] == trial.bytes, trial
    emitted = _decompressed(tmp_path / "fc1_weight-pal4.mlpackage")
    (value,) = simulated_overrides(path, {"fc1_weight": "pal4"}).values()
    np.testing.assert_array_equal(value.numpy(), emitted["fc1_weight"])
