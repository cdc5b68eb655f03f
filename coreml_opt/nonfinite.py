"""Counting NaN and inf: the one test every weight, input and output passes before it is trusted."""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn


def nonfinite_count(values: torch.Tensor) -> int:
    """How many entries of ``values`` are NaN, +inf or -inf (0 for integer tensors)."""
    return int(values.numel() - torch.isfinite(values).sum())


def nonfinite_tensors(module: nn.Module) -> Iterator[tuple[str, int, int]]:
    """(state_dict name, NaN/inf count, size) of each floating parameter or buffer holding NaN or inf."""
    for name, value in module.state_dict().items():
        if torch.is_tensor(value) and value.is_floating_point():
            bad = nonfinite_count(value)
            if bad:
                yield name, bad, value.numel()
