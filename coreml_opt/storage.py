"""Byte model: the exact bytes Core ML stores in ``weight.bin`` for a weight under a spec.

Each spec kind has one handler listing the tensors coremltools 9 emits for it (packed data,
LUTs, scales, zero points, masks). A tensor of fewer than 10 elements is stored inline in the
program, not in the weight file (coremltools ``should_use_weight_file``); every other one takes a
64-byte header plus its data padded to 64 bytes. Data-dependent counts (non-zeros after pruning,
unique values) are exact when the weight is given and estimated from the spec otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import singledispatch
from typing import Sequence

import numpy as np

from .model.program import blob_storage_bytes
from .spec import (JointSpec, LutQuantSpec, NoneSpec, PalettizeSpec, PruneSpec, QuantSpec, Spec,
                   ThresholdPruneSpec, channel_axis, input_axis)

INLINE_MAX_ELEMENTS = 9  # coremltools keeps tensors of < 10 elements inside the program


@dataclass(frozen=True)
class TensorCost:
    """One tensor coremltools emits for a compressed weight."""

    role: str
    count: int
    bits: int

    @property
    def data_bytes(self) -> int:
        return math.ceil(self.count * self.bits / 8)

    @property
    def stored_bytes(self) -> int:
        return 0 if self.count <= INLINE_MAX_ELEMENTS else blob_storage_bytes(self.data_bytes)


@dataclass(frozen=True)
class WeightContext:
    """What the byte model needs to know about one weight."""

    shape: tuple[int, ...]
    op_type: str = "linear"
    ios18_ops: bool = True  # False: model's opset is iOS16/17 (constexpr_affine_dequantize etc.)
    weight: np.ndarray | None = None  # the stored weight, for data-dependent counts
    precision: str = "fp16"  # the stored const's precision: LUTs, scales and kept values are written in it

    @property
    def float_bits(self) -> int:
        return 32 if self.precision == "fp32" else 16

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def channels(self) -> int:
        axis = channel_axis(self.op_type)
        return int(self.shape[axis]) if len(self.shape) > axis else 1


def predicted_bytes(spec: Spec | str, shape: Sequence[int], op_type: str = "linear", *, ios18_ops: bool = True,
                    weight: np.ndarray | None = None, precision: str = "fp16") -> int:
    """Bytes in ``weight.bin`` for one weight of ``shape`` compressed with ``spec``.

    ``precision`` is the stored const's ("fp32" for packages converted in fp32: coremltools then
    writes fp32 values, LUTs and scales)."""
    from .spec import parse_spec

    ctx = WeightContext(tuple(int(d) for d in shape), op_type, ios18_ops, weight, precision)
    return sum(t.stored_bytes for t in _tensors(parse_spec(spec), ctx))


@singledispatch
def _tensors(spec: Spec, ctx: WeightContext) -> list[TensorCost]:
    raise TypeError(f"no byte model registered for {type(spec).__name__}")


@_tensors.register
def _(spec: NoneSpec, ctx: WeightContext) -> list[TensorCost]:
    return [TensorCost("val", ctx.numel, ctx.float_bits)]


def _quant_param_count(spec: QuantSpec, ctx: WeightContext) -> int:
    if spec.granularity == "per_tensor":
        return 1
    if spec.granularity == "per_channel":
        return ctx.channels
    in_axis = input_axis(ctx.op_type)
    return ctx.channels * (ctx.shape[in_axis] // spec.block_size)


def _quant_scale_offset(spec: QuantSpec, ctx: WeightContext) -> list[TensorCost]:
    count = _quant_param_count(spec, ctx)
    out = [TensorCost("scale", count, ctx.float_bits)]
    if not ctx.ios18_ops:
        out.append(TensorCost("zero_point", count, 8))  # constexpr_affine_dequantize always has one
    elif spec.mode == "linear" or spec.dtype.startswith("u"):
        out.append(TensorCost("offset", count, spec.nbits))
    return out


@_tensors.register
def _(spec: QuantSpec, ctx: WeightContext) -> list[TensorCost]:
    return [TensorCost("data", ctx.numel, spec.nbits), *_quant_scale_offset(spec, ctx)]


def unique_nbits(weight: np.ndarray | None, precision: str = "fp16") -> int:
    """Palette bits coremltools' unique mode picks for ``weight`` stored in ``precision`` (8 when unknown)."""
    if weight is None:
        return 8
    count = len(np.unique(np.asarray(weight, dtype=np.float16 if precision == "fp16" else np.float32)))
    for nbits in (1, 2, 3, 4, 6, 8):
        if count <= 1 << nbits:
            return nbits
    return 8


