"""Joint compression: coremltools passes chained with ``joint_compression=True``, and ``none``.

prune -> palettize/quantize: the second pass compresses the *dense* pruned weight (zeros
included, so k-means sees them) and only the surviving positions keep its values.
palettize -> lut8: the fp16 palette is quantized per tensor; indices are not re-assigned. A
palette of fewer than 10 entries stays inline in the program and is not quantized.
"""
from __future__ import annotations

import torch

from ..spec import JointSpec, NoneSpec, QuantSpec
from .core import SimResult, register_handler, skipped
from .palettize import palettize
from .prune import prune_values
from .quantize import quantize_lut, quantize_weight

LUT_INLINE_MAX = 9  # should_use_weight_file: fewer than 10 values stay in the program


@register_handler(NoneSpec)
def simulate_none(spec: NoneSpec, w16: torch.Tensor, op_type: str, kmeans: str) -> SimResult:
    return SimResult(w16, {})


@register_handler(JointSpec)
def simulate_joint(spec: JointSpec, w16: torch.Tensor, op_type: str, kmeans: str) -> SimResult:
    steps = {step.technique: step for step in spec.steps}
    params: dict = {}
    notes: list[str] = []
    mask = None
    dense = w16
    if "prune" in steps:
        pruned = prune_values(steps["prune"], w16, op_type)
        if isinstance(pruned, str):
            notes.append(f"pruning skipped: {pruned}")
        else:
            dense, mask = pruned, pruned != 0
            params["mask"] = mask
    if "quantize" in steps:
        quant, reason = quantize_weight(steps["quantize"], dense, op_type)
        if quant is None:
            notes.append(f"quantization skipped: {reason}")
        else:
            dense = quant.dequantize(tuple(dense.shape))
            params.update(quant.params(tuple(dense.shape)))
    if "palettize" in steps:
        pal = palettize(steps["palettize"], dense, op_type, kmeans)
        if isinstance(pal, str):
            notes.append(f"palettization skipped: {pal}")
            if "lut" in steps:  # the lut8 quantizer then finds the plain weight: int8 per tensor
                quant, _ = quantize_weight(QuantSpec(steps["lut"].dtype, granularity="per_tensor"), dense, op_type)
                dense = quant.dequantize(tuple(dense.shape))
                params.update(quant.params(tuple(dense.shape)))
        else:
            lut = pal.lut
            lut_step = steps.get("lut")
            if lut_step is not None and lut.numel() > LUT_INLINE_MAX:
                lut = quantize_lut(lut, lut_step)
            elif lut_step is not None:
                notes.append(f"lut8 skipped: a {lut.numel()}-entry palette is stored inline")
            dense = pal.dense(lut)
            params.update(pal.params())
            params["lut"] = lut
    if mask is not None:
        dense = torch.where(mask, dense, torch.zeros_like(dense))
    if notes and len(notes) == len(spec.steps):
        return skipped(w16, "; ".join(notes), spec)
    return SimResult(dense, params, "; ".join(notes) or None)
