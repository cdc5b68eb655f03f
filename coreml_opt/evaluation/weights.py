"""Weights stored in a package read back into torch: decompressed const values, and a model holding them.

Used to evaluate what a package stores with the torch backend (workflow exports, the coremltools yardstick).
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from torch import nn

from ..model.convert import find_const

logger = logging.getLogger(__name__)


def decompressed_consts(mlmodel) -> dict[str, np.ndarray]:
    """Const name -> value of every tensor const after ``decompress_weights``."""
    import coremltools.optimize.coreml as cto

    program = cto.decompress_weights(mlmodel)._mil_program
    out = {}
    for op in program.functions["main"].operations:
        value = op.outputs[0].val if op.op_type == "const" else None
        if isinstance(value, np.ndarray) and value.dtype in (np.float16, np.float32):
            out[op.outputs[0].name] = value
    return out


def load_consts(model: nn.Module, consts: dict[str, np.ndarray]) -> nn.Module:
    """A copy of ``model`` whose parameters hold the Core ML consts (decompressed names included)."""
    out = copy.deepcopy(model).eval()
    shapes = {name: value.shape for name, value in consts.items()}
    with torch.no_grad():
        for path, param in out.named_parameters():
            name = find_const(path, tuple(param.shape), shapes, allow_renamed=True)
            value = consts[name] if name is not None else None
            if value is None:
                logger.debug("no Core ML const for %s; using its fp16 rounding", path)
                param.copy_(param.to(torch.float16).to(param.dtype))
            else:
                param.copy_(torch.from_numpy(value.astype(np.float32)))
        _add_corrected_biases(out, consts)
    return out


def _add_corrected_biases(model: nn.Module, consts: dict[str, np.ndarray]) -> None:
    """Give a bias-free conv/linear the bias a bias-corrected spec (+bc) added to its op in the package
    (``<weight const>_corrected_bias``), so the torch model computes what the package does."""
    added = {name[: -len("_corrected_bias")]: value for name, value in consts.items()
             if name.endswith("_corrected_bias")}
    if not added:
        return
    shapes = {name: value.shape for name, value in consts.items()}
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) or module.bias is not None or weight is None:
            continue
        name = find_const(f"{path}.weight" if path else "weight", tuple(weight.shape), shapes, allow_renamed=True)
        base = next((b for b in added if name is not None and name.startswith(b)), None)
        if base is not None:
            module.bias = nn.Parameter(torch.from_numpy(added[base].astype(np.float32)), requires_grad=False)
