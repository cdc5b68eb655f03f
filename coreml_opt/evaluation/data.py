"""Evaluation data: a Dataset from a folder, an .npz, a ``package.module:fn``, a tensor or a DataLoader.

Written once for every user of evaluation (sweeps, plans, workflows, ``coreml-opt eval``).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ..data import Dataset, load_dataset
from ..errors import DataError
from ..model.inputs import InputSpec, single_input

DATA_FREE_SAMPLES = 64


def resolve_data(data: Any, input_shape: Union[tuple[int, ...], InputSpec, None] = None,
                 model: Optional[nn.Module] = None) -> Optional[Dataset]:
    """A Dataset from a folder, an .npz, a ``package.module:fn`` returning data, a tensor or a DataLoader.

    ``None`` with an ``input_shape`` (or one InputSpec) gives seeded data-free inputs: uniform floats, or
    token ids below ``model``'s smallest embedding vocabulary for an ``int32`` input."""
    if data is None:
        if input_shape is None:
            return None
        spec = single_input(input_shape)
        gen = torch.Generator().manual_seed(0)
        return Dataset(spec.samples(model if model is not None else nn.Module(), DATA_FREE_SAMPLES, gen), None,
                       "random token ids" if spec.is_integer else "random inputs")
    if isinstance(data, str) and ":" in data and not os.path.exists(data):
        from ..imports import call_without_arguments

        value = call_without_arguments(load_factory_fn(data), data,
                                       lambda text, problem, fix: DataError(f"data {text!r}", problem, fix))
        if isinstance(value, tuple) and len(value) == 2:
            return Dataset(value[0], value[1], source=data)
        return load_dataset(value)
    return load_dataset(data)


def load_factory_fn(path: str) -> Callable[[], Any]:
    """Import ``package.module:fn`` or ``file.py:fn`` for data factories (one-line DataError naming the fix)."""
    from ..imports import import_callable

    return import_callable(path, lambda text, problem, fix: DataError(f"data {text!r}", problem, fix),
                           example="coreml_opt.sensitivity.examples:digits_heldout")
