"""BatchNorm folding into the conv/linear before it, done only where it is exact.

A BN normalises dim 1 of its input; a conv writes its channels to dim 1 only
when its input is batched, and a Linear writes the last dim, which is dim 1
only for a 2-D ``(N, C)`` output. So a pair folds only when the layer's output
has the rank that puts its channels on dim 1 (Linear 2-D, Conv1d 3-D, Conv2d 4-D).
With an example input the ranks are measured; without one the BN becomes a
``FoldedBatchNorm`` that refuses any other rank at run time instead of being silently wrong.
"""
from __future__ import annotations

import copy
import logging
from typing import Optional, Sequence, Union

import torch
from torch import nn

from coreml_opt.errors import ModelError

logger = logging.getLogger(__name__)

# layer type -> (BN type that may follow it, rank of the layer output that puts its channels on dim 1)
_FOLD_RULES: dict[type, tuple[type, int]] = {
    nn.Linear: (nn.BatchNorm1d, 2),
    nn.Conv1d: (nn.BatchNorm1d, 3),
    nn.Conv2d: (nn.BatchNorm2d, 4),
}
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)

Example = Union[torch.Tensor, Sequence[torch.Tensor], None]


class FoldedBatchNorm(nn.Identity):
    """Stands where a folded BN was; raises if its input ever has a rank for which the fold is not exact."""

    def __init__(self, path: str, layer_path: str, ndim: int) -> None:
        super().__init__()
        self.path, self.layer_path, self.ndim = path, layer_path, ndim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if isinstance(x, torch.Tensor) and x.ndim != self.ndim:  # fx proxies pass through untouched
            raise ModelError(self.path, f"was folded into {self.layer_path} for {self.ndim}-D inputs but got a "
                             f"{x.ndim}-D one, where the fold is not exact",
                             "pass an example input to fold_batchnorm so it folds only exact pairs")
        return x

    def extra_repr(self) -> str:
        return f"folded into {self.layer_path}, {self.ndim}-D"


def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` (eval statistics) into the weight and bias of ``layer`` in place (in fp64, stored back)."""
    with torch.no_grad():
        w = layer.weight
        dtype = w.dtype
        mean = bn.running_mean.double()
        var = bn.running_var.double()
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
        scale = gamma / torch.sqrt(var + bn.eps)
        shape = (-1,) + (1,) * (w.ndim - 1)  # conv and linear weights hold output channels on dim 0
        new_w = (w.double() * scale.reshape(shape)).to(dtype)
        bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(mean)
        new_b = ((bias - mean) * scale + beta).to(dtype)
        w.copy_(new_w)
        if layer.bias is not None:
            layer.bias.copy_(new_b)
        else:
            layer.bias = nn.Parameter(new_b, requires_grad=w.requires_grad)


def _fold_rank(layer: nn.Module, bn: nn.Module) -> Optional[int]:
    """Output rank of ``layer`` at which folding ``bn`` into it is exact, or None when it never is."""
    rule = _FOLD_RULES.get(type(layer)) or next(
        (r for t, r in _FOLD_RULES.items() if isinstance(layer, t)), None)
    if rule is None or not isinstance(bn, rule[0]):
        return None
    if bn.running_mean is None or bn.running_var is None:
        return None  # batch statistics at inference: cannot be folded
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    return rule[1] if out == bn.num_features else None


def _shared_params(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module holds (tied weights): folding one would change the other."""
    seen: dict[int, int] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def _pairs_fx(model: nn.Module) -> Optional[list[tuple[str, str]]]:
    """(layer path, bn path) pairs where a BN consumes only a conv/linear output, via torch.fx."""
    try:
        import torch.fx as fx
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # dynamic control flow etc.: caller falls back
        logger.debug("fx tracing failed (%s); folding Sequential pairs only", exc)
        return None
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        prev = node.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module"):
            continue
        if len(prev.users) != 1 or calls[node.target] != 1 or calls[prev.target] != 1:
            continue
        pairs.append((prev.target, node.target))
    return pairs


def _pairs_sequential(model: nn.Module) -> list[tuple[str, str]]:
    """(layer path, bn path) pairs of adjacent children inside nn.Sequential containers."""
    pairs = []
    for path, mod in model.named_modules():
        if isinstance(mod, nn.Sequential):
            names = list(mod._modules)
            for a, b in zip(names, names[1:]):
                prefix = f"{path}." if path else ""
                pairs.append((prefix + a, prefix + b))
    return pairs


def _observe(model: nn.Module, paths: set[str], example: Example) -> dict[str, list[int]]:
    """Run ``model`` on ``example`` once; module path -> output rank of each call (for ``paths`` only)."""
    seen: dict[str, list[int]] = {p: [] for p in paths}
    hooks = []
    for path in paths:
        def hook(_mod, _inp, out, path=path):
            seen[path].append(out.ndim if isinstance(out, torch.Tensor) else -1)
        hooks.append(model.get_submodule(path).register_forward_hook(hook))
    args = tuple(example) if isinstance(example, (list, tuple)) else (example,)
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` with ``new``."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def fold_batchnorm(model: nn.Module, example: Example = None) -> nn.Module:
    """Deep copy of ``model`` in eval mode with each BN folded into the conv/linear before it, where exact.

    ``example`` (a tensor or a tuple of the forward's inputs) lets the fold measure output ranks and
    call counts, so pairs that would not be exact stay unfolded (e.g. Linear + BatchNorm1d on
    ``(N, L, F)``: the BN normalises L, the Linear writes F). A folded BN becomes a ``FoldedBatchNorm``
    (an ``nn.Identity``); the layer keeps its parameter path and gains a bias if it had none.
    """
    folded = copy.deepcopy(model).eval()
    pairs = _pairs_fx(folded)
    if pairs is None:
        pairs = _pairs_sequential(folded)
    ranked = [(a, b, _fold_rank(folded.get_submodule(a), folded.get_submodule(b))) for a, b in pairs]
    ranked = [(a, b, r) for a, b, r in ranked if r is not None]
    shared = _shared_params(folded)
    seen = _observe(folded, {p for a, b, _ in ranked for p in (a, b)}, example) if example is not None and ranked \
        else None
    done = 0
    for layer_path, bn_path, rank in ranked:
        layer, bn = folded.get_submodule(layer_path), folded.get_submodule(bn_path)
        if any(id(p) in shared for p in layer.parameters(recurse=False)):
            logger.info("%s not folded: %s shares its weight with another module", bn_path, layer_path)
            continue
        if seen is not None:
            if len(seen[layer_path]) != 1 or len(seen[bn_path]) != 1:
                logger.info("%s not folded: %s and it are not each called once", bn_path, layer_path)
                continue
            if seen[layer_path][0] != rank:
                logger.info("%s not folded: %s gives a %d-D output; the BN normalises dim 1, which holds the "
                            "layer's channels only for %d-D", bn_path, layer_path, seen[layer_path][0], rank)
                continue
        _fold_into(layer, bn)
        _set_submodule(folded, bn_path, FoldedBatchNorm(bn_path, layer_path, rank))
        done += 1
        logger.debug("folded %s into %s", bn_path, layer_path)
    left = [p for p, m in folded.named_modules() if isinstance(m, _BATCHNORM)]
    if left:
        logger.warning("BatchNorm not folded (not directly after a conv/linear, or not exact for these shapes): "
                       "%s; coremltools will fold it and rename the weight", ", ".join(left))
    logger.info("folded %d BatchNorm layer(s)", done)
    return folded
