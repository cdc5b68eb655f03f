"""reduce_* over ``axes`` (all when absent) with ``keep_dims``, and argmax/argmin (int32) (iOS15 ``reduction.py``)."""
from __future__ import annotations

import torch

from .registry import Args, Context, Node, Out, axis_list, register


def _axes(a, x):
    return axis_list(a["axes"], x.dim()) if a.get("axes") is not None else list(range(x.dim()))


def _reduce(fn):
    def handler(a: Args, node: Node, ctx: Context) -> Out:
        x = a["x"]
        return fn(x, _axes(a, x), bool(a.get("keep_dims", False)))
    return handler


_REDUCE = {
    "reduce_mean": lambda x, d, k: x.mean(d, keepdim=k),
    "reduce_sum": lambda x, d, k: x.sum(d, keepdim=k),
    "reduce_max": lambda x, d, k: x.amax(d, keepdim=k),
    "reduce_min": lambda x, d, k: x.amin(d, keepdim=k),
    "reduce_prod": lambda x, d, k: _prod(x, d, k),
    "reduce_sum_square": lambda x, d, k: (x * x).sum(d, keepdim=k),
    "reduce_l1_norm": lambda x, d, k: x.abs().sum(d, keepdim=k),
    "reduce_l2_norm": lambda x, d, k: torch.sqrt((x * x).sum(d, keepdim=k)),
    "reduce_log_sum": lambda x, d, k: torch.log(x.sum(d, keepdim=k)),
    "reduce_log_sum_exp": lambda x, d, k: torch.logsumexp(x, d, keepdim=k),
}


def _prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = x.prod(d, keepdim=keep)
    return x


for _name, _fn in _REDUCE.items():
    register(_name)(_reduce(_fn))


@register("reduce_argmax", "reduce_argmin")
def reduce_arg(a: Args, node: Node, ctx: Context) -> Out:
    x = a["x"]
    fn = torch.argmax if node.type == "reduce_argmax" else torch.argmin
    return fn(x, dim=a.get("axis", -1), keepdim=bool(a.get("keep_dims", False))).to(torch.int32)
