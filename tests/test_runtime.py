"""The package runtime runs real converted .mlpackage files in PyTorch and matches the torch models.

Six models (digits CNN, LeNet5, MobileNetV2-style with BN left to coremltools and BN folded by us,
EfficientNet-style, a transformer encoder on int token ids, a ConvTranspose2d/upsample/concat net) are
converted once per module (iOS18, fp16 compute precision). Measured on a batch of 16 (CPU, torch 2.13):
fp32 mode vs the fp32 torch model, max |error| / max |reference|: digits 4.5e-4, lenet5 2.3e-4, mobilenet
1.6e-4 (folded 1.6e-4), efficientnet 2.6e-4, encoder 2.2e-4, upnet 2.5e-4 (the package holds fp16
weights; bound 2e-3); fp16 mode: at most 9e-4 (bound 4e-3). Top-1 agreement 1.0 in both modes.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import runtime_models as rm
from coreml_opt.errors import ModelError
from coreml_opt.runtime import load_graph, load_runtime, supported_ops

FP32_BOUND = 2e-3
FP16_BOUND = 4e-3
CASES = [("digits", False), ("lenet5", False), ("mobilenet", False), ("mobilenet", True), ("efficientnet", False),
         ("encoder", False), ("upnet", False)]


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """{(name, folded): (torch model, batch of 16 inputs, package path)}, converted once."""
    out = {}
    folder = tmp_path_factory.mktemp("runtime")
    for name, folded in CASES:
        model, example = rm.MODELS[name]()
        path = rm.convert_model(model, example, folder / f"{name}-{folded}.mlpackage", fold_bn=folded)
        gen = torch.Generator().manual_seed(7)
        if example.is_floating_point():
            batch = torch.rand((16, *example.shape[1:]), generator=gen)
        else:
            batch = torch.randint(0, 50, (16, *example.shape[1:]), generator=gen, dtype=example.dtype)
        out[(name, folded)] = (model, batch, path)
    return out


def _reference(model, batch):
    with torch.no_grad():
        return model(batch if batch.is_floating_point() else batch.long())


def _check(packages, case, precision, bound):
    model, batch, path = packages[case]
    runtime = load_runtime(path, precision=precision)
    (out,) = runtime({"x": batch}).values()
    ref = _reference(model, batch)
    assert out.shape == ref.shape and out.dtype == torch.float32
    rel = float((out - ref).abs().max() / ref.abs().max())
    assert rel < bound, f"{case} {precision}: max relative error {rel:.2e}"
    if ref.dim() == 2:
        assert torch.equal(out.argmax(-1), ref.argmax(-1)), f"{case} {precision}: top-1 disagrees"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0] + ("-folded" if c[1] else ""))
def test_fp32_runtime_on_fp16_package_matches_torch(packages, case):
    _check(packages, case, "fp32", FP32_BOUND)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0] + ("-folded" if c[1] else ""))
def test_fp16_runtime_stays_within_measured_tolerance(packages, case):
    _check(packages, case, "fp16", FP16_BOUND)


def test_batch_runs_equal_single_runs(packages):
    """A batch of 16 gives the rows that single-sample runs give: CNNs in one batched run, the encoder (whose
    attention reshapes hold a literal batch of 1 in a seq-first layout) through vmap."""
    for case, mode in [(("mobilenet", False), "batched"), (("encoder", False), "vmap"), (("upnet", False), "batched")]:
        _model, batch, path = packages[case]
        runtime = load_runtime(path)
        (whole,) = runtime({"x": batch}).values()
        assert runtime.batching == mode
        rows = torch.cat([list(runtime({"x": batch[i:i + 1]}).values())[0] for i in range(4)])
        torch.testing.assert_close(whole[:4], rows, rtol=1e-4, atol=1e-5)


def test_the_models_cover_the_listed_op_families(packages):
    seen = set()
    for _model, _batch, path in packages.values():
        seen |= {node.type for node in load_graph(path).nodes}
    for op in ["conv", "conv_transpose", "batch_norm", "clip", "silu", "sigmoid", "sigmoid_hard", "add", "mul",
               "avg_pool", "max_pool", "reduce_mean", "concat", "reshape", "upsample_bilinear",
               "upsample_nearest_neighbor", "linear", "gather", "layer_norm", "gelu", "transpose",
               "slice_by_index", "select", "scaled_dot_product_attention"]:
        assert op in seen, op
    assert seen <= set(supported_ops())


@pytest.mark.parametrize("precision,bound", [("fp32", FP32_BOUND), ("fp16", FP16_BOUND)])
def test_padding_pooling_and_layout_semantics_match_torch(tmp_path_factory, precision, bound):
    """Same (asymmetric) padding, dilated grouped conv, ceil-mode pooling excluding pads, reflect pad, output
    padding (conv_transpose + crop), split, softmax, matmul, instance norm: measured 1.1e-6 (fp32)."""
    model, example = rm.opmix()
    folder = tmp_path_factory.getbasetemp() / "opmix"
    path = folder / "opmix.mlpackage"
    if not path.exists():
        folder.mkdir(exist_ok=True)
        rm.convert_model(model, example, path)
    batch = torch.rand(5, *example.shape[1:], generator=torch.Generator().manual_seed(2))
    (out,) = load_runtime(path, precision=precision)({"x": batch}).values()
    ref = _reference(model, batch)
    assert float((out - ref).abs().max() / ref.abs().max()) < bound


def test_runs_on_cuda_when_present(packages):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    model, batch, path = packages[("efficientnet", False)]
    (out,) = load_runtime(path, device="cuda")({"x": batch.cuda()}).values()
    ref = _reference(model, batch)
    assert float((out.cpu() - ref).abs().max() / ref.abs().max()) < FP32_BOUND


def test_unknown_op_names_type_output_and_supported_list(tmp_path):
    class Cumulative(torch.nn.Module):
        def forward(self, x):
            return torch.cumsum(x, dim=1)

    path = rm.convert_model(Cumulative().eval(), torch.rand(1, 5), tmp_path / "cumsum.mlpackage")
    with pytest.raises(ModelError) as info:
        load_runtime(path)
    message = str(info.value)
    assert "'cumsum'" in message and "output '" in message and "conv" in message and "\n" not in message


def test_neuralnetwork_model_is_refused(tmp_path):
    import coremltools as ct

    traced = torch.jit.trace(rm.LeNet5().eval(), torch.rand(1, 1, 28, 28))
    mlmodel = ct.convert(traced, inputs=[ct.TensorType(shape=(1, 1, 28, 28))], convert_to="neuralnetwork")
    mlmodel.save(str(tmp_path / "lenet.mlmodel"))
    with pytest.raises(ModelError, match="neuralnetwork"):
        load_runtime(tmp_path / "lenet.mlmodel")


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_truncated_weights_are_refused(packages, tmp_path, damage):
    import shutil

    path = tmp_path / "lenet.mlpackage"
    shutil.copytree(packages[("lenet5", False)][2], path)
    weights = path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelError, match="weight.bin"):
        load_runtime(path)


def test_macos_core_ml_agrees_with_the_runtime(packages):
    """On macOS, Core ML's own predict and the fp16 runtime agree on the same packages."""
    import sys

    if sys.platform != "darwin":
        pytest.skip("MLModel.predict needs macOS")
    import coremltools as ct

    for case, (_model, batch, path) in packages.items():
        mlmodel = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.CPU_ONLY)
        x = batch[:1].numpy()
        (expected,) = mlmodel.predict({"x": x}).values()
        (ours,) = load_runtime(path, precision="fp16")({"x": batch[:1]}).values()
        np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-2, atol=1e-2 * float(np.abs(expected).max()))


