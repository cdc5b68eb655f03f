"""The op table: each MIL op type has one handler ``fn(a, node, ctx)``, the torchao way (adding an op is adding a handler).

``a`` maps each parameter to its value: a torch tensor, or a Python scalar/list/str for small constant
integer, bool and string parameters and for scalar float constants; variadic parameters (``values``) are lists.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union

import torch

from ..loader import Node

Args = dict[str, Any]  # a handler's resolved arguments by parameter name
Out = Union[torch.Tensor, tuple]  # one tensor, or a tuple for multi-output ops (split, sparse constexprs)

HANDLERS: dict[str, Callable[..., Any]] = {}
VARIADIC = {"values"}


@dataclass
class Context:
    """What a handler may need besides its arguments: compute dtype, device, and static shapes by variable name."""

    device: torch.device
    fp16: bool
    shapes: dict[str, tuple[int, ...]]

    def static_shape(self, node: Node, param: str) -> tuple[int, ...]:
        """The package's declared shape of ``node``'s argument ``param`` (() when a literal)."""
        arg = node.inputs[param][0]
        return self.shapes.get(arg.var, ()) if arg.var else ()


def batch_axis(node: Node, ctx: Context, x: torch.Tensor, param: str = "x") -> int | None:
    """The axis where ``x`` runs a batch the package did not declare (static size 1, run-time size N), or None."""
    static = ctx.static_shape(node, param)
    if len(static) != x.dim() or tuple(x.shape) == static:
        return None
    for axis, (declared, actual) in enumerate(zip(static, x.shape)):
        if declared == 1 and actual != 1:
            return axis
    return None


def register(*op_types: str) -> Callable:
    """Decorator: make ``fn`` the handler of ``op_types``."""
    def wrap(fn: Callable) -> Callable:
        for op_type in op_types:
            HANDLERS[op_type] = fn
        return fn
    return wrap


def ints(value: Any) -> list[int]:
    """A constant integer parameter as a list of Python ints."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def axis_list(value: Any, rank: int) -> list[int]:
    """Axes as non-negative ints for a tensor of ``rank``."""
    return [v % rank for v in ints(value)]
