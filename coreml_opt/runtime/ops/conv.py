"""conv and conv_transpose (iOS15/iOS17 ``conv.py``): pad_type valid/same/same_lower/custom, groups, strides, dilations.

Weights: conv [C_out, C_in/groups, *K]; conv_transpose [C_in, C_out/groups, *K]; ``pad`` is [begin, end] per
spatial dim; any padding is applied explicitly, so asymmetric pads match Core ML.
"""
from __future__ import annotations

import math

import torch.nn.functional as F

from .registry import Args, Context, Node, Out, ints, register

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def spatial_pads(pad_type: str, pad, sizes, kernel, strides, dilations) -> list[tuple[int, int]]:
    """(begin, end) padding per spatial dim as Core ML computes it for ``pad_type``."""
    if pad_type == "custom":
        values = ints(pad)
        return [(values[2 * i], values[2 * i + 1]) for i in range(len(sizes))]
    if pad_type == "valid":
        return [(0, 0)] * len(sizes)
    pads = []
    for size, k, s, d in zip(sizes, kernel, strides, dilations):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        begin = total - total // 2 if pad_type == "same_lower" else total // 2
        pads.append((begin, total - begin))
    return pads


def torch_pad(pads: list[tuple[int, int]]) -> list[int]:
    """F.pad's argument (last dim first) from (begin, end) per spatial dim in order."""
    return [p for pair in reversed(pads) for p in pair]


def _geometry(a) -> tuple:
    """(x, weight, spatial rank, strides, dilations) of a conv-like op."""
    x, w = a["x"], a["weight"]
    n = x.dim() - 2
    return x, w, n, ints(a.get("strides", [1] * n)), ints(a.get("dilations", [1] * n))


@register("conv")
def conv(a: Args, node: Node, ctx: Context) -> Out:
    x, w, n, strides, dilations = _geometry(a)
    pads = spatial_pads(a.get("pad_type", "valid"), a.get("pad", [0] * 2 * n), x.shape[2:], w.shape[2:],
                        strides, dilations)
    if any(p for pair in pads for p in pair):
        if all(b == e for b, e in pads):
            return _CONV[n](x, w, a.get("bias"), strides, [b for b, _ in pads], dilations, a.get("groups", 1))
        x = F.pad(x, torch_pad(pads))
    return _CONV[n](x, w, a.get("bias"), strides, 0, dilations, a.get("groups", 1))


@register("conv_transpose")
def conv_transpose(a: Args, node: Node, ctx: Context) -> Out:
    """Full transposed conv, then crop the pads; ``output_shape`` (when given) fixes the trailing size."""
    x, w, n, strides, dilations = _geometry(a)
    y = _CONV_T[n](x, w, None, strides, 0, 0, a.get("groups", 1), dilations)
    pad_type = a.get("pad_type", "valid")
    full = y.shape[2:]
    if pad_type == "custom":
        values = ints(a.get("pad", [0] * 2 * n))
        pads = [(values[2 * i], values[2 * i + 1]) for i in range(n)]
    elif pad_type == "valid":
        pads = [(0, 0)] * n
    else:  # same: output = input * stride
        pads = []
        for i in range(n):
            total = max(full[i] - x.shape[2 + i] * strides[i], 0)
            pads.append((total // 2, total - total // 2) if pad_type == "same" else (total - total // 2, total // 2))
    target = [full[i] - b - e for i, (b, e) in enumerate(pads)]
    if "output_shape" in a and a["output_shape"] is not None:
        target = ints(a["output_shape"])[-n:]
    index = [slice(None), slice(None)]
    extra = []
    for i, (b, _) in enumerate(pads):
        end = min(b + target[i], full[i])
        index.append(slice(b, end))
        extra.append(b + target[i] - end)
    y = y[tuple(index)]
    if any(extra):
        y = F.pad(y, torch_pad([(0, e) for e in extra]))
    bias = a.get("bias")
    if bias is not None:
        y = y + bias.reshape(1, -1, *([1] * n))
    return y
