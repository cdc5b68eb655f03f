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
                 model: Optional[nn.Module] = None, vocab: Optional[int] = None) -> Optional[Dataset]:
    """A Dataset from a folder, an .npz, a ``package.module:fn`` returning data, a tensor or a DataLoader.

    ``None`` with an ``input_shape`` (or one InputSpec) gives seeded data-free inputs: uniform floats, or
    token ids below ``model``'s smallest embedding vocabulary (or ``vocab``) for an ``int32`` input."""
    if data is None:
        if input_shape is None:
            return None
        spec = single_input(input_shape)
        gen = torch.Generator().manual_seed(0)
        return Dataset(spec.samples(model if model is not None else nn.Module(), DATA_FREE_SAMPLES, gen, vocab), None,
                       "random token ids" if spec.is_integer else "random inputs")
    if isinstance(data, str) and ":" in data and not os.path.exists(data):
        from ..imports import call_without_arguments

        value = call_without_arguments(load_factory_fn(data), data,
                                       lambda text, problem, fix: DataError(f"data {text!r}", problem, fix))
        if isinstance(value, tuple) and len(value) == 2:
            return Dataset(value[0], value[1], source=data)
        return load_dataset(value)
    return load_dataset(data)


def package_input(graph: Any) -> tuple[InputSpec, Optional[int]]:
    """A loaded package's one input as an InputSpec (``int32`` for an integer port, so data-free inputs are
    token ids, not floats the runtime would truncate to 0) and the smallest vocabulary (rows of a ``gather``
    table) its ids index, or None."""
    port = graph.inputs[0]
    integer = port.dtype.startswith(("INT", "UINT"))
    spec = InputSpec(port.name, tuple(port.shape), "int32" if integer else None)
    if not integer:
        return spec, None
    ids, rows = {port.name}, []
    for node in graph.nodes:  # program order: integer values computed from the ids (casts, negative-index
        reads = {param: [arg.var for arg in args] for param, args in node.inputs.items()}  # wrap), then gathers
        if node.type == "gather" and set(reads.get("indices", ())) & ids:
            table = graph.ports.get(reads.get("x", [None])[0])
            if table is not None and table.shape and table.shape[0] > 0:
                rows.append(table.shape[0])
        elif set().union(*reads.values()) & ids:
            ids.update(out.name for out in node.outputs if out.dtype.startswith(("INT", "UINT")))
    return spec, min(rows, default=None)


def load_factory_fn(path: str) -> Callable[[], Any]:
    """Import ``package.module:fn`` or ``file.py:fn`` for data factories (one-line DataError naming the fix)."""
    from ..imports import import_callable

    return import_callable(path, lambda text, problem, fix: DataError(f"data {text!r}", problem, fix),
                           example="coreml_opt.sensitivity.examples:digits_heldout")
