"""The compiled optimal 1-D k-means equals coremltools' vendored kmeans1d bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
from coremltools._deps import _kmeans1d
from coremltools.models.neural_network.quantization_utils import _get_kmeans_lookup_table_and_weight

from coreml_opt.simulate import optimal1d
from coreml_opt.simulate.kmeans import KMEANS1D_MIN_VALUES, exact_group


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal shapes and equal bits (so -0.0 != 0.0 and NaN == NaN)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype.itemsize == b.dtype.itemsize and a.tobytes() == b.tobytes()


def _reference(values: np.ndarray, counts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    found = _kmeans1d.cluster(values, k, weights=counts)
    return np.asarray(found.clusters, dtype=np.int64), np.asarray(found.centroids, dtype=np.float64)


def _draw(rng: np.random.Generator, kind: int, n: int) -> np.ndarray:
    draws = (rng.standard_normal(n), rng.uniform(-1, 1, n), rng.standard_t(2, n) * 0.01,
             rng.integers(-5, 5, n) * 0.25, np.abs(rng.standard_normal(n)) * 1e-4)
    return draws[kind].astype(np.float16)


def test_the_extension_is_built():
    """Installs from the README build it (gcc is on every machine here); without it sweeps are slow."""
    assert optimal1d.native() is not None


@pytest.mark.parametrize("seed", range(6))
def test_random_values_match_kmeans1d(seed):
    rng = np.random.default_rng(seed)
    for case in range(60):
        v = _draw(rng, case % 5, int(rng.integers(1, 2500)))
        values, counts = np.unique(v, return_counts=True)
        k = int(rng.choice([1, 2, 3, 4, 7, 8, 16, 64, 256]))
        ours = optimal1d.cluster(values, counts, k)
        ref = _reference(values, counts, min(k, len(values)))
        assert _same(ours[0], ref[0]) and _same(ours[1], ref[1]), (seed, case, len(values), k)


def test_real_weights_match_kmeans1d(digits_model):
    from coreml_opt.model.convert import fold_batchnorm

    folded = fold_batchnorm(digits_model)
    for name in ("features.3.weight", "classifier.0.weight"):
        v = folded.get_parameter(name).detach().numpy().astype(np.float16).reshape(-1)
        values, counts = np.unique(v, return_counts=True)
        for k in (2, 4, 16):
            ours, ref = optimal1d.cluster(values, counts, k), _reference(values, counts, k)
            assert _same(ours[0], ref[0]) and _same(ours[1], ref[1]), (name, k)


@pytest.mark.parametrize("nbits", [1, 2, 3, 4])
def test_exact_group_equals_coremltools_on_large_groups(nbits):
    """The whole group path: unique, cluster, palette and indices as coremltools builds them."""
    rng = np.random.default_rng(nbits)
    values = (rng.standard_normal((40, 260)) * 0.03).astype(np.float16)
    assert values.size >= KMEANS1D_MIN_VALUES
    lut, indices = exact_group(values, nbits, 1)
    ref_lut, ref_indices = _get_kmeans_lookup_table_and_weight(nbits, values, force_kmeans1d=False, cluster_dim=1,
                                                               vector_axis=0)
    assert _same(lut, ref_lut.astype(np.float16))
    assert np.array_equal(indices, np.asarray(ref_indices).reshape(-1))


def test_fewer_distinct_values_than_clusters():
    values = np.array([-0.5, 0.0, 0.25], dtype=np.float16)
    counts = np.array([4000, 3000, 5000])
    clusters, centroids = optimal1d.cluster(values, counts, 16)
    ref = _reference(values, counts, 3)
    assert _same(clusters, ref[0]) and _same(centroids, ref[1]) and len(centroids) == 3


def test_without_the_extension_the_vendored_routine_runs(monkeypatch):
    rng = np.random.default_rng(9)
    values, counts = np.unique(_draw(rng, 0, 3000), return_counts=True)
    built = optimal1d.cluster(values, counts, 8)
    monkeypatch.setattr(optimal1d, "native", lambda: None)
    fallback = optimal1d.cluster(values, counts, 8)
    assert _same(built[0], fallback[0]) and _same(built[1], fallback[1])


@pytest.mark.parametrize("zeros", ["none", "positive", "negative", "both"])
def test_fp16_unique_equals_numpy(zeros):
    rng = np.random.default_rng(len(zeros))
    v = (rng.standard_t(3, 20_000) * 0.02).astype(np.float16)
    v[::97] = rng.choice([-1e-7, 6e-8, 65504.0, -65504.0, 1.0], size=len(v[::97])).astype(np.float16)
    if zeros in ("positive", "both"):
        v[::13] = np.float16(0.0)
    if zeros in ("negative", "both"):
        v[5::17] = np.float16(-0.0)
    ours = optimal1d.fp16_unique(v.reshape(40, 500))
    ref = np.unique(v.reshape(40, 500), return_inverse=True, return_counts=True)
    assert _same(ours[0], ref[0])
    assert np.array_equal(ours[1], ref[1].reshape(-1)) and np.array_equal(ours[2], ref[2])


def test_tables_are_reused_and_extended_without_changing_results(monkeypatch):
    """pal6 then pal4 reuses the table; pal2 then pal6 extends it: each equals a fresh run."""
    monkeypatch.setattr(optimal1d, "_tables", type(optimal1d._tables)())
    rng = np.random.default_rng(11)
    values, counts = np.unique(_draw(rng, 2, 5000), return_counts=True)
    for k in (64, 16, 4, 2, 128, 256, 3):
        ours, ref = optimal1d.cluster(values, counts, k), _reference(values, counts, k)
        assert _same(ours[0], ref[0]) and _same(ours[1], ref[1]), k
    (table,) = optimal1d._tables.values()
    assert table.levels == 256


def _coremltools_group(values: np.ndarray, nbits: int):
    from coreml_opt.determinism import single_threaded

    with single_threaded():
        lut, indices = _get_kmeans_lookup_table_and_weight(nbits, values, force_kmeans1d=False, cluster_dim=1,
                                                           vector_axis=0)
    return lut.astype(np.float16), np.asarray(indices).reshape(-1)


@pytest.mark.parametrize("case", ["no extension", "infinite value"])
def test_large_groups_keep_coremltools_dispatch(monkeypatch, case):
    """Without the extension, or with a value it does not take, a large group still gets kmeans1d's
    palette (coremltools' own call), never scikit-learn's."""
    values = (np.random.default_rng(3).standard_normal((100, 120)) * 0.05).astype(np.float16)
    if case == "no extension":
        monkeypatch.setattr(optimal1d, "native", lambda: None)
    else:
        values[7, 9] = np.inf
    lut, indices = exact_group(values, 3, 1)
    ref_lut, ref_indices = _coremltools_group(values, 3)
    assert _same(lut.reshape(-1), ref_lut.reshape(-1)) and np.array_equal(indices, ref_indices)
