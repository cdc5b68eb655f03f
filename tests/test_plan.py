"""Plans: overrides by op type and by name (Core ML and PyTorch), YAML round trips, refusal of bad plans."""
from __future__ import annotations

import coremltools.optimize.coreml as cto
import pytest

from coreml_opt.compress import compress
from coreml_opt.errors import PlanError
from coreml_opt.model.package import load_package
from coreml_opt.plan import Plan
from coreml_opt.spec import parse_spec


@pytest.fixture(scope="module")
def inventory(example_mlpackage):
    return load_package(example_mlpackage).inventory


def test_overrides_compress_exactly_the_named_weights(example_mlpackage, tmp_path):
    plan = Plan.from_dict({
        "target": "iOS18",
        "global": "pal4",
        "op_types": {"linear": "int8"},
        "layers": {"features.7": "pal2/g16",  # torch module path
                   "classifier_2_weight_to_fp16": "int4/block32",  # Core ML const name
                   "features.10.weight": "prune50"},  # torch parameter path
        "skip": ["classifier.0"],
    })
    report = compress(example_mlpackage, plan, tmp_path / "o.mlpackage")
    got = {w.torch_name: w.compression for w in load_package(report.output).inventory.weights}
    assert got == {
        "features.0.weight": "fp16",  # below the weight threshold
        "features.3.weight": "palettized 4-bit",  # global
        "features.7.weight": "palettized 2-bit (6 LUTs)",  # per layer, torch module name
        "features.10.weight": "sparse 50%",  # per layer, torch parameter name
        "classifier.0.weight": "fp16",  # explicit skip beats the op-type override
        "classifier.2.weight": "quantized int4",  # per layer, Core ML name beats op type
        "classifier.4.weight": "fp16",  # below threshold: op types obey it like coremltools
    }


def test_layer_override_compresses_weights_below_threshold(example_mlpackage, tmp_path):
    plan = Plan.from_dict({"layers": {"classifier.4": "int8", "features.0": "pal2"}})
    report = compress(example_mlpackage, plan, tmp_path / "o.mlpackage")
    got = {w.torch_name: w.compression for w in report.weights}
    assert got["classifier.4.weight"] == "quantized int8"
    assert got["features.0.weight"] == "palettized 2-bit"
    assert got["features.3.weight"] == "fp16"  # no global: untouched


def test_none_global_with_op_type_none_leaves_fp16(example_mlpackage, tmp_path):
    plan = Plan.from_dict({"global": "int8", "op_types": {"conv": "none"}})
    report = compress(example_mlpackage, plan, tmp_path / "o.mlpackage")
    for w in report.weights:
        if w.torch_name.startswith("features"):
            assert w.compression == "fp16" and w.bytes_after == w.bytes_before


def test_plan_yaml_round_trip(tmp_path):
    plan = Plan.from_dict({"target": "iOS18", "weight_threshold": 1000, "kmeans": "fast", "global": "int4/block32",
                           "op_types": {"conv": "pal3/g16"}, "layers": {"fc": "prune2:4+pal4", "x": "pal4+lut8"},
                           "skip": ["head"]})
    path = plan.save(tmp_path / "plan.yaml")
    again = Plan.load(path)
    assert again == plan
    assert again.to_yaml() == plan.to_yaml()
    assert again.layers["head"] == parse_spec("none")


def test_single_technique_plan_exports_yaml_that_coremltools_loads(inventory, tmp_path):
    plan = Plan.from_dict({"global": "pal4", "op_types": {"linear": "pal6/uniform"},
                           "layers": {"features.7": "pal2/g16"}, "skip": ["features.3"]})
    text = plan.coreml_yaml(inventory)
    (tmp_path / "config.yaml").write_text(text)
    config = cto.OptimizationConfig.from_yaml(str(tmp_path / "config.yaml"))
    assert config.global_config == cto.OpPalettizerConfig(nbits=4)
    assert config.op_type_configs["linear"] == cto.OpPalettizerConfig(nbits=6, mode="uniform")
    assert config.op_name_configs["features_7_weight_to_fp16"] == cto.OpPalettizerConfig(
        nbits=2, granularity="per_grouped_channel", group_size=16, weight_threshold=0)
    assert config.op_name_configs["features_3_weight_to_fp16"] is None
    assert [p.function for p in plan.to_coreml(inventory)] == ["palettize_weights"]


