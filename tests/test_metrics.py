"""Metrics: values on known inputs, direction of drop, one-line errors for bad metric names."""
from __future__ import annotations

import math

import pytest
import torch

from coreml_opt.errors import CoreMLOptError
from coreml_opt.metrics import MAX_DB, METRICS, drop, get_metric, import_metric_fn


def test_identical_outputs_score_perfectly():
    ref = torch.randn(16, 10, generator=torch.Generator().manual_seed(0))
    assert get_metric("psnr").score(ref, ref, None) == MAX_DB
    assert get_metric("sqnr").score(ref, ref, None) == MAX_DB
    assert get_metric("kl").score(ref, ref, None) == pytest.approx(0.0, abs=1e-12)
    assert get_metric("top1").score(ref, ref, None) == 1.0
    assert get_metric("cosine").score(ref, ref, None) == pytest.approx(1.0)


def test_sqnr_and_psnr_match_their_definitions():
    ref = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    out = ref + torch.tensor([[0.1, 0.0], [0.0, -0.1]])
    noise = 0.02
    assert get_metric("sqnr").score(out, ref, None) == pytest.approx(10 * math.log10(30.0 / noise))
    assert get_metric("psnr").score(out, ref, None) == pytest.approx(10 * math.log10(16.0 / (noise / 4)))


def test_accuracy_and_top1_count_argmax_matches():
    out = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    ref = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4]])
    assert get_metric("accuracy").score(out, ref, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    assert get_metric("top1").score(out, ref, None) == pytest.approx(2 / 3)


def test_drop_is_positive_when_worse_for_both_directions():
    assert drop(0.99, 0.97, higher_is_better=True) == pytest.approx(0.02)
    assert get_metric("kl").drop(0.001, 0.01) == pytest.approx(0.009)
    ref = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    worse = ref + 0.5 * torch.randn(8, 5, generator=torch.Generator().manual_seed(2))
    for name, metric in METRICS.items():
        if name == "accuracy":
            continue
        base, value = metric.score(ref, ref, None), metric.score(worse, ref, None)
        assert metric.drop(base, value) >= 0, name


def test_bad_metric_names_are_one_line_errors():
    for bad in ("nope", "no_such_pkg.mod:fn", "coreml_opt.zoo:no_such_fn"):
        with pytest.raises(CoreMLOptError) as info:
            get_metric(bad) if ":" not in bad else import_metric_fn(bad)
        assert "\n" not in str(info.value) and bad in str(info.value)
    with pytest.raises(CoreMLOptError, match="labels"):
        get_metric("accuracy").score(torch.zeros(2, 3), None, None)
