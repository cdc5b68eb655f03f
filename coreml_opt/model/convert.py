"""PyTorch -> Core ML conversion that keeps torch parameter names.

coremltools renames a conv weight to ``const_N`` when it folds BatchNorm itself,
so we fold BN in PyTorch first; the traced weights then keep their paths
(``features.3.weight`` -> ``features_3_weight_to_fp16``). The torch <-> Core ML
name mapping is read back from the converted program and stored in the model's
user-defined metadata, so later stages can name layers both ways.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Mapping, Optional, Union

import coremltools as ct
import torch
from torch import nn

from coreml_opt.errors import ModelError
from coreml_opt.model.package import TORCH_NAMES_KEY, read_torch_names, save_package  # noqa: F401 (re-export)
from coreml_opt.targets import DEFAULT_TARGET, TargetLike, parse_target

logger = logging.getLogger(__name__)


_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)


# --------------------------------------------------------------------------- factories

def load_factory(spec: str) -> nn.Module:
    """Import ``package.module:factory`` (or ``path/to/file.py:factory``) and call it with no arguments; returns
    an nn.Module. Errors name ``spec`` as given and the fix for that form (see :mod:`coreml_opt.imports`)."""
    from ..imports import call_without_arguments, import_callable

    model = call_without_arguments(import_callable(spec, ModelError), spec, ModelError)
    if not isinstance(model, nn.Module):
        raise ModelError(spec, f"factory returned {type(model).__name__}, not a torch.nn.Module",
                         "return the model instance from the factory")
    return model


# --------------------------------------------------------------------------- BN folding

def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` (eval statistics) into the weight and bias of ``layer`` in place."""
    with torch.no_grad():
        w = layer.weight
        dtype = w.dtype
        mean = bn.running_mean.double()
        var = bn.running_var.double()
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
        scale = gamma / torch.sqrt(var + bn.eps)
        shape = (-1,) + (1,) * (w.ndim - 1)
        new_w = (w.double() * scale.reshape(shape)).to(dtype)
        bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(mean)
        new_b = ((bias - mean) * scale + beta).to(dtype)
        w.copy_(new_w)
        if layer.bias is not None:
            layer.bias.copy_(new_b)
        else:
            layer.bias = nn.Parameter(new_b, requires_grad=w.requires_grad)


