"""batch_norm, instance_norm, layer_norm, l2_norm (iOS15 ``normalization.py``); channel axis 1, biased variance."""
from __future__ import annotations

import torch

from .registry import Args, Context, Node, Out, axis_list, register


def _channel(v, x):
    return v.reshape(1, -1, *([1] * (x.dim() - 2))) if isinstance(v, torch.Tensor) else v


def _channel_affine(y, a, x):
    """y * gamma + beta per channel (axis 1), each optional."""
    if a.get("gamma") is not None:
        y = y * _channel(a["gamma"], x)
    if a.get("beta") is not None:
        y = y + _channel(a["beta"], x)
    return y


@register("batch_norm")
def batch_norm(a: Args, node: Node, ctx: Context) -> Out:
    x = a["x"]
    scale = torch.rsqrt(a["variance"] + a.get("epsilon", 1e-5))
    return _channel_affine((x - _channel(a["mean"], x)) * _channel(scale, x), a, x)


@register("instance_norm")
def instance_norm(a: Args, node: Node, ctx: Context) -> Out:
    x = a["x"]
    dims = tuple(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    return _channel_affine((x - mean) * torch.rsqrt(var + a.get("epsilon", 1e-5)), a, x)


@register("layer_norm")
def layer_norm(a: Args, node: Node, ctx: Context) -> Out:
    """Normalise over ``axes`` (all when absent); gamma/beta have the shape of those axes."""
    x = a["x"]
    axes = axis_list(a["axes"], x.dim()) if a.get("axes") is not None else list(range(x.dim()))
    if axes == list(range(x.dim() - len(axes), x.dim())):
        return torch.nn.functional.layer_norm(x, x.shape[x.dim() - len(axes):], a.get("gamma"), a.get("beta"),
                                              a.get("epsilon", 1e-5))
    mean = x.mean(axes, keepdim=True)
    var = ((x - mean) ** 2).mean(axes, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + a.get("epsilon", 1e-5))
    if a.get("gamma") is not None:
        y = y * a["gamma"]
    if a.get("beta") is not None:
        y = y + a["beta"]
    return y


@register("l2_norm")
def l2_norm(a: Args, node: Node, ctx: Context) -> Out:
    x = a["x"]
    dims = tuple(axis_list(a["axes"], x.dim())) if a.get("axes") is not None else tuple(range(1, x.dim()))
    return x / torch.sqrt((x * x).sum(dims, keepdim=True).clamp_min(a.get("epsilon", 1e-6)))
