"""Activations (iOS15 ``activation.py``): relu family, sigmoid family, gelu modes, softmax, softplus."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Args, Context, Node, Out, register


@register("relu")
def relu(a: Args, node: Node, ctx: Context) -> Out:
    return torch.relu(a["x"])


@register("relu6")
def relu6(a: Args, node: Node, ctx: Context) -> Out:
    return torch.clamp(a["x"], 0.0, 6.0)


@register("sigmoid")
def sigmoid(a: Args, node: Node, ctx: Context) -> Out:
    return torch.sigmoid(a["x"])


@register("tanh")
def tanh(a: Args, node: Node, ctx: Context) -> Out:
    return torch.tanh(a["x"])


@register("silu")
def silu(a: Args, node: Node, ctx: Context) -> Out:
    return F.silu(a["x"])


@register("sigmoid_hard")
def sigmoid_hard(a: Args, node: Node, ctx: Context) -> Out:
    """min(max(alpha * x + beta, 0), 1)."""
    return torch.clamp(a.get("alpha", 0.2) * a["x"] + a.get("beta", 0.5), 0.0, 1.0)


@register("thresholded_relu")
def thresholded_relu(a: Args, node: Node, ctx: Context) -> Out:
    """x where x > alpha, else 0."""
    x = a["x"]
    return torch.where(x > a.get("alpha", 1.0), x, torch.zeros((), dtype=x.dtype, device=x.device))


@register("leaky_relu")
def leaky_relu(a: Args, node: Node, ctx: Context) -> Out:
    return F.leaky_relu(a["x"], a.get("alpha", 0.01))


@register("elu")
def elu(a: Args, node: Node, ctx: Context) -> Out:
    return F.elu(a["x"], a.get("alpha", 1.0))


@register("prelu")
def prelu(a: Args, node: Node, ctx: Context) -> Out:
    x, alpha = a["x"], a["alpha"]
    return torch.where(x >= 0, x, x * alpha.reshape(1, -1, *([1] * (x.dim() - 2))))


@register("softplus")
def softplus(a: Args, node: Node, ctx: Context) -> Out:
    return F.softplus(a["x"])


@register("gelu")
def gelu(a: Args, node: Node, ctx: Context) -> Out:
    """Modes EXACT (erf), TANH_APPROXIMATION, SIGMOID_APPROXIMATION (x * sigmoid(1.702 x))."""
    x, mode = a["x"], a.get("mode", "EXACT")
    if mode == "TANH_APPROXIMATION":
        return F.gelu(x, approximate="tanh")
    if mode == "SIGMOID_APPROXIMATION":
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x)


@register("softmax")
def softmax(a: Args, node: Node, ctx: Context) -> Out:
    return torch.softmax(a["x"], dim=a.get("axis", -1))
