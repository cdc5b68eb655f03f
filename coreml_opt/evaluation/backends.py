"""Two evaluation backends behind one interface, ``backend(x) -> outputs`` (the first output, fp32):

``TorchBackend`` runs an nn.Module (possibly with simulated weights swapped in); ``PackageBackend`` runs an
ML Program package with the package runtime, optionally with weight consts replaced by other values.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from ..errors import ModelError

PACKAGE_SUFFIX = ".mlpackage"


def first_tensor(value: Any) -> torch.Tensor:
    """The model output used by metrics: the tensor itself, or the first tensor in a tuple/list/dict."""
    if isinstance(value, torch.Tensor):
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        try:
            return first_tensor(item)
        except TypeError:
            continue
    raise TypeError(f"model output of type {type(value).__name__} holds no tensor")


def is_package(model: Any) -> bool:
    """Whether ``model`` names an .mlpackage (a path ending in .mlpackage, or an existing folder)."""
    if not isinstance(model, (str, os.PathLike)):
        return False
    return str(model).rstrip("/").endswith(PACKAGE_SUFFIX) or Path(model).is_dir()


def run_batches(model: Any, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Outputs per batch of an nn.Module (no grad; the first tensor of several) or of any backend."""
    with torch.no_grad():
        return [first_tensor(model(x)) for x in batches]


class TorchBackend:
    """An nn.Module in eval mode as ``x -> first output``."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module.eval()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return first_tensor(self.module(x)).float()


class PackageBackend:
    """An ML Program package run by the package runtime as ``x -> first output`` (one input port).

    Built once; ``values`` (const output variable -> tensor, see ``Executable.set_values``) replace weights
    between calls without rebuilding, which is how a package sweep's trial swaps in one simulated weight."""

    def __init__(self, package: Union[str, os.PathLike], precision: str = "fp32", device: str = "cpu",
                 variables: Optional[list[str]] = None) -> None:
        from ..runtime import Executable, load_graph

        self.path = str(package)
        self.graph = load_graph(package)
        self.executable = Executable(self.graph, device=device, precision=precision, variables=variables)
        if len(self.graph.inputs) != 1:
            names = [p.name for p in self.graph.inputs]
            raise ModelError(self.path, f"has {len(names)} inputs {names}; evaluation feeds one",
                             "evaluate it from Python with coreml_opt.runtime.load_runtime")
        self.port = self.graph.inputs[0]
        self.output = self.graph.outputs[0]
        self._prefix_key: Optional[tuple[str, int]] = None
        self._prefix: Optional[list[dict]] = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.port.shape

    def set_values(self, values: Mapping[str, torch.Tensor]) -> None:
        """Use these values for the variables named at build time (all of them, every call)."""
        self.executable.set_values(values)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.executable({self.port.name: x})[self.output].float().cpu()

    def outputs_after(self, variable: str, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """Outputs per batch, as ``run_batches(self, batches)`` gives them, running only the steps from the first
        reader of ``variable`` on: what comes before is computed once and kept for the last variable asked
        (a sweep's trials of one layer are consecutive). Batches that cannot run batched run in full."""
        exe = self.executable
        start = exe.first_reader(variable)
        if self._prefix_key != (variable, id(batches)):
            self._prefix = None
            cached = [exe.run_prefix({self.port.name: x}, start) for x in batches]
            self._prefix = None if any(c is None for c in cached) else cached
            self._prefix_key = (variable, id(batches))
        if self._prefix is None:
            return run_batches(self, batches)
        return [exe.run_suffix(values, start)[self.output].float().cpu() for values in self._prefix]


def resolve_model(model: Union[nn.Module, str]) -> tuple[nn.Module, Optional[str]]:
    """(module, factory string or None) from an nn.Module or ``package.module:factory``."""
    from ..model.convert import load_factory

    if isinstance(model, str):
        return load_factory(model), model
    if not isinstance(model, nn.Module):
        raise ModelError(repr(model)[:60], "is not a torch.nn.Module", "pass a module or package.module:factory")
    return model, None


def backend_for(model: Union[nn.Module, str], precision: str = "fp32", device: str = "cpu"):
    """A backend for a module, a ``package.module:factory`` (run eagerly) or an .mlpackage path."""
    if is_package(model):
        return PackageBackend(str(model), precision, device)
    return TorchBackend(resolve_model(model)[0])
