"""Evaluation data: a Dataset from a folder, an .npz, a ``package.module:fn``, a tensor or a DataLoader.

Written once for every user of evaluation (sweeps, plans, workflows, ``coreml-opt eval``).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch

from ..data import Dataset, load_dataset
from ..errors import DataError
from ..metrics import MetricError, import_metric_fn

DATA_FREE_SAMPLES = 64


def resolve_data(data: Any, input_shape: Optional[tuple[int, ...]] = None) -> Optional[Dataset]:
    """A Dataset from a folder, an .npz, a ``package.module:fn`` returning data, a tensor or a DataLoader.

    ``None`` with an ``input_shape`` gives seeded uniform random inputs (data-free proxies)."""
    if data is None:
        if input_shape is None:
            return None
        gen = torch.Generator().manual_seed(0)
        return Dataset(torch.rand((DATA_FREE_SAMPLES, *input_shape[1:]), generator=gen), None, "random inputs")
    if isinstance(data, str) and ":" in data and not os.path.exists(data):
        fn = load_factory_fn(data)
        try:
            value = fn()
        except Exception as exc:
            raise DataError(f"data {data!r}", f"raised {type(exc).__name__}: {str(exc)[:120]}",
                            "make the function callable with no arguments") from exc
        if isinstance(value, tuple) and len(value) == 2:
            return Dataset(value[0], value[1], source=data)
        return load_dataset(value)
    return load_dataset(data)


def load_factory_fn(path: str) -> Callable[[], Any]:
    """Import ``package.module:fn`` for data factories (one-line DataError when missing)."""
    try:
        return import_metric_fn(path)
    except MetricError as exc:
        raise DataError(f"data {path!r}", exc.problem, "pass a folder, an .npz or package.module:fn") from None
