"""A torch model holding the values Core ML stores: every floating parameter and buffer rounded to fp16."""
from __future__ import annotations

import copy

import torch
from torch import nn


def fp16_copy(model: nn.Module) -> nn.Module:
    """Deep copy (eval mode) whose floating parameters and buffers hold fp16 values, kept in their own dtype."""
    out = copy.deepcopy(model).eval()
    with torch.no_grad():
        for tensor in [*out.parameters(), *out.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(torch.float16).to(tensor.dtype))
    return out