def _palette(spec: PalettizeSpec, ctx: WeightContext, index_count: int, lut_bits: int | None = None) -> list[TensorCost]:
    nbits = spec.nbits if spec.nbits is not None else unique_nbits(ctx.weight, ctx.precision)
    lut_bits = lut_bits or ctx.float_bits
    groups = ctx.channels // spec.group_size if spec.group_size else 1
    if not ctx.ios18_ops:
        return [TensorCost("indices", math.ceil(index_count * nbits / 8), 8), TensorCost("lut", 1 << nbits, lut_bits)]
    lut_count = groups * (1 << nbits) * spec.cluster_dim
    out = [TensorCost("indices", index_count // spec.cluster_dim, nbits)]
    if spec.per_channel_scale:
        # coremltools folds the scale (max |w| over the channel axis) into a LUT per position.
        positions = ctx.numel // ctx.channels
        out.append(TensorCost("scale", positions, ctx.float_bits))
        lut_count *= positions
    out.append(TensorCost("lut", lut_count, lut_bits))
    return out


@_tensors.register
def _(spec: PalettizeSpec, ctx: WeightContext) -> list[TensorCost]:
    return _palette(spec, ctx, ctx.numel)


def nonzero_count(spec: PruneSpec | ThresholdPruneSpec, ctx: WeightContext) -> int:
    """Non-zeros left by pruning: exact from the weight when given, else from the spec's sparsity."""
    n = ctx.numel
    if ctx.weight is not None:
        import torch

        from .simulate import default_cache  # exact: count what coremltools' pruning keeps (cached)

        weight = torch.from_numpy(np.array(ctx.weight, dtype=np.float32))  # a copy: package reads are read-only
        return int(torch.count_nonzero(default_cache().get(spec, weight, ctx.op_type, precision=ctx.precision).weight))
    if isinstance(spec, ThresholdPruneSpec):
        return n - int(round(spec.minimum_sparsity_percentile * n))  # the least sparsity it accepts
    return n - int(round(spec.sparsity * n))


def _prune_mask(ctx: WeightContext) -> TensorCost:
    return TensorCost("mask", ctx.numel, 1) if ctx.ios18_ops else TensorCost("mask", math.ceil(ctx.numel / 8), 8)


@_tensors.register(PruneSpec)
@_tensors.register(ThresholdPruneSpec)
def _(spec: Spec, ctx: WeightContext) -> list[TensorCost]:
    return [_prune_mask(ctx), TensorCost("nonzero_data", nonzero_count(spec, ctx), ctx.float_bits)]


@_tensors.register
def _(spec: LutQuantSpec, ctx: WeightContext) -> list[TensorCost]:
    raise TypeError("lut8 has no byte model of its own: it only exists inside a joint spec")


@_tensors.register
def _(spec: JointSpec, ctx: WeightContext) -> list[TensorCost]:
    steps = {step.technique: step for step in spec.steps}
    prune, palette, quant, lut = (steps.get(k) for k in ("prune", "palettize", "quantize", "lut"))
    out: list[TensorCost] = []
    count = ctx.numel
    if prune is not None:
        out.append(_prune_mask(ctx))
        count = nonzero_count(prune, ctx)
    if palette is not None:
        out += _palette(palette, ctx, count, 8 if lut is not None else None)
    if quant is not None:
        out.append(TensorCost("data_mask", ctx.numel, 1))  # sparse quantization repeats the mask
        out.append(TensorCost("nonzero_data", count, quant.nbits))
        out += _quant_scale_offset(quant, ctx)
    return out