def test_mixed_plan_is_a_sequence_of_passes(inventory):
    plan = Plan.from_dict({"global": "int8", "layers": {"features.7": "prune50+pal4+lut8"}})
    passes = plan.to_coreml(inventory)
    assert [p.function for p in passes] == ["prune_weights", "palettize_weights", "linear_quantize_weights"]
    assert [p.joint_compression for p in passes] == [False, True, True]
    with pytest.raises(PlanError):
        plan.coreml_yaml(inventory)


@pytest.mark.parametrize("plan_dict, fragments", [
    ({"layers": {"features.8": "int8"}}, ["layer 'features.8'", "matches no weight", "features.7"]),
    ({"target": "iOS16", "global": "int4"}, ["int4 needs iOS18", "iOS16", "target: iOS18"]),
    ({"layers": {"features.3": "int4/block48"}}, ["block size 48 does not divide", "features_3_weight_to_fp16"]),
    ({"global": "pal4/g40"}, ["group size 40 does not divide"]),  # fits no weight at all
    ({"layers": {"classifier.4": "pal4/vec3"}}, ["cluster_dim 3"]),
    ({"target": "iOS99"}, ["iOS99"]),
])
def test_invalid_plans_are_refused_before_any_work(inventory, plan_dict, fragments):
    with pytest.raises(Exception) as excinfo:
        Plan.from_dict(plan_dict).resolve(inventory)
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_ios18_spec_on_ios16_model_names_reconversion(example_iOS16_mlpackage):
    inv = load_package(example_iOS16_mlpackage).inventory
    with pytest.raises(PlanError, match="converted for iOS16.*--target iOS18"):
        Plan.from_dict({"target": "iOS18", "global": "pal4/g16"}).resolve(inv)


def test_plan_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("global: [int8\n")
    with pytest.raises(PlanError, match="bad.yaml: is not valid YAML at line"):
        Plan.load(bad)
    bad.write_text("global: int3\n")
    with pytest.raises(PlanError, match="bad.yaml: global"):
        Plan.load(bad)
    bad.write_text("globl: int8\n")
    with pytest.raises(PlanError, match="unknown field"):
        Plan.load(bad)
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "missing.yaml")


def test_magnitude_pruning_of_weights_over_65520_values_is_refused():
    from coreml_opt.model.inventory import Inventory, WeightInfo

    big = WeightInfo("fc_weight_to_fp16", "fc_weight_to_fp16", "linear", "linear_0", (300, 512), 307264, "fp16",
                     consumers=[("linear", "linear_0")])
    inv = Inventory([big], deployment_target=18)
    with pytest.raises(PlanError, match="magnitude-prunes nothing in a weight of 153600 values"):
        Plan.from_spec("prune50").resolve(inv)
    with pytest.raises(PlanError, match="magnitude-prunes nothing"):
        Plan.from_spec("prune50+pal4").resolve(inv)
    assert str(Plan.from_spec("prune2:4").resolve(inv)["fc_weight_to_fp16"]) == "prune2:4"


def test_per_layer_threshold_pruning_short_of_its_minimum_is_refused_before_compressing(example_mlpackage, tmp_path):
    """Named under `layers:` it is refused; a global one leaves such layers fp16 (test_shared_and_skipped_weights)."""
    out = tmp_path / "o.mlpackage"
    with pytest.raises(PlanError, match="coremltools would skip it"):
        compress(example_mlpackage, Plan.from_dict({"layers": {"features.3": "thresh0.0001/min50"}}), out)
    assert not out.exists()


def test_biases_and_small_consts_are_never_compressed(example_mlpackage, tmp_path):
    plan = Plan.from_dict({"global": "int8", "layers": {"features.10": "prune50+pal4+lut8", "features.0": "pal2"}})
    report = compress(example_mlpackage, plan, tmp_path / "o.mlpackage")
    program = load_package(report.output).program
    compressed_vars = [op.output for op in program.ops if op.type.startswith("constexpr_")]
    assert compressed_vars and all("_weight_" in var for var in compressed_vars)
    assert report.inventory_after.other_bytes == load_package(example_mlpackage).inventory.other_bytes
