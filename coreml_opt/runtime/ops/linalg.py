"""linear (weight [out, in]) and matmul with transpose_x/transpose_y over the last two dims (iOS15 ``linear.py``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import register


@register("linear")
def linear(a, node, ctx):
    return F.linear(a["x"], a["weight"], a.get("bias"))


@register("matmul")
def matmul(a, node, ctx):
    x, y = a["x"], a["y"]
    if a.get("transpose_x", False):
        x = x.transpose(-1, -2)
    if a.get("transpose_y", False):
        y = y.transpose(-1, -2)
    return torch.matmul(x, y)


@register("einsum")
def einsum(a, node, ctx):
    return torch.einsum(a["equation"], *a["values"])
