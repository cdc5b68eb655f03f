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
from typing import Mapping, Optional, Sequence, Union

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

# Largest |folded - original| on the example, relative to the largest |original| output (floor 1): fp32
# rounding of a fold done in fp64 is ~1e-7 per layer; a fold that is not exact is off by O(1).
FOLD_TOLERANCE = 1e-4


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


def _pairs_called(model: nn.Module, example: Example) -> Optional[list[tuple[str, str]]]:
    """(layer path, bn path) pairs where a BN's input is the very tensor a conv/linear returned, seen by running
    ``example`` with forward hooks: for models torch.fx cannot trace (control flow, custom autograd functions).
    Whether the layer's output is used elsewhere too is not seen here; ``fold_batchnorm`` keeps a fold only when
    the output stays exact."""
    produced: dict[int, str] = {}  # id of a tensor a foldable layer returned -> the layer's path
    pairs: list[tuple[str, str]] = []
    keep: list[torch.Tensor] = []  # holds every recorded output so that no id is reused during the run
    hooks = []
    for path, module in model.named_modules():
        if any(isinstance(module, t) for t in _FOLD_RULES):
            def after_layer(_mod, _inp, out, path=path):
                if isinstance(out, torch.Tensor):
                    produced[id(out)] = path
                    keep.append(out)
            hooks.append(module.register_forward_hook(after_layer))
        elif isinstance(module, _BATCHNORM):
            def before_bn(_mod, inp, path=path):
                if len(inp) == 1 and isinstance(inp[0], torch.Tensor) and id(inp[0]) in produced:
                    pairs.append((produced[id(inp[0])], path))
            hooks.append(module.register_forward_pre_hook(before_bn))
    try:
        with torch.no_grad():
            model(*_args(example))
    except Exception as exc:  # the caller's own run of the model reports a bad example in its words
        logger.debug("example input fails (%s); folding Sequential pairs only", exc)
        return None
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(pairs))


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


def _flat_tensors(out: object) -> list[torch.Tensor]:
    """Every tensor in a forward's output (a tensor, or nested tuples/lists/dicts of them), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flat_tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flat_tensors(v)]
    return []


def _args(example: Example) -> tuple:
    return tuple(example) if isinstance(example, (list, tuple)) else (example,)


def _difference(ref: list[torch.Tensor], out: list[torch.Tensor]) -> tuple[float, float]:
    """(largest |out - ref|, largest |ref| with floor 1) over float outputs; inf when shapes or ints differ."""
    worst, scale = 0.0, 1.0
    if len(ref) != len(out):
        return float("inf"), scale
    for a, b in zip(ref, out):
        if a.shape != b.shape:
            return float("inf"), scale
        if not a.is_floating_point():
            worst = worst if torch.equal(a, b) else float("inf")
        elif a.numel():
            worst = max(worst, float((a.double() - b.double()).abs().max()))
            scale = max(scale, float(a.double().abs().max()))
    return worst, scale


def _exact(ref: list[torch.Tensor], model: nn.Module, example: Example) -> bool:
    with torch.no_grad():
        worst, scale = _difference(ref, _flat_tensors(model(*_args(example))))
    return worst <= FOLD_TOLERANCE * scale


def check_fold(original: nn.Module, folded: nn.Module, example: Example, label: str) -> float:
    """Largest |folded - original| output difference on ``example`` (both in eval mode); ModelError naming
    ``label`` when it exceeds FOLD_TOLERANCE times the largest output (floor 1)."""
    was = original.training
    original.eval()
    try:
        with torch.no_grad():
            ref = _flat_tensors(original(*_args(example)))
            worst, scale = _difference(ref, _flat_tensors(folded(*_args(example))))
    finally:
        original.train(was)
    if not worst <= FOLD_TOLERANCE * scale:
        raise ModelError(label, f"folding BatchNorm changed its output by up to {worst:.3g} (outputs up to "
                         f"{scale:.3g}) on the example input, so the fold is not exact",
                         "fold that BatchNorm by hand (or remove it) and convert the result")
    logger.info("folded model matches the original within %.3g (outputs up to %.3g)", worst, scale)
    return worst


def _observe(model: nn.Module, paths: set[str], example: Example) -> tuple[dict[str, list[int]], list[torch.Tensor]]:
    """Run ``model`` on ``example`` once; (module path -> output rank of each call, for ``paths``; outputs)."""
    seen: dict[str, list[int]] = {p: [] for p in paths}
    hooks = []
    for path in paths:
        def hook(_mod, _inp, out, path=path):
            seen[path].append(out.ndim if isinstance(out, torch.Tensor) else -1)
        hooks.append(model.get_submodule(path).register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = _flat_tensors(model(*_args(example)))
    finally:
        for h in hooks:
            h.remove()
    return seen, out


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` with ``new``."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def _fold_pair(model: nn.Module, layer_path: str, bn_path: str, rank: int) -> tuple:
    """Fold one pair in place; returns what ``_unfold_pair`` needs to undo it."""
    layer, bn = model.get_submodule(layer_path), model.get_submodule(bn_path)
    saved = (layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone(), bn)
    _fold_into(layer, bn)
    _set_submodule(model, bn_path, FoldedBatchNorm(bn_path, layer_path, rank))
    return saved


def _unfold_pair(model: nn.Module, layer_path: str, bn_path: str, saved: tuple) -> None:
    """Undo ``_fold_pair``: the layer's weight and bias and the BN module come back."""
    weight, bias, bn = saved
    layer = model.get_submodule(layer_path)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is None:
            layer.bias = None
        else:
            layer.bias.copy_(bias)
    _set_submodule(model, bn_path, bn)