def _can_fold(layer: nn.Module, bn: nn.Module) -> bool:
    """True when ``bn`` normalises exactly the output channels of ``layer`` with running stats."""
    if not isinstance(layer, _FOLDABLE) or not isinstance(bn, _BATCHNORM):
        return False
    if bn.running_mean is None or bn.running_var is None:
        return False  # batch statistics at inference: cannot be folded
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    return out == bn.num_features


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


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` with ``new``."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Deep copy of ``model`` in eval mode with each BN after a conv/linear folded into it.

    The BN becomes ``nn.Identity``; the conv/linear keeps its parameter path and
    gains a bias if it had none. Outputs match the original within fp32 rounding.
    """
    folded = copy.deepcopy(model).eval()
    pairs = _pairs_fx(folded)
    if pairs is None:
        pairs = _pairs_sequential(folded)
    done = 0
    for layer_path, bn_path in pairs:
        layer, bn = folded.get_submodule(layer_path), folded.get_submodule(bn_path)
        if not _can_fold(layer, bn):
            continue
        _fold_into(layer, bn)
        _set_submodule(folded, bn_path, nn.Identity())
        done += 1
        logger.debug("folded %s into %s", bn_path, layer_path)
    left = [p for p, m in folded.named_modules() if isinstance(m, _BATCHNORM)]
    if left:
        logger.warning("BatchNorm not folded (not directly after a conv/linear): %s; "
                       "coremltools will fold it and rename the weight", ", ".join(left))
    logger.info("folded %d BatchNorm layer(s)", done)
    return folded


# --------------------------------------------------------------------------- conversion

def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def weight_consts(mlmodel: ct.models.MLModel) -> dict[str, tuple[int, ...]]:
    """Core ML const names stored in the weight file (blobFileValue) -> shape, in program order."""
    spec = mlmodel.get_spec()
    if not spec.HasField("mlProgram"):
        raise ModelError("model", "is not an ML Program", "convert with convert_to='mlprogram'")
    out: dict[str, tuple[int, ...]] = {}
    for func in spec.mlProgram.functions.values():
        for block in func.block_specializations.values():
            for op in block.operations:
                if op.type != "const" or "val" not in op.attributes:
                    continue
                if op.attributes["val"].WhichOneof("value") != "blobFileValue":
                    continue
                for output in op.outputs:
                    dims = output.type.tensorType.dimensions
                    out[output.name] = tuple(int(d.constant.size) for d in dims)
    return out


# A traced parameter's const: its path with '.' -> '_' plus one of these (fp16 cast, or a compressed
# weight that torch-side compression emitted through a cast), or nothing (fp32 programs).
CONST_SUFFIXES = ("_to_fp16", "_cast_fp16", "")


def const_name(param_path: str) -> str:
    """The Core ML const a traced torch parameter becomes (``features.3.weight`` -> ``features_3_weight_to_fp16``)."""
    return param_path.replace(".", "_") + CONST_SUFFIXES[0]


def find_const(param_path: str, shape: tuple[int, ...], const_shapes: Mapping[str, tuple[int, ...]],
               allow_renamed: bool = False) -> str | None:
    """The const of ``const_shapes`` (name -> shape) holding a torch parameter, matched by name and shape.

    ``allow_renamed`` also accepts names that extend it (``..._to_fp16_palettized`` after a compression pass)."""
    base = param_path.replace(".", "_")
    for suffix in CONST_SUFFIXES:
        if tuple(const_shapes.get(base + suffix, ())) == tuple(shape):
            return base + suffix
    if allow_renamed:
        return next((name for name, s in const_shapes.items()
                     if name.startswith(base + "_") and tuple(s) == tuple(shape)), None)
    return None


def torch_name_mapping(model: nn.Module, mlmodel: ct.models.MLModel) -> dict[str, str]:
    """Map Core ML const name -> torch parameter path for every torch weight with ndim >= 2."""
    consts = weight_consts(mlmodel)
    mapping: dict[str, str] = {}
    missing = []
    for path, param in model.named_parameters():
        if param.ndim < 2:
            continue
        name = find_const(path, tuple(param.shape), consts)
        if name is None:
            missing.append(path)
        else:
            mapping[name] = path
    if missing:
        logger.warning("no Core ML weight const found for: %s", ", ".join(missing))
    return mapping


def convert(model: Union[nn.Module, str], input_shape: tuple[int, ...], *,
            target: TargetLike = DEFAULT_TARGET, output_path: Union[str, Path, None] = None,
            input_name: str = "x") -> tuple[ct.models.MLModel, dict[str, str]]:
    """Fold BN, trace and convert to an fp16 ML Program; returns (mlmodel, {const: torch path}).

    ``model`` may be an nn.Module or a ``package.module:factory`` string. The
    mapping is also stored in ``mlmodel.user_defined_metadata[TORCH_NAMES_KEY]``.
    """
    label = model if isinstance(model, str) else type(model).__name__
    if isinstance(model, str):
        model = load_factory(model)
    ct_target = parse_target(target)
    shape = tuple(int(d) for d in input_shape)
    folded = fold_batchnorm(model)
    example = torch.rand(shape)
    try:
        with torch.no_grad():
            folded(example)
    except Exception as exc:
        raise ModelError(label, f"fails on an example input of shape {list(shape)} "
                         f"({type(exc).__name__}: {_first_line(exc)})",
                         "pass the input shape the model expects") from exc
    try:
        with torch.no_grad():
            traced = torch.jit.trace(folded, example)
    except Exception as exc:
        raise ModelError(label, f"cannot be traced with torch.jit.trace ({_first_line(exc)})",
                         "remove data-dependent control flow from forward()") from exc
    try:
        mlmodel = ct.convert(
            traced,
            inputs=[ct.TensorType(name=input_name, shape=shape)],
            convert_to="mlprogram",
            minimum_deployment_target=ct_target,
            compute_precision=ct.precision.FLOAT16,
        )
    except Exception as exc:
        raise ModelError(label, f"coremltools could not convert it "
                         f"({type(exc).__name__}: {_first_line(exc)})",
                         "check the op is supported by coremltools 9.0") from exc
    mapping = torch_name_mapping(folded, mlmodel)
    mlmodel.user_defined_metadata[TORCH_NAMES_KEY] = json.dumps(mapping, sort_keys=True)
    if output_path is not None:
        save_package(mlmodel, output_path)
        logger.info("saved %s", output_path)
    return mlmodel, mapping