def test_fp16_input_port_rounds_the_input_as_core_ml_does(example_mlpackage):
    """`coreml-opt convert` packages take FLOAT16 input: even in fp32 mode the input is rounded to fp16 first."""
    runtime = load_runtime(example_mlpackage)
    assert runtime.graph.inputs[0].dtype == "FLOAT16"
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) + 1e-3
    (a,) = runtime({"x": x}).values()
    (b,) = runtime({"x": x.half().float()}).values()
    assert torch.equal(a, b)


def test_multifunction_package_runs_its_default_function(packages, tmp_path):
    """A save_multifunction package (no 'main', default 'second'): the default function runs; an empty
    protobuf map entry is never taken for a function."""
    from coremltools.models.utils import MultiFunctionDescriptor, save_multifunction

    model, batch, path = packages[("lenet5", False)]
    desc = MultiFunctionDescriptor()
    desc.add_function(str(path), "main", "first")
    desc.add_function(str(path), "main", "second")
    desc.default_function_name = "second"
    save_multifunction(desc, str(tmp_path / "two.mlpackage"))
    (out,) = load_runtime(tmp_path / "two.mlpackage")({"x": batch[:2]}).values()
    ref = _reference(model, batch[:2])
    assert float((out - ref).abs().max() / ref.abs().max()) < FP32_BOUND
