"""The package runtime as a ``torch.nn.Module``: one input, the first output, so any evaluator that scores a torch
model (``evaluation.Evaluator``, a user's metric function) scores the ``.mlpackage`` itself."""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import ModelError
from . import load_runtime


class PackageModule(nn.Module):
    """``forward(x)`` runs the package at ``path`` (fp32 or fp16 mode) on a batch ``x`` (N, ...) and returns its
    first output; ModelError (one line) for a package with several inputs or one the runtime cannot run."""

    def __init__(self, path: str | os.PathLike, precision: str = "fp32", device: str = "cpu",
                 overrides: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.runtime = load_runtime(path, device=device, precision=precision, overrides=overrides)
        graph = self.runtime.graph
        if len(graph.inputs) != 1:
            raise ModelError(str(path), f"has {len(graph.inputs)} inputs {[p.name for p in graph.inputs]}; "
                             "measuring feeds one", "measure it from Python with coreml_opt.runtime.load_runtime")
        self.input_name, self.output_name = graph.inputs[0].name, graph.outputs[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.runtime({self.input_name: x})[self.output_name].cpu()
