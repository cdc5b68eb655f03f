"""The zoo's trained transformer (a ViT on Fashion-MNIST) and the transformer path end to end:
convert, sweep its linear layers with the transformer specs, plan at 4 bits per weight, emit."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from coreml_opt import fashion_vit as vit
from coreml_opt import zoo
from coreml_opt.errors import DataError
from tests.conftest import run_cli

needs_data = pytest.mark.skipif(not vit.fashion_available(),
                                reason=f"Fashion-MNIST absent from {vit.FASHION_DIR} "
                                       "(apt-get install -y dataset-fashion-mnist)")
TRANSFORMER_SPECS = "int4/block32,int8/block32,pal4/g16,pal3/g16,pal4/g16/pcs"


@pytest.fixture(scope="module")
def vit_model() -> torch.nn.Module:
    """The trained ViT from the user cache (trains about a minute on first use)."""
    if not vit.fashion_available():
        pytest.skip("Fashion-MNIST absent (apt-get install -y dataset-fashion-mnist)")
    return zoo.fashion_vit()


@needs_data
def test_fashion_split_is_balanced_scaled_and_fixed():
    x_tr, y_tr, x_te, y_te = vit.fashion_split()
    assert x_tr.shape == (20000, 1, 28, 28) and x_te.shape == (10000, 1, 28, 28)
    assert x_tr.dtype == np.float32 and y_tr.dtype == np.int64
    assert x_tr.min() == 0.0 and x_tr.max() == 1.0
    assert np.bincount(y_tr).tolist() == [2000] * 10 and np.bincount(y_te).tolist() == [1000] * 10
    again = vit.fashion_split()
    assert np.array_equal(again[0], x_tr) and np.array_equal(again[1], y_tr)


@needs_data
def test_trained_vit_is_accurate_on_the_unseen_test_set(vit_model):
    _, _, x_te, y_te = vit.fashion_split()
    assert not vit_model.training
    assert zoo.evaluate_accuracy(vit_model, x_te, y_te) >= 0.80


def test_vit_is_small_and_its_linear_weights_take_block32_and_g16():
    model = zoo.fashion_vit(pretrained=False)
    assert 100_000 <= sum(p.numel() for p in model.parameters()) <= 500_000
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "head"}
    assert len(linears) == 24
    for name, module in linears.items():
        out_dim, in_dim = module.weight.shape
        assert in_dim % 32 == 0 and out_dim % 16 == 0 and module.weight.numel() > 2048, name
    assert any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@needs_data
def test_vit_weights_are_cached_and_loaded_without_retraining(tmp_path, monkeypatch, vit_model):
    monkeypatch.setenv("COREML_OPT_CACHE", str(tmp_path))
    monkeypatch.setattr(vit, "train_fashion_vit", lambda: vit_model)
    zoo.fashion_vit()  # "trains" (returns the session model) into the empty cache
    assert [p.name for p in tmp_path.iterdir()] == [f"{vit.FASHION_VIT_VERSION}.pt"]

    def no_training():
        raise AssertionError("second call retrained instead of loading the cache")

    monkeypatch.setattr(vit, "train_fashion_vit", no_training)
    second = zoo.fashion_vit()
    for key, value in vit_model.state_dict().items():
        assert torch.equal(value, second.state_dict()[key])


def test_missing_fashion_files_are_one_line_naming_the_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        vit.fashion_mnist("test", root=tmp_path)


@pytest.mark.parametrize("argv", [
    ("--model", "coreml_opt.zoo:fashion_vit", "--input-shape", "1,1,28,28"),
    ("--model", "coreml_opt.zoo:digits_cnn", "--input-shape", "1,1,8,8",
     "--data", "coreml_opt.sensitivity.examples:fashion_heldout"),
], ids=["model-factory", "data-factory"])
def test_a_factory_raising_a_project_error_keeps_its_input_and_fix(tmp_path, monkeypatch, argv):
    # no cached weights, no data: the factory's own one-line error, whole, after the factory's name
    monkeypatch.setattr(vit, "FASHION_DIR", tmp_path / "absent")
    monkeypatch.setenv("COREML_OPT_CACHE", str(tmp_path / "cache"))
    code, out, err = run_cli("sensitivity", *argv, "--out", str(tmp_path / "sens"), "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert argv[argv.index("--data") + 1 if "--data" in argv else 1] in err
    assert str(tmp_path / "absent") in err and err.rstrip().endswith("apt-get install -y dataset-fashion-mnist")
    assert "Traceback" not in err and "call it in Python" not in err
    assert not (tmp_path / "sens").exists() and not (tmp_path / "cache" / f"{vit.FASHION_VIT_VERSION}.pt").exists()


def fashion_test_300():
    """Data factory for the end-to-end test: the first 300 Fashion-MNIST test images (the sweep re-reads it)."""
    from coreml_opt.data import Dataset

    x, y = vit.fashion_mnist("test")
    return Dataset(x[:300], y[:300], source="Fashion-MNIST test[:300]")


@pytest.mark.slow
@needs_data
def test_transformer_path_converts_sweeps_plans_at_4_bpw_and_emits_the_predicted_bytes(tmp_path, vit_model):
    from coreml_opt.model.convert import convert
    from coreml_opt.model.package import load_package
    from coreml_opt.sensitivity import analyse
    from coreml_opt.sensitivity.sweep import DEFAULT_LADDER

    package = tmp_path / "vit.mlpackage"
    convert(vit_model, vit.FASHION_INPUT_SHAPE, target="iOS18", output_path=package)
    candidates = [*DEFAULT_LADDER, *TRANSFORMER_SPECS.split(",")]
    sweep = analyse("coreml_opt.zoo:fashion_vit", vit.FASHION_INPUT_SHAPE, f"{__file__}:fashion_test_300",
                    metric="accuracy", candidates=candidates, out_dir=tmp_path / "sens", progress=False)
    assert sweep.baseline >= 0.80
    ran = {(t.layer, t.spec) for t in sweep.trials}
    linears = [layer.layer for layer in sweep.layers if layer.op_type == "linear"]
    assert len(linears) == 24  # q/k/v/proj/fc1/fc2 of 4 blocks (the 10x64 head is under the threshold)
    assert all((name, spec) in ran for name in linears for spec in candidates)
    assert {s["layer"] for s in sweep.skipped_trials} == {"patch.weight"}  # (64,1,7,7): input dim 1, no block32

    emitted = tmp_path / "vit-4bpw.mlpackage"
    code, out, err = run_cli("plan", str(tmp_path / "sens"), "--bpw", "4", "--json", "--emit", str(emitted),
                             "--model-package", str(package))
    assert code == 0, err
    result = json.loads(out)
    assert result["bits_per_weight"] <= 4.0
    stored = load_package(emitted).inventory.total_bytes  # measured from the saved package
    assert result["emitted_bytes"] == result["bytes"] == stored
    assert result["measured_metric"] is not None and 0.0 < result["measured_metric"] <= 1.0
    assert result["measured_drop"] == pytest.approx(result["baseline"] - result["measured_metric"])


@pytest.mark.slow
@needs_data
def test_vit_training_is_seeded_same_weights_as_the_cache(tmp_path, vit_model):
    retrained = zoo.fashion_vit(cache=tmp_path)  # trains (about a minute) into an empty cache
    for key, value in vit_model.state_dict().items():
        assert torch.equal(value, retrained.state_dict()[key]), key
