"""The straightforward trial, measured with coremltools itself: the yardstick for the fast sweep.

One trial: coremltools compresses the ``.mlpackage`` with an op_name config for that one layer,
``decompress_weights`` expands it back to fp16, every const is copied into the BN-folded torch
model, and the model is evaluated in full. Slow (two MIL pipelines per trial) but independent of
the simulation engine, so tests and the benchmark use it to check and time the sweep.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

from torch import nn

from ..determinism import single_threaded
from ..evaluation.weights import decompressed_consts, load_consts
from ..errors import SpecError
from ..spec import CompensatedSpec, Spec, parse_spec
from .layers import Layer

logger = logging.getLogger(__name__)

_PASSES = {"quantize": "linear_quantize_weights", "palettize": "palettize_weights", "prune": "prune_weights"}


def compress_one_layer(mlmodel, layer: Layer, spec: Spec | str, lut_function: Optional[Callable] = None):
    """The MLModel with only ``layer`` compressed by ``spec`` (op_name config keyed by its const name)."""
    import coremltools.optimize.coreml as cto

    spec = parse_spec(spec)
    if isinstance(spec, CompensatedSpec):  # its biases and LUTs come from calibration statistics, not a config
        raise SpecError(f"spec {spec}", "is not one coremltools pass (compensated from calibration data)",
                        "measure it with coreml_opt.compress.compress(..., statistics=...)")
    out = mlmodel
    for position, part in enumerate(spec.parts):
        if part.technique == "palettize" and lut_function is not None:
            config = part.coreml_config(0, lut_function=lut_function)
        else:
            config = part.coreml_config(0)
        technique = "quantize" if part.technique == "lut" else part.technique
        # After a first pass the const is renamed; later passes find the weight by its consumer op.
        name = layer.coreml_name if position == 0 else _consumer_op(out, layer.coreml_name)
        opt = cto.OptimizationConfig(op_name_configs={name: config})
        with single_threaded():  # as compress() runs it: scikit-learn's k-means depends on the thread count
            out = getattr(cto, _PASSES[technique])(out, opt, joint_compression=position > 0)
    return out


def _consumer_op(mlmodel, const_name: str) -> str:
    for op in mlmodel._mil_program.functions["main"].operations:
        if any(const_name in (getattr(v, "name", "") or "") for v in op.inputs.values()
               if not isinstance(v, (list, tuple))) and not op.op_type.startswith("constexpr"):
            return op.name
    raise KeyError(const_name)


def coreml_trial(mlmodel, folded: nn.Module, layer: Layer, spec: Spec | str,
                 evaluate: Callable[[nn.Module], float], lut_function: Optional[Callable] = None) -> float:
    """The metric of ``folded`` with the weights coremltools emits when it compresses only ``layer``."""
    compressed = compress_one_layer(mlmodel, layer, spec, lut_function)
    return evaluate(load_consts(folded, decompressed_consts(compressed)))
