"""The scikit-learn k-means replica (coremltools' palettes for groups under 10,000 values) against
the real KMeans, bit for bit: random, degenerate and real weight groups, its exact fallbacks, and
the switch back to scikit-learn where the replica is not verified."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from coreml_opt.determinism import single_threaded
from coreml_opt.simulate import sklearn_kmeans as skm

needs_replica = pytest.mark.skipif(not skm.available(),
                                   reason="the replica is not verified for this scikit-learn")


def _sklearn(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """What coremltools runs (under one BLAS thread, as compress() does)."""
    from sklearn.cluster import KMeans

    with single_threaded(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: fewer distinct points than k
        km = KMeans(k, init="k-means++", tol=1e-2, n_init=1, random_state=0)
        km.fit(np.asarray(values).reshape(-1, 1))
    return km.cluster_centers_[:, 0], km.labels_


def _assert_identical(values: np.ndarray, k: int) -> None:
    want_centers, want_labels = _sklearn(values, k)
    with single_threaded():
        centers, labels = skm.kmeans_1d_like_sklearn(values, k)
    assert centers.dtype == np.float64 and centers.shape == (k,)
    np.testing.assert_array_equal(centers.view(np.uint64), want_centers.view(np.uint64))
    assert labels.dtype == want_labels.dtype
    np.testing.assert_array_equal(labels, want_labels)


def _random_group(seed: int) -> tuple[np.ndarray, int]:
    """A float16 (n, 1) group, n log-uniform in [1, 9999], of one of several distributions."""
    rng = np.random.default_rng(seed)
    n = int(np.exp(rng.uniform(0.0, np.log(9999.0)))) if seed % 5 else int(rng.integers(1, 10_000))
    kind = seed % 7
    if kind == 0:
        w = rng.standard_normal(n) * 0.02
    elif kind == 1:
        w = rng.uniform(-1.0, 1.0, n) * 0.1 + rng.uniform(-1.0, 1.0)
    elif kind == 2:  # heavy-tailed
        w = rng.standard_t(1.5, n) * 0.01
    elif kind == 3:
        w = np.clip(rng.standard_cauchy(n), -3e4, 3e4) * 0.05
    elif kind == 4:  # two scales
        w = np.where(rng.random(n) < 0.9, 0.001, 0.5) * rng.standard_normal(n)
    elif kind == 5:  # a few levels, many repeats
        w = rng.choice(rng.standard_normal(int(rng.integers(1, 40))), n)
    else:  # coarse grid
        w = np.round(rng.standard_normal(n) * 8.0) / 256.0
    k = min(int(rng.choice([2, 4, 8, 16, 64, 64, 64])), n)
    return w.astype(np.float16).reshape(-1, 1), k


@needs_replica
@pytest.mark.parametrize("seed", range(64))
def test_random_groups_are_bit_identical(seed):
    _assert_identical(*_random_group(seed))


@needs_replica
@pytest.mark.parametrize("n", [256, 700, 3000, 9999])
def test_256_clusters(n):
    rng = np.random.default_rng(n)
    _assert_identical((rng.standard_normal(n) * 0.05).astype(np.float16), 256)


def _degenerate_cases() -> list[tuple[str, np.ndarray, int]]:
    rng = np.random.default_rng(7)
    three = rng.choice(np.array([-0.25, 0.0, 0.125]), 1000)
    repeats = rng.choice(rng.standard_normal(12), 4000)
    signed_zeros = rng.choice(np.array([-0.0, 0.0, 1.0]), 600)
    return [
        ("one value", np.array([0.5]), 1),
        ("all equal, k=4", np.full(50, -1.5), 4),
        ("all equal, k=16", np.full(5000, 0.0123), 16),
        ("all equal, k=n", np.full(64, 3.0), 64),
        ("3 distinct values, k=16", three, 16),
        ("12 distinct values, k=64", repeats, 64),
        ("signed zeros, k=8", signed_zeros, 8),
        ("k=n=2", rng.standard_normal(2), 2),
        ("k=n=16", rng.standard_normal(16), 16),
        ("k=n=64", rng.standard_normal(64), 64),
        ("k=n, 5 distinct", rng.choice(rng.standard_normal(5), 16), 16),
        ("float16 subnormals", rng.standard_normal(3000) * 1e-6, 16),
        ("float16 extremes", np.clip(rng.standard_normal(2000) * 3e4, -6.5e4, 6.5e4), 64),
        ("one outlier", np.append(rng.standard_normal(2999) * 1e-3, 40.0), 8),
    ]


@needs_replica
@pytest.mark.parametrize("name, values, k", _degenerate_cases(),
                         ids=[case[0] for case in _degenerate_cases()])
def test_degenerate_groups_are_bit_identical(name, values, k):
    _assert_identical(values.astype(np.float16).reshape(-1, 1), k)


@needs_replica
def test_float64_and_1d_input():
    rng = np.random.default_rng(11)
    values = rng.standard_normal(2000) * 0.3  # float64: sorted without the float16 keys
    _assert_identical(values, 16)
    half = values.astype(np.float16)
    with single_threaded():
        flat = skm.kmeans_1d_like_sklearn(half, 16)
        column = skm.kmeans_1d_like_sklearn(half.reshape(-1, 1), 16)
    assert np.array_equal(flat[0], column[0]) and np.array_equal(flat[1], column[1])


def _model_groups(model: torch.nn.Module) -> list[tuple[str, np.ndarray]]:
    """Every conv/linear weight as float16; one over 9,999 values as coremltools' per-channel
    groups would split it (leading and trailing output channels, under 10,000 values each)."""
    from coreml_opt.model.convert import fold_batchnorm

    folded = fold_batchnorm(model)
    groups = []
    for name, module in folded.named_modules():
        if not isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            continue
        weight = folded.get_parameter(f"{name}.weight").detach().numpy().astype(np.float16)
        rows = weight.reshape(weight.shape[0], -1)
        per_group = max(1, 9999 // rows.shape[1])
        if per_group >= rows.shape[0]:
            groups.append((name, rows.reshape(-1)))
        else:
            groups.append((f"{name}[:{per_group}]", rows[:per_group].reshape(-1)))
            groups.append((f"{name}[-{per_group}:]", rows[-per_group:].reshape(-1)))
    return groups


@needs_replica
def test_example_model_weights_are_bit_identical(digits_model):
    groups = _model_groups(digits_model)
    assert len(groups) >= 7
    for _name, values in groups:
        for k in (4, 16, 64) if values.size > 1000 else (4, 16, 64, 256):
            _assert_identical(values, min(k, values.size))


@needs_replica
def test_matches_coremltools_own_palettization(digits_model):
    """The palette and indices coremltools itself produces for a group are the replica's."""
    from coremltools.models.neural_network.quantization_utils import (
        _get_kmeans_lookup_table_and_weight,
    )

    for _name, values in _model_groups(digits_model)[:3]:
        for nbits in (2, 6):
            with single_threaded(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lut, indices = _get_kmeans_lookup_table_and_weight(nbits, values)
                centers, labels = skm.kmeans_1d_like_sklearn(values.reshape(-1, 1), 2 ** nbits)
            np.testing.assert_array_equal(lut[:, 0].view(np.uint64), centers.view(np.uint64))
            np.testing.assert_array_equal(np.asarray(indices), labels)


@needs_replica
@pytest.mark.parametrize("slack", ["_ROUNDING_SLACK", "_POT_SLACK"])
def test_exact_fallbacks_give_the_same_bits(monkeypatch, slack):
    """Wide rounding bounds send every step through the exact fallbacks (the BLAS potentials
    of several candidates, of the last winner; every point near a midpoint): same bits."""
    monkeypatch.setattr(skm, slack, 1e12 if slack == "_ROUNDING_SLACK" else 1e9)
    for seed in (0, 5, 10, 12, 19, 26, 41):
        _assert_identical(*_random_group(seed))
    _assert_identical(np.random.default_rng(1).choice([-1.0, 0.5, 2.0], 500).astype(np.float16), 16)


def test_available_only_for_verified_scikit_learn(monkeypatch):
    for version, verified in (("1.8.2", False), ("1.10.0", False), ("2.0.0", False),
                              ("dev", False), ("1.9.0", True), ("1.9.3.post1", True)):
        monkeypatch.setattr(skm, "_sklearn_version", lambda v=version: skm._version_tuple(v))
        assert skm.available() is (verified and skm._gemm_rounds_product_first())


def test_exact_group_uses_the_replica_only_when_available(monkeypatch):
    """exact_group runs coremltools' own scikit-learn path when the replica is not verified."""
    from coreml_opt.simulate.kmeans import exact_group

    values = (np.random.default_rng(2).standard_normal((12, 25)) * 0.1).astype(np.float16)
    replica = exact_group(values, 3, 1)
    monkeypatch.setattr(skm, "available", lambda: False)
    monkeypatch.setattr(skm, "kmeans_1d_like_sklearn", None)  # would fail if called
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = exact_group(values, 3, 1)
    assert np.array_equal(replica[0].view(np.int16), reference[0].view(np.int16))
    assert np.array_equal(replica[1], reference[1])
