"""Simulated weights equal what coremltools 9 emits, element for element, for every spec kind.

Each case converts a tiny Linear/Conv2d holding a random weight (once per shape and target),
compresses it with coremltools' own passes (joint forms chained with joint_compression=True),
decompresses with ``decompress_weights`` and compares with ``simulate``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from coreml_opt.simulate import fast_lut_function, simulate
from coreml_opt.spec import parse_spec

from test_simulate_helpers import compress, converted, emitted_weight

# (33,17): odd, sklearn k-means; (48,32,3,3): conv, 13,824 values -> kmeans1d, fp16-rounded
# percentile index; (10,7,1,1): tiny conv; (256,512): 131,072 values -> numpy percentile NaN.
SHAPES = [(33, 17), (48, 32, 3, 3), (10, 7, 1, 1), (256, 512)]

QUANT = ["int8", "int8/tensor", "int8/asym", "uint8", "uint8/asym", "uint8/tensor/asym", "int4", "int4/asym",
         "uint4", "uint4/asym", "int4/tensor", "int4/block16", "int4/block32/asym", "uint4/block16", "int8/block16"]
PALETTE = ["pal1", "pal2", "pal3", "pal4", "pal6", "pal8", "pal4/g16", "pal2/g8", "pal4/g8", "pal4/uniform",
           "pal3/uniform/g8", "pal8/uniform", "pal1/uniform", "pal4/pcs", "pal3/g8/pcs", "pal2/vec2",
           "pal4/g16/vec2", "pal3/g8/vec4"]
PRUNE = ["prune50", "prune30", "prune75", "prune90", "prune100", "prune50/block2", "prune60/block4",
         "prune2:4", "prune1:4", "prune3:8", "thresh0.02", "thresh0.05/min30", "thresh0.0001"]
JOINT = ["prune50+pal4", "prune2:4+pal4", "prune50+pal3/g8", "prune50+int8", "prune2:4+int4/block16",
         "prune50+uint8/asym", "pal4+lut8", "pal4/g16+lut8", "pal2+lut8", "pal4+lutu8", "pal3/g8+lut8",
         "prune50+pal4+lut8", "prune2:4+pal2/g8+lut8"]
IOS16 = ["int8", "uint8/asym", "int8/tensor", "uint8/tensor", "pal1", "pal2", "pal4", "pal6", "pal8",
         "pal4/uniform", "prune50", "prune2:4", "prune50/block2", "thresh0.02"]


def _check(spec_text: str, shape: tuple[int, ...], target: int = 18, kmeans: str = "exact",
           precision: str = "fp16") -> None:
    mlmodel, weight, op_type = converted(shape, target, precision)
    spec = parse_spec(spec_text)
    lut_function = fast_lut_function(spec) if kmeans == "fast" else None
    emitted = emitted_weight(compress(mlmodel, spec, lut_function))
    assert emitted.dtype == (np.float32 if precision == "fp32" else np.float16)
    emitted = emitted.astype(np.float32)
    result = simulate(spec, weight, op_type, kmeans=kmeans, precision=precision)
    ours = result.weight.numpy()
    assert ours.shape == emitted.shape
    mismatch = np.flatnonzero(ours != emitted)
    assert mismatch.size == 0, (
        f"{spec_text} on {shape}: {mismatch.size} of {ours.size} values differ, e.g. index "
        f"{mismatch[:3]}: ours {ours.flat[mismatch[:3]]} vs coremltools {emitted.flat[mismatch[:3]]}"
        f" (skipped={result.skipped})")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("spec_text", QUANT + PRUNE)
def test_quantize_and_prune_match_coremltools(spec_text, shape):
    _check(spec_text, shape)


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("spec_text", PALETTE + JOINT)
def test_palettize_and_joint_match_coremltools(spec_text, shape):
    _check(spec_text, shape)


@pytest.mark.parametrize("spec_text", ["pal4", "pal4/g16", "pal2/uniform", "pal4/pcs", "prune50+pal4",
                                       "pal4+lut8", "prune2:4+int4/block16"])
def test_large_weight_matches_coremltools(spec_text):
    _check(spec_text, (256, 512))


@pytest.mark.parametrize("shape", [(33, 17), (48, 32, 3, 3)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("spec_text", IOS16)
def test_ios16_ops_match_coremltools(spec_text, shape):
    _check(spec_text, shape, target=16)


@pytest.mark.parametrize("spec_text", ["pal4", "pal4/g16", "pal2/g8", "pal6", "pal4/pcs", "pal2/vec2",
                                       "prune50+pal4", "pal4+lut8"])
@pytest.mark.parametrize("shape", [(33, 17), (48, 32, 3, 3)], ids=lambda s: "x".join(map(str, s)))
def test_fast_kmeans_is_what_coremltools_emits_with_its_lut_function(spec_text, shape):
    _check(spec_text, shape, kmeans="fast")


def test_unique_mode_reproduces_a_weight_with_few_values():
    import coremltools as ct

    from test_simulate_helpers import make_module

    module, example, _ = make_module((40, 24))
    levels = torch.linspace(-0.1, 0.1, 13)
    with torch.no_grad():
        module.weight.copy_(levels[torch.randint(13, (40, 24), generator=torch.Generator().manual_seed(1))])
    mlmodel = ct.convert(torch.jit.trace(module, torch.rand(example)), inputs=[ct.TensorType(shape=example)],
                         convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18)
    for text in ("unique", "unique/pcs", "unique/g8"):
        emitted = emitted_weight(compress(mlmodel, text)).astype(np.float32)
        result = simulate(text, module.weight, "linear")
        assert result.skipped is None
        assert np.array_equal(result.weight.numpy(), emitted), text
        assert result.params["lut"].shape[1] == 16  # 13 values -> 4 bits


def test_skipped_pcs_palettization_leaves_the_weight_divided_by_its_scale():
    """coremltools divides in place before it finds 16 does not divide 33 channels: the bug ships."""
    _check("pal4/g16/pcs", (33, 17))
    result = simulate("pal4/g16/pcs", converted((33, 17))[1])
    assert result.skipped and "per-channel scale" in result.skipped


# Packages converted with compute_precision=FLOAT32 hold fp32 consts: coremltools' passes then
# compute in float32 (k-means through scikit-learn whatever the size) and emit fp32 palettes/scales.
@pytest.mark.parametrize("spec_text", QUANT + PRUNE + PALETTE + JOINT)
def test_fp32_weights_match_coremltools(spec_text):
    _check(spec_text, (33, 17), precision="fp32")


@pytest.mark.parametrize("spec_text", ["int8", "int4/block16", "pal4", "pal4/g16", "pal3/g8/vec4", "prune50/block2",
                                       "prune2:4", "thresh0.02", "prune50+pal4", "pal4+lut8"])
def test_fp32_conv_weights_match_coremltools(spec_text):
    _check(spec_text, (48, 32, 3, 3), precision="fp32")


@pytest.mark.parametrize("spec_text", ["int8", "int4/block32", "prune50", "prune50/block2", "pal4/uniform"])
def test_fp32_large_weight_matches_coremltools(spec_text):
    _check(spec_text, (256, 512), precision="fp32")


@pytest.mark.parametrize("spec_text", IOS16)
def test_fp32_ios16_ops_match_coremltools(spec_text):
    _check(spec_text, (33, 17), target=16, precision="fp32")