def fold_batchnorm(model: nn.Module, example: Example = None, *, copy_model: bool = True) -> nn.Module:
    """Deep copy of ``model`` in eval mode with each BN folded into the conv/linear before it, where exact
    (``copy_model=False``: ``model`` itself, folded in place, for a caller that owns it and holds it once).

    ``example`` (a tensor or a tuple of the forward's inputs) lets the fold measure output ranks and
    call counts, so pairs that would not be exact stay unfolded (e.g. Linear + BatchNorm1d on
    ``(N, L, F)``: the BN normalises L, the Linear writes F), and check the folded output against the
    original's, keeping only the folds that leave it within FOLD_TOLERANCE. A folded BN becomes a
    ``FoldedBatchNorm`` (an ``nn.Identity``); the layer keeps its parameter path and gains a bias if it had none.
    """
    folded = (copy.deepcopy(model) if copy_model else model).eval()
    pairs = _pairs_fx(folded)
    called = _pairs_called(folded, example) if example is not None else None
    if called is not None:  # fx traces through conv subclasses (e.g. static same padding) and misses them
        pairs = list(dict.fromkeys((pairs or []) + called))
    if pairs is None:
        pairs = _pairs_sequential(folded)
    ranked = [(a, b, _fold_rank(folded.get_submodule(a), folded.get_submodule(b))) for a, b in pairs]
    ranked = [(a, b, r) for a, b, r in ranked if r is not None]
    shared = _shared_params(folded)
    seen, reference = None, None
    if example is not None and ranked:
        try:
            seen, reference = _observe(folded, {p for a, b, _ in ranked for p in (a, b)}, example)
        except Exception as exc:  # the caller's own run of the model reports a bad example in its words
            logger.debug("example input fails (%s); folds are guarded by rank instead of measured", exc)
    chosen = []
    for layer_path, bn_path, rank in ranked:
        layer = folded.get_submodule(layer_path)
        if any(id(p) in shared for p in layer.parameters(recurse=False)):
            logger.info("%s not folded: %s shares its weight with another module", bn_path, layer_path)
        elif seen is not None and (len(seen[layer_path]) != 1 or len(seen[bn_path]) != 1):
            logger.info("%s not folded: %s and it are not each called once", bn_path, layer_path)
        elif seen is not None and seen[layer_path][0] != rank:
            logger.info("%s not folded: %s gives a %d-D output; the BN normalises dim 1, which holds the "
                        "layer's channels only for %d-D", bn_path, layer_path, seen[layer_path][0], rank)
        else:
            chosen.append((layer_path, bn_path, rank))
    undo = [(pair, _fold_pair(folded, *pair)) for pair in chosen]
    if reference is not None and chosen and not _exact(reference, folded, example):
        # Some fold changes the output (e.g. the layer's output is also used past the BN): keep each only if exact.
        for (layer_path, bn_path, _), saved in reversed(undo):  # back to the unfolded model, no second copy
            _unfold_pair(folded, layer_path, bn_path, saved)
        kept = []
        for layer_path, bn_path, rank in chosen:
            saved = _fold_pair(folded, layer_path, bn_path, rank)
            if _exact(reference, folded, example):
                kept.append((layer_path, bn_path, rank))
            else:
                _unfold_pair(folded, layer_path, bn_path, saved)
                logger.info("%s not folded: folding it into %s changes the output", bn_path, layer_path)
        chosen = kept
    left = [p for p, m in folded.named_modules() if isinstance(m, _BATCHNORM)]
    if left:
        logger.warning("BatchNorm not folded (not directly after a conv/linear, or not exact for these shapes): "
                       "%s; coremltools will fold it and rename the weight", ", ".join(left))
    logger.info("folded %d BatchNorm layer(s)", len(chosen))
    return folded
