"""Every spec kind compresses the example model; saved bytes match the byte model within 1 %."""
from __future__ import annotations

import pytest

from coreml_opt.compress import compress
from coreml_opt.model.package import load_package
from coreml_opt.plan import Plan
from coreml_opt.spec import parse_spec

# spec -> constexpr op types the package must contain for every compressed weight
IOS18_SPECS = {
    "int8": {"constexpr_blockwise_shift_scale"},
    "uint8/asym": {"constexpr_blockwise_shift_scale"},
    "int8/tensor": {"constexpr_blockwise_shift_scale"},
    "int4": {"constexpr_blockwise_shift_scale"},
    "uint4/block32": {"constexpr_blockwise_shift_scale"},
    "int4/block16/asym": {"constexpr_blockwise_shift_scale"},
    "pal1": {"constexpr_lut_to_dense"},
    "pal2": {"constexpr_lut_to_dense"},
    "pal3": {"constexpr_lut_to_dense"},
    "pal4": {"constexpr_lut_to_dense"},
    "pal6/uniform": {"constexpr_lut_to_dense"},
    "pal8": {"constexpr_lut_to_dense"},
    "pal4/g16": {"constexpr_lut_to_dense"},
    "pal3/g32/uniform": {"constexpr_lut_to_dense"},
    "pal4/pcs": {"constexpr_lut_to_dense", "constexpr_blockwise_shift_scale"},
    "pal2/vec2": {"constexpr_lut_to_dense"},
    "prune50": {"constexpr_sparse_to_dense"},
    "prune75/block2": {"constexpr_sparse_to_dense"},
    "prune2:4": {"constexpr_sparse_to_dense"},
    "thresh0.05/min10": {"constexpr_sparse_to_dense"},
    "prune50+pal4": {"constexpr_lut_to_sparse", "constexpr_sparse_to_dense"},
    "prune2:4+pal2/g16": {"constexpr_lut_to_sparse", "constexpr_sparse_to_dense"},
    "prune50+int8": {"constexpr_sparse_blockwise_shift_scale", "constexpr_sparse_to_dense"},
    "prune75+int4/block32": {"constexpr_sparse_blockwise_shift_scale", "constexpr_sparse_to_dense"},
    "pal4+lut8": {"constexpr_lut_to_dense", "constexpr_blockwise_shift_scale"},
    "pal3/g16+lutu8": {"constexpr_lut_to_dense", "constexpr_blockwise_shift_scale"},
    "prune50+pal4+lut8": {"constexpr_lut_to_sparse", "constexpr_sparse_to_dense",
                          "constexpr_blockwise_shift_scale"},
}
IOS16_SPECS = {
    "int8": {"constexpr_affine_dequantize"},
    "uint8/tensor": {"constexpr_affine_dequantize"},
    "pal2": {"constexpr_lut_to_dense"},
    "pal4": {"constexpr_lut_to_dense"},
    "pal6/uniform": {"constexpr_lut_to_dense"},
    "prune50": {"constexpr_sparse_to_dense"},
}


def _check_package(report, spec_text: str, expected_ops: set[str]) -> None:
    loaded = load_package(report.output, load_weights=False)
    spec = parse_spec(spec_text)
    compressed = [w for w in report.weights if w.spec == str(spec)]
    assert compressed, "the spec compressed nothing"
    for weight in compressed:
        assert weight.compression != "fp16", weight
        assert abs(weight.bytes_after - weight.bytes_predicted) <= 0.01 * weight.bytes_after, weight
        chain_types = {op.type for op in loaded.program.chain(loaded.inventory.by_name()[weight.name].var)}
        assert expected_ops <= chain_types, (weight.name, chain_types)
    # weights at or below the threshold stay fp16
    for weight in report.weights:
        if weight.spec == "none":
            assert weight.compression == "fp16"
            assert weight.bytes_after == weight.bytes_before


@pytest.mark.parametrize("spec_text", list(IOS18_SPECS))
def test_every_spec_compresses_example_with_predicted_bytes_ios18(spec_text, example_mlpackage, tmp_path):
    report = compress(example_mlpackage, Plan.from_spec(spec_text), tmp_path / "out.mlpackage")
    _check_package(report, spec_text, IOS18_SPECS[spec_text])


@pytest.mark.parametrize("spec_text", list(IOS16_SPECS))
def test_ios16_specs_compress_with_ios16_ops_and_predicted_bytes(spec_text, example_iOS16_mlpackage, tmp_path):
    report = compress(example_iOS16_mlpackage, Plan.from_spec(spec_text, target="iOS16"), tmp_path / "o.mlpackage")
    _check_package(report, spec_text, IOS16_SPECS[spec_text])


def test_inventory_reports_each_compression_kind(example_mlpackage, tmp_path):
    plan = Plan.from_dict({"global": "pal4/g16", "layers": {
        "features.7": "int4/block32", "classifier.0": "prune50+pal4+lut8", "features.10": "int8",
        "classifier_2_weight_to_fp16": "prune2:4"}, "skip": ["features.3"]})
    report = compress(example_mlpackage, plan, tmp_path / "mixed.mlpackage")
    got = {w.torch_name: w.compression for w in load_package(report.output).inventory.weights}
    assert got["features.3.weight"] == "fp16"
    assert got["features.7.weight"] == "quantized int4"
    assert got["features.10.weight"] == "quantized int8"
    assert got["classifier.0.weight"] == "sparse 50% + palettized 4-bit + lut quantized int8"
    assert got["classifier.2.weight"] == "sparse 50%"
    assert got["classifier.4.weight"] == "fp16"  # below the weight threshold
    assert got["features.0.weight"] == "fp16"
    assert all(abs(w.bytes_after - w.bytes_predicted) <= 0.01 * w.bytes_after for w in report.weights)
