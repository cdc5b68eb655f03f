"""Run an ML Program ``.mlpackage`` on Linux: an interpreter of Core ML ops in PyTorch (CPU or CUDA, batched).

``load_runtime(path, device="cpu", precision="fp32")`` reads the package once and returns a callable that maps
input names to tensors; see ``graph.py`` for what fp16 precision emulates and ``ops/shape.py`` for batching.
"""
from __future__ import annotations

import os

import torch

from .graph import PRECISIONS, Executable, check_supported
from .loader import Graph, load_graph
from .ops import supported_ops

__all__ = ["PRECISIONS", "Executable", "Graph", "check_supported", "load_graph", "load_runtime", "supported_ops"]


def load_runtime(path: str | os.PathLike, device: str | torch.device = "cpu", precision: str = "fp32",
                 overrides: dict | None = None) -> Executable:
    """Load and build the package at ``path``; ModelError (one line) for a bad package or an unsupported op.

    ``overrides`` replaces constants by output variable name (see ``Executable``)."""
    return Executable(load_graph(path), device=device, precision=precision, overrides=overrides)
