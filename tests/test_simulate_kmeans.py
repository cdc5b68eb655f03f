"""The fast batched k-means: its quality against coremltools' k-means is measured, not assumed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from coreml_opt.simulate import fast_lut_function, simulate
from coreml_opt.simulate.kmeans import kmeans_scalar_fast
from coreml_opt.errors import SpecError


def _mse(spec: str, weight: torch.Tensor, kmeans: str) -> float:
    out = simulate(spec, weight, "linear", kmeans=kmeans).weight
    return float(torch.mean((out.double() - weight.half().double()) ** 2))


@pytest.mark.parametrize("spec", ["pal2", "pal4", "pal4/g16", "pal3/g16"])
def test_fast_kmeans_is_within_one_percent_of_optimal_kmeans1d(spec):
    """Groups of >= 10,000 values: coremltools' kmeans1d is optimal, so this is the true gap."""
    weight = torch.randn(256, 640, generator=torch.Generator().manual_seed(3)) * 0.02
    assert _mse(spec, weight, "fast") <= 1.01 * _mse(spec, weight, "exact")


@pytest.mark.parametrize("spec", ["pal1", "pal2", "pal4", "pal4/g8", "pal3/g4", "pal6"])
def test_fast_kmeans_is_at_least_as_good_as_scikit_learn_on_small_groups(spec):
    """Groups of < 10,000 values: coremltools runs one k-means++ (n_init=1); several seeds do better."""
    weight = torch.randn(64, 48, generator=torch.Generator().manual_seed(4)) * 0.05
    assert _mse(spec, weight, "fast") <= _mse(spec, weight, "exact") * 1.0001


def test_fast_kmeans_of_a_group_does_not_depend_on_the_batch():
    """Required for fast_lut_function: coremltools calls it one group at a time."""
    x = (torch.randn(8, 3000, generator=torch.Generator().manual_seed(5)) * 0.05).half().float()
    lut, idx = kmeans_scalar_fast(x, 16)
    for g in (0, 5):
        lut_g, idx_g = kmeans_scalar_fast(x[g:g + 1], 16)
        assert torch.equal(lut_g[0], lut[g]) and torch.equal(idx_g[0], idx[g])


def test_few_distinct_values_are_reproduced_exactly():
    x = torch.tensor([[0.5, -0.25, 0.5, 0.125, -0.25, 0.0] * 5]).float()
    lut, idx = kmeans_scalar_fast(x, 4)
    assert torch.equal(lut[0].gather(0, idx[0]), x[0])


def test_fast_lut_function_returns_coremltools_custom_format():
    fn = fast_lut_function("pal3")
    values = (np.random.RandomState(0).randn(16, 24) * 0.1).astype(np.float16)
    lut, indices = fn(values)
    assert lut.shape == (8,) and lut.dtype == np.float16
    assert indices.shape == (16 * 24,) and indices.dtype == np.uint8 and indices.max() < 8
    with pytest.raises(SpecError):
        fast_lut_function("pal4/uniform")
