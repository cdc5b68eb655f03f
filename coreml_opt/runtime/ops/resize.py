"""upsample_nearest_neighbor and upsample_bilinear (iOS15/iOS16 ``image_resizing.py``).

Bilinear follows Core ML's grid formula (recomputed scale, align_corners, half_pixel_centers) through one
interpolation matrix per spatial axis, so every mode is exact to the documented sampling.
"""
from __future__ import annotations

import math

import torch

from .registry import Args, Context, Node, Out, register


def _grid(size_in: int, size_out: int, align_corners: bool, half_pixel: bool, device) -> torch.Tensor:
    """[size_out, size_in] matrix of bilinear weights."""
    i = torch.arange(size_out, dtype=torch.float64)
    if align_corners and size_out > 1:
        src = i * ((size_in - 1) / (size_out - 1))
    else:
        spacing = size_in / size_out
        src = i * spacing + (0.5 * spacing - 0.5 if half_pixel else 0.0)
    src = src.clamp(0, size_in - 1)
    lo = src.floor().long()
    hi = (lo + 1).clamp(max=size_in - 1)
    frac = src - lo
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    matrix[torch.arange(size_out), lo] += 1 - frac
    matrix[torch.arange(size_out), hi] += frac
    return matrix.float().to(device)


@register("upsample_bilinear")
def upsample_bilinear(a: Args, node: Node, ctx: Context) -> Out:
    x = a["x"]
    h, w = x.shape[-2:]
    out_h = math.floor(h * float(a.get("scale_factor_height", 1)))
    out_w = math.floor(w * float(a.get("scale_factor_width", 1)))
    align = bool(a.get("align_corners", True))
    half = bool(a.get("half_pixel_centers", not align))
    mh = _grid(h, out_h, align, half, x.device)
    mw = _grid(w, out_w, align, half, x.device)
    return torch.matmul(torch.matmul(mh, x), mw.t())


@register("upsample_nearest_neighbor")
def upsample_nearest_neighbor(a: Args, node: Node, ctx: Context) -> Out:
    """out[i] = in[floor(i / scale)]."""
    x = a["x"]
    h, w = x.shape[-2:]
    sh, sw = float(a.get("scale_factor_height", 1)), float(a.get("scale_factor_width", 1))
    rows = (torch.arange(math.floor(h * sh), device=x.device) / sh).floor().long().clamp(max=h - 1)
    cols = (torch.arange(math.floor(w * sw), device=x.device) / sw).floor().long().clamp(max=w - 1)
    return x.index_select(-2, rows).index_select(-1, cols)
