"""Conversion keeps torch names: BN folding, the const-name mapping, targets, factories."""
from __future__ import annotations

import json

import coremltools as ct
import numpy as np
import pytest
import torch
from torch import nn

from coreml_opt import zoo
from coreml_opt.errors import ModelError, SpecError
from coreml_opt.model import convert as cv
from coreml_opt.targets import VALID_TARGETS, parse_target, target_name, target_rank


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Give every BN non-trivial statistics so folding is really exercised."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.randn(n, generator=g))
                m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


# ----------------------------------------------------------------------------- BN folding

def test_fold_batchnorm_is_equivalent_and_keeps_names(digits_model, digits_data):
    folded = cv.fold_batchnorm(digits_model)
    x = torch.from_numpy(digits_data[2])
    with torch.no_grad():
        ref, out = digits_model(x), folded(x)
    assert torch.allclose(ref, out, atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in digits_model.modules())  # original intact
    weights = lambda m: {n for n, p in m.named_parameters() if p.ndim >= 2}  # noqa: E731
    assert weights(folded) == weights(digits_model)
    assert "features.3.weight" in weights(folded)
    assert digits_model.features[0].bias is None and folded.features[0].bias is not None


class _Attrs(nn.Module):
    """Non-Sequential model: folding goes through torch.fx."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, bias=False)
        self.bn = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8 * 6, 16)
        self.bn_fc = nn.BatchNorm1d(16)
        self.pre_bn = nn.BatchNorm1d(16, affine=False)  # follows bn_fc, not a conv: stays
        self.grouped = nn.Conv2d(4, 8, 1, groups=2)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        z = self.pre_bn(self.bn_fc(self.fc(y.flatten(1))))
        g = self.bn2(self.grouped(x[:, :, :6].reshape(-1, 4, 2, 3)))
        return z, g


def test_fold_batchnorm_outside_sequential():
    model = _randomise_bn(_Attrs())
    folded = cv.fold_batchnorm(model)
    assert isinstance(folded.bn, nn.Identity) and isinstance(folded.bn_fc, nn.Identity)
    assert isinstance(folded.bn2, nn.Identity) and isinstance(folded.pre_bn, nn.BatchNorm1d)
    x = torch.randn(5, 4, 8)
    with torch.no_grad():
        for a, b in zip(model(x), folded(x)):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_shared_batchnorm_is_not_folded():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 4, 1), nn.Conv2d(2, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.a(x)) + self.bn(self.b(x))

    model = _randomise_bn(Shared())
    folded = cv.fold_batchnorm(model)
    assert isinstance(folded.bn, nn.BatchNorm2d)
    x = torch.randn(1, 2, 3, 3)
    assert torch.allclose(model(x), folded(x))


def test_fold_falls_back_to_sequential_pairs_when_fx_fails():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: torch.fx cannot trace this
                x = -x
            return self.body(x)

    model = _randomise_bn(Dynamic())
    assert cv._pairs_fx(model) is None
    folded = cv.fold_batchnorm(model)
    assert isinstance(folded.body[1], nn.Identity)
    x = torch.randn(2, 2, 5, 5)
    assert torch.allclose(model(x), folded(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- conversion

def test_mapping_covers_every_conv_and_linear_weight(example_conversion, digits_model):
    mapping = example_conversion.mapping
    weights = {n for n, p in digits_model.named_parameters() if p.ndim >= 2}
    assert set(mapping.values()) == weights
    assert mapping["features_3_weight_to_fp16"] == "features.3.weight"
    assert mapping["classifier_0_weight_to_fp16"] == "classifier.0.weight"
    consts = cv.weight_consts(example_conversion.mlmodel)
    assert not any(name.startswith("const_") for name in consts)  # BN was folded by us
    for const, path in mapping.items():
        assert consts[const] == tuple(digits_model.get_parameter(path).shape)


def test_saved_package_round_trips_mapping_and_weights(example_conversion, digits_model):
    loaded = ct.models.MLModel(str(example_conversion.path), skip_model_load=True)
    assert cv.read_torch_names(loaded) == example_conversion.mapping
    assert json.loads(loaded.user_defined_metadata[cv.TORCH_NAMES_KEY]) == example_conversion.mapping
    assert loaded.get_spec().specificationVersion == 9  # iOS18
    meta = ct.optimize.coreml.get_weights_metadata(loaded, weight_threshold=0)
    folded = cv.fold_batchnorm(digits_model)
    for const, path in example_conversion.mapping.items():
        expected = folded.get_parameter(path).detach().numpy().astype(np.float16)
        assert np.array_equal(meta[const].val, expected), const


def test_convert_from_factory_string_and_other_target(tmp_path):
    out = tmp_path / "m.mlpackage"
    out.mkdir()  # an existing package is replaced atomically
    (out / "stale").write_text("x")
    mlmodel, mapping = cv.convert("coreml_opt.zoo:digits_cnn", zoo.EXAMPLE_INPUT_SHAPE,
                                  target="macos13", output_path=out, input_name="image")
    assert mlmodel.get_spec().specificationVersion == 7  # iOS16 == macOS13
    assert [i.name for i in mlmodel.get_spec().description.input] == ["image"]
    assert not (out / "stale").exists() and (out / "Manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mlpackage"]
    assert len(mapping) == 7


def test_interrupted_save_leaves_no_temp_files(tmp_path, example_conversion, monkeypatch):
    def interrupted(self, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(ct.models.MLModel, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cv.save_package(example_conversion.mlmodel, tmp_path / "x.mlpackage")
    assert list(tmp_path.iterdir()) == []


def test_wrong_input_shape_names_model_and_shape():
    with pytest.raises(ModelError) as exc:
        cv.convert("coreml_opt.zoo:digits_cnn", (1, 3, 8, 8))
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("coreml_opt.zoo:digits_cnn: fails on an example input of shape [1, 3, 8, 8]")


def test_unknown_target_in_convert_lists_valid_names(digits_model):
    with pytest.raises(SpecError, match="iOS16, iOS17, iOS18, macOS13, macOS14, macOS15"):
        cv.convert(digits_model, zoo.EXAMPLE_INPUT_SHAPE, target="iOS15")


# ----------------------------------------------------------------------------- factories

@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "my_factories.py").write_text(
        "import torch\n"
        "def broken():\n    raise RuntimeError('weights file missing')\n"
        "def not_a_model():\n    return 3\n"
        "def needs_args(n):\n    return torch.nn.Linear(n, n)\n"
        "class Holder:\n    @staticmethod\n    def make():\n        return torch.nn.Linear(2, 2)\n"
        "VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_factories"


def test_load_factory_supports_dotted_attributes(factories):
    assert isinstance(cv.load_factory(f"{factories}:Holder.make"), nn.Linear)


@pytest.mark.parametrize("spec, problem", [
    ("coreml_opt.zoo", "is not package.module:function or path/to/file.py:function"),
    ("no_such_pkg_xyz.models:net", "cannot import module 'no_such_pkg_xyz.models'"),
    ("coreml_opt.zoo:no_such_factory", "has no attribute 'no_such_factory'"),
    ("my_factories:VALUE", "is int, not a function or class"),
    ("my_factories:broken", "my_factories.broken() raised RuntimeError: weights file missing; fix the error in"),
    ("my_factories:needs_args", "needs arguments (missing a required argument: 'n'); give its parameters defaults"),
    ("my_factories:not_a_model", "factory returned int, not a torch.nn.Module"),
])
def test_load_factory_errors_are_one_line(factories, spec, problem):
    with pytest.raises(ModelError) as exc:
        cv.load_factory(spec)
    msg = str(exc.value)
    assert msg.startswith(f"{spec}: ") and problem in msg and "\n" not in msg


# ----------------------------------------------------------------------------- targets

def test_targets_parse_case_insensitively_and_rank():
    assert parse_target("ios18") is ct.target.iOS18
    assert parse_target(" MACOS14 ") == ct.target.iOS17
    assert parse_target(ct.target.iOS16) == ct.target.iOS16
    assert target_name("macOS15") == "iOS18" and target_name(ct.target.iOS17) == "iOS17"
    assert [target_rank(n) for n in VALID_TARGETS] == [16, 17, 18, 16, 17, 18]
    assert target_rank("macOS13") < target_rank("iOS17") <= target_rank("macos14")


@pytest.mark.parametrize("bad", ["iOS15", "ios 18", "", ct.target.iOS15])
def test_unknown_target_is_a_one_line_error(bad):
    with pytest.raises(SpecError) as exc:
        parse_target(bad)
    msg = str(exc.value)
    assert "\n" not in msg and "use one of iOS16, iOS17, iOS18, macOS13, macOS14, macOS15" in msg
