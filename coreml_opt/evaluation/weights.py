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
    return out
