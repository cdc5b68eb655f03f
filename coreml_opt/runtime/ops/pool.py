"""avg_pool, max_pool, l2_pool (iOS15 ``pool.py``): explicit pads, ceil_mode, exclude_padding_from_average."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .conv import spatial_pads, torch_pad
from .registry import Args, Context, Node, Out, ints, register

_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _setup(a, x):
    n = x.dim() - 2
    kernel = ints(a["kernel_sizes"])
    strides = ints(a.get("strides", [1] * n))
    pads = spatial_pads(a.get("pad_type", "valid"), a.get("pad", [0] * 2 * n), x.shape[2:], kernel, strides,
                        [1] * n)
    return n, kernel, strides, pads, bool(a.get("ceil_mode", False))


@register("avg_pool")
def avg_pool(a: Args, node: Node, ctx: Context) -> Out:
    x = a["x"]
    n, kernel, strides, pads, ceil = _setup(a, x)
    exclude = bool(a.get("exclude_padding_from_average", False))
    if all(b == e and 2 * b <= k for (b, e), k in zip(pads, kernel)):
        return _AVG[n](x, kernel, strides, [b for b, _ in pads], ceil, not exclude)
    padded = F.pad(x, torch_pad(pads))
    total = _AVG[n](padded, kernel, strides, 0, ceil, True)
    if not exclude:
        return total
    ones = F.pad(torch.ones_like(x[:1, :1]), torch_pad(pads))
    return total / _AVG[n](ones, kernel, strides, 0, ceil, True)


@register("max_pool")
def max_pool(a: Args, node: Node, ctx: Context) -> Out:
    x = a["x"]
    n, kernel, strides, pads, ceil = _setup(a, x)
    if any(p for pair in pads for p in pair):
        x = F.pad(x, torch_pad(pads), value=float("-inf"))
    return _MAX[n](x, kernel, strides, 0, 1, ceil)


@register("l2_pool")
def l2_pool(a: Args, node: Node, ctx: Context) -> Out:
    x = a["x"]
    n, kernel, strides, pads, ceil = _setup(a, x)
    x = F.pad(x * x, torch_pad(pads))
    size = 1
    for k in kernel:
        size *= k
    return torch.sqrt(_AVG[n](x, kernel, strides, 0, ceil, True) * size)
