"""The example digits model: accurate, compressible-sized, deterministic and cached."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from coreml_opt import zoo
from coreml_opt.model.convert import load_factory


def test_digits_split_is_fixed_scaled_and_stratified(digits_data):
    x_tr, y_tr, x_te, y_te = digits_data
    assert x_tr.shape == (1437, 1, 8, 8) and x_te.shape == (360, 1, 8, 8)
    assert x_tr.dtype == np.float32 and y_tr.dtype == np.int64
    assert x_tr.min() == 0.0 and x_tr.max() == 1.0
    assert np.array_equal(np.unique(x_tr * 16), np.arange(17))  # integer pixels 0..16
    assert np.bincount(y_te).min() >= 35  # every class held out
    again = zoo.digits_split()
    assert all(np.array_equal(a, b) for a, b in zip(digits_data, again))


def test_example_model_accuracy_on_held_out_split(digits_model, digits_data):
    _, _, x_te, y_te = digits_data
    assert not digits_model.training
    assert zoo.evaluate_accuracy(digits_model, x_te, y_te) >= 0.95


def test_example_model_has_compressible_conv_and_linear_weights(digits_model):
    big = {name: p.numel() for name, p in digits_model.named_parameters()
           if p.ndim >= 2 and p.numel() > 2048}
    assert len(big) >= 5
    kinds = {type(digits_model.get_submodule(n.rsplit(".", 1)[0])) for n in big}
    assert {torch.nn.Conv2d, torch.nn.Linear} <= kinds
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in digits_model.modules())


def test_factory_string_builds_the_example_model(digits_model):
    model = load_factory("coreml_opt.zoo:digits_cnn")
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), digits_model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


@pytest.mark.slow  # trains the example CNN twice
def test_training_is_deterministic_and_cached(tmp_path, monkeypatch, digits_model):
    monkeypatch.setenv("COREML_OPT_CACHE", str(tmp_path))
    first = zoo.digits_cnn()  # trains into the empty cache
    cached = list(tmp_path.iterdir())
    assert [p.name for p in cached] == [f"{zoo.DIGITS_CNN_VERSION}.pt"]

    def no_training():
        raise AssertionError("second call retrained instead of loading the cache")

    monkeypatch.setattr(zoo, "_train_digits_cnn", no_training)
    second = zoo.digits_cnn()
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key])
        # same recipe, same weights as the session model from the user cache
        assert torch.equal(value, digits_model.state_dict()[key])


def test_corrupt_cache_file_is_rebuilt(tmp_path, monkeypatch):
    (tmp_path / f"{zoo.DIGITS_CNN_VERSION}.pt").write_bytes(b"not a checkpoint")
    sentinel = zoo.DigitsCNN().eval()
    monkeypatch.setattr(zoo, "_train_digits_cnn", lambda: sentinel)
    assert zoo.digits_cnn(cache=tmp_path) is sentinel
    reloaded = zoo.digits_cnn(cache=tmp_path)  # the rebuilt file now loads
    assert torch.equal(reloaded.features[0].weight, sentinel.features[0].weight)


def test_untrained_model_skips_cache(tmp_path):
    model = zoo.digits_cnn(pretrained=False, cache=tmp_path)
    assert not model.training and list(tmp_path.iterdir()) == []
    assert model(torch.zeros(zoo.EXAMPLE_INPUT_SHAPE)).shape == (1, 10)


def test_evaluate_accuracy_counts_argmax_hits():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(x.flatten(1)[:, 0].long(), 3).float()

    x = torch.tensor([0.0, 1.0, 2.0, 2.0]).reshape(4, 1)
    y = np.array([0, 1, 2, 0])
    assert zoo.evaluate_accuracy(Fixed(), x, y, batch_size=3) == pytest.approx(0.75)
