"""Elementwise binary, comparison, logical and unary math ops (numpy-style broadcasting, iOS15 ``elementwise_*``)."""
from __future__ import annotations

import torch

from .registry import Args, Context, Node, Out, register

_BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "real_div": torch.true_divide,
    "floor_div": torch.floor_divide, "pow": torch.pow, "maximum": torch.maximum, "minimum": torch.minimum,
    "mod": torch.remainder, "equal": torch.eq, "not_equal": torch.ne, "greater": torch.gt,
    "greater_equal": torch.ge, "less": torch.lt, "less_equal": torch.le, "logical_and": torch.logical_and,
    "logical_or": torch.logical_or, "logical_xor": torch.logical_xor,
}


def _tensor(v, like):
    return v if isinstance(v, torch.Tensor) else torch.as_tensor(v, device=like.device)


def _binary(fn):
    def handler(a: Args, node: Node, ctx: Context) -> Out:
        x, y = a["x"], a["y"]
        if isinstance(y, list):
            y = _tensor(y, x)
        if not isinstance(x, torch.Tensor):
            x = _tensor(x, y)
        if fn in (torch.maximum, torch.minimum) and not isinstance(y, torch.Tensor):
            y = _tensor(y, x).to(x.dtype)
        return fn(x, y)
    return handler


for _name, _fn in _BINARY.items():
    register(_name)(_binary(_fn))

_UNARY = {
    "abs": torch.abs, "exp": torch.exp, "exp2": torch.exp2, "sqrt": torch.sqrt,
    "square": torch.square, "sin": torch.sin, "cos": torch.cos, "tan": torch.tan, "asin": torch.asin,
    "acos": torch.acos, "atan": torch.atan, "sinh": torch.sinh, "cosh": torch.cosh, "atanh": torch.atanh,
    "floor": torch.floor, "ceil": torch.ceil, "round": torch.round, "sign": torch.sign, "erf": torch.erf,
    "logical_not": torch.logical_not, "identity": lambda x: x,
}


def _unary(fn):
    return lambda a, node, ctx: fn(a["x"])


for _name, _fn in _UNARY.items():
    register(_name)(_unary(_fn))


@register("rsqrt")
def rsqrt(a: Args, node: Node, ctx: Context) -> Out:
    return torch.rsqrt(a["x"] + a.get("epsilon", 1e-12))


@register("inverse")
def inverse(a: Args, node: Node, ctx: Context) -> Out:
    return 1.0 / (a["x"] + a.get("epsilon", 1e-4))


@register("log")
def log(a: Args, node: Node, ctx: Context) -> Out:
    return torch.log(a["x"] + a.get("epsilon", 0.0))


@register("clip")
def clip(a: Args, node: Node, ctx: Context) -> Out:
    return torch.clamp(a["x"], a["alpha"], a["beta"])


@register("threshold")
def threshold(a: Args, node: Node, ctx: Context) -> Out:
    return torch.clamp(a["x"], min=a["alpha"])


@register("select")
def select(a: Args, node: Node, ctx: Context) -> Out:
    cond, x, y = a["cond"], a["a"], a["b"]
    x = _tensor(x, cond)
    y = _tensor(y, cond)
    return torch.where(cond.bool(), x, y)
