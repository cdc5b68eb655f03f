"""End-to-end fidelity: the runtime's output on a compressed package equals the torch model with the
product's simulated weights, for every spec kind in the README's spec table (iOS18 op set) and for the
iOS16 constexpr formats (constexpr_affine_dequantize, iOS16 lut_to_dense / sparse_to_dense).

Each case compresses a tiny Conv2d / Linear with coremltools' own passes; the runtime's decompressed weight
must equal ``decompress_weights`` bit for bit (the oracle), and its fp32 output equals conv2d/linear with the
simulated weight to 1e-5 relative (measured: 0, the same weight and the same op).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from coreml_opt.runtime import load_runtime
from coreml_opt.simulate import simulate
from coreml_opt.spec import parse_spec

from test_simulate_helpers import compress, converted, emitted_weight, make_module

README_SPECS = ["none", "int8", "uint8", "int8/tensor", "int8/asym", "int4", "uint4", "int8/block32", "pal1", "pal2",
                "pal4", "pal6", "pal8", "pal4/uniform", "pal3", "pal4/g16", "pal4/pcs", "pal2/vec2", "unique",
                "prune50", "prune75/block4", "prune2:4", "thresh0.001/min30", "prune50+pal4", "prune2:4+int8",
                "pal4+lut8", "prune50+pal4+lut8"]
IOS16_SPECS = ["int8", "uint8/asym", "int8/tensor", "pal2", "pal4", "pal4/uniform", "prune50", "prune2:4"]
CONV, LINEAR = (48, 32, 3, 3), (48, 64)


def _run(tmp_path, shape, spec_text, target):
    mlmodel, weight, op_type = converted(shape, target)
    spec = parse_spec(spec_text)
    package = compress(mlmodel, spec) if spec_text != "none" else mlmodel
    path = tmp_path / "m.mlpackage"
    package.save(str(path))
    runtime = load_runtime(path)
    (node,) = [n for n in runtime.graph.nodes if n.type in ("conv", "linear")]
    ours = runtime.consts[node.inputs["weight"][0].var]
    expected = emitted_weight(package) if spec_text != "none" else weight.half().numpy()
    assert np.array_equal(ours.cpu().numpy().astype(np.float32), expected.astype(np.float32)), spec_text
    simulated = simulate(spec, weight, op_type).weight.float() if spec_text != "none" else weight.half().float()
    _module, example, _ = make_module(shape)
    # fp16-representable inputs: these packages take FLOAT16 input, which the runtime rounds as Core ML does
    x = torch.rand((3, *example[1:]), generator=torch.Generator().manual_seed(3)).half().float()
    (out,) = runtime({runtime.graph.inputs[0].name: x}).values()
    ref = F.conv2d(x, simulated) if op_type == "conv" else F.linear(x, simulated)
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), spec_text


@pytest.mark.parametrize("spec_text", README_SPECS)
def test_runtime_on_compressed_conv_equals_simulated_weights(tmp_path, spec_text):
    _run(tmp_path, CONV, spec_text, 18)


@pytest.mark.parametrize("spec_text", ["int8", "int4/block32", "pal4/g16", "pal2/vec2", "prune50+pal4",
                                       "prune2:4+int8", "pal4+lut8"])
def test_runtime_on_compressed_linear_equals_simulated_weights(tmp_path, spec_text):
    _run(tmp_path, LINEAR, spec_text, 18)


@pytest.mark.parametrize("spec_text", IOS16_SPECS)
def test_ios16_constexpr_formats(tmp_path, spec_text):
    _run(tmp_path, CONV, spec_text, 16)


@pytest.mark.parametrize("spec_text", ["int4/block32", "pal4/g16", "prune50+pal4"])
def test_overriding_a_weight_with_its_simulation_equals_the_compressed_package(tmp_path, spec_text):
    """A trial on a package: the fp16 package with one weight replaced by its simulated compressed value
    gives exactly the output of the package coremltools compressed."""
    mlmodel, weight, op_type = converted(CONV, 18)
    plain, compressed = tmp_path / "plain.mlpackage", tmp_path / "c.mlpackage"
    mlmodel.save(str(plain))
    compress(mlmodel, spec_text).save(str(compressed))
    runtime = load_runtime(plain)
    (node,) = [n for n in runtime.graph.nodes if n.type == "conv"]
    var = node.inputs["weight"][0].var
    simulated = simulate(parse_spec(spec_text), weight, op_type).weight.half()
    trial = load_runtime(plain, overrides={var: simulated})
    x = torch.rand(2, 32, 5, 5, generator=torch.Generator().manual_seed(4))
    name = runtime.graph.inputs[0].name
    (ours,) = trial({name: x}).values()
    (theirs,) = load_runtime(compressed)({name: x}).values()
    (before,) = runtime({name: x}).values()
    assert torch.equal(ours, theirs) and not torch.equal(ours, before)
