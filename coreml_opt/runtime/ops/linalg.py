"""linear (weight [out, in]) and matmul with transpose_x/transpose_y over the last two dims (iOS15 ``linear.py``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Args, Context, Node, Out, register


@register("linear")
def linear(a: Args, node: Node, ctx: Context) -> Out:
    return F.linear(a["x"], a["weight"], a.get("bias"))


@register("matmul")
def matmul(a: Args, node: Node, ctx: Context) -> Out:
    x, y = a["x"], a["y"]
    if a.get("transpose_x", False):
        x = x.transpose(-1, -2)
    if a.get("transpose_y", False):
        y = y.transpose(-1, -2)
    return torch.matmul(x, y)


@register("einsum")
def einsum(a: Args, node: Node, ctx: Context) -> Out:
    return torch.einsum(a["equation"], *a["values"])
