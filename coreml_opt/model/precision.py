"""A torch model holding the values Core ML stores: every floating parameter and buffer rounded to fp16."""
from __future__ import annotations

import copy

import torch
from torch import nn


def fp16_copy(model: nn.Module) -> nn.Module:
    """Deep copy (eval mode) whose floating parameters and buffers hold fp16 values, kept in their own dtype."""
    return round_to_fp16_(copy.deepcopy(model))


def round_to_fp16_(model: nn.Module) -> nn.Module:
    """``model`` itself (eval mode), its floating parameters and buffers rounded to fp16 values in place: the
    one-copy form of :func:`fp16_copy` for a caller that owns the model (a memory-bounded sweep)."""
    model.eval()
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(torch.float16).to(tensor.dtype))
    return model
