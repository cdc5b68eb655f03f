"""Model factories for the Ray executor's tests, named by file path (`tests/ray_models.py:fn`) as a user would."""
from __future__ import annotations

import time

from torch import nn

from coreml_opt import zoo

SLEEP_SECONDS = 0.3


def _sleep(*_: object) -> None:
    time.sleep(SLEEP_SECONDS)


def slow_digits_cnn() -> nn.Module:
    """The example digits CNN (same class and weights, so the same store key and values) whose output layer sleeps
    0.3 s per forward: a sweep slow enough for a test to kill a Ray worker node while trials run."""
    model = zoo.digits_cnn()
    model.classifier[-1].register_forward_hook(_sleep)
    return model


def unseeded_digits_cnn() -> nn.Module:
    """An untrained digits CNN drawn from a fresh random seed on every call: other weights on every Ray worker."""
    import torch

    torch.seed()
    return zoo.digits_cnn(pretrained=False)
