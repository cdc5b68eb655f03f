"""Linear weight quantization exactly as ``linear_quantize_weights`` computes it.

Mirrors ``optimize/_utils.compute_qparams_by_dtype`` + ``quantize_weight_by_dtype``: blocks from
``infer_block_sizes``; min/max, scale and zero point in fp16; ``round(fp16(w / scale))`` (ties to
even), zero point added, clipped. Decompression (iOS18 ``constexpr_blockwise_shift_scale`` and
iOS16 ``constexpr_affine_dequantize`` agree) is ``fp16(scale * (q - offset))``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..spec import LutQuantSpec, QuantSpec, channel_axis, input_axis
from .core import SimResult, register_handler, skipped
from .numerics import h


def quant_range(nbits: int, signed: bool, symmetric: bool) -> tuple[int, int]:
    """coremltools ``get_quant_range``: symmetric drops the most negative (or top unsigned) code."""
    if not signed:
        return 0, (1 << nbits) - 1 - (1 if symmetric else 0)
    return -(1 << (nbits - 1)) + (1 if symmetric else 0), (1 << (nbits - 1)) - 1


def block_sizes(spec: QuantSpec, shape: tuple[int, ...], op_type: str) -> list[int]:
    """coremltools ``infer_block_sizes`` for a weight consumed by ``op_type`` (0 = whole axis)."""
    sizes = [0] * len(shape)
    if spec.granularity == "per_tensor":
        return sizes
    out_axis, in_axis = channel_axis(op_type), input_axis(op_type)
    if spec.granularity == "per_block" and in_axis < len(sizes):
        sizes[in_axis] = spec.block_size
    if out_axis < len(sizes):
        sizes[out_axis] = 1
    return sizes


@dataclass
class Quantized:
    """Quantized codes plus fp16 scale and optional offset, kept in the blocked layout."""

    data: torch.Tensor  # codes, blocked shape
    scale: torch.Tensor  # broadcastable to the blocked shape
    offset: torch.Tensor | None
    param_shape: list[int]  # coremltools' scale/offset shape (one entry per weight axis)

    def dequantize(self, shape: tuple[int, ...]) -> torch.Tensor:
        """``fp16(scale * (q - offset))`` broadcast over each block, in the weight's shape."""
        q = self.data.to(torch.float32)
        if self.offset is not None:
            q = q - self.offset
        return h(self.scale * q).reshape(shape)

    def params(self, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        out = {"data": self.data.reshape(shape).to(torch.int16), "scale": self.scale.reshape(self.param_shape)}
        if self.offset is not None:
            out["offset"] = self.offset.reshape(self.param_shape).to(torch.int16)
        return out


def quantize_values(w16: torch.Tensor, nbits: int, signed: bool, symmetric: bool,
                    sizes: list[int]) -> Quantized | None:
    """``compute_qparams_by_dtype`` on fp16 values ``w16``; None when a block does not divide."""
    blocked, param_shape, keep = [], [], []
    for dim, size in zip(w16.shape, sizes):
        if size > 0:
            if dim % size:
                return None
            keep.append(len(blocked))
            blocked += [dim // size, size]
            param_shape.append(dim // size)
        else:
            blocked.append(dim)
            param_shape.append(1)
    reduce = tuple(i for i in range(len(blocked)) if i not in keep)
    x = w16.reshape(blocked)
    vmin = x.amin(dim=reduce, keepdim=True) if reduce else x.clone()
    vmax = x.amax(dim=reduce, keepdim=True) if reduce else x.clone()
    qmin, qmax = quant_range(nbits, signed, symmetric)
    if symmetric:
        vmax = torch.maximum(vmin.abs(), vmax.abs())
        vmin = -vmax
    else:
        vmin = torch.clamp(vmin, max=0.0)
        vmax = torch.clamp(vmax, min=0.0)
    span = h(vmax - vmin)
    scale = h(span / (qmax - qmin))
    with torch.no_grad():
        q = torch.round(h(x / scale))
    offset = None
    if symmetric and not signed:
        offset = torch.full_like(scale, float(qmax // 2))
    elif not symmetric:
        zp = h(h(qmin * vmax) - h(qmax * vmin))
        offset = torch.clamp(torch.round(h(zp / span)), qmin, qmax)
    if offset is not None:
        q = h(q + offset)
    q = torch.clamp(q, qmin, qmax)
    # An all-zero block has scale 0: numpy gets NaN codes, but they dequantize to 0 all the same.
    q = torch.nan_to_num(q, nan=0.0)
    if offset is not None:
        offset = torch.nan_to_num(offset, nan=0.0)
    return Quantized(q, scale, offset, param_shape)


def quantize_lut(lut: torch.Tensor, spec: LutQuantSpec) -> torch.Tensor:
    """A palette quantized per tensor, symmetric, to 8 bits and decompressed (``palN+lut8``)."""
    signed = spec.dtype == "int8"
    quant = quantize_values(lut, 8, signed, True, [0] * lut.dim())
    return quant.dequantize(tuple(lut.shape))


def quantize_weight(spec: QuantSpec, w16: torch.Tensor, op_type: str) -> tuple[Quantized | None, str | None]:
    """Quantize ``w16`` as coremltools would; (None, reason) when it would skip the weight."""
    sizes = block_sizes(spec, tuple(w16.shape), op_type)
    quant = quantize_values(w16, spec.nbits, not spec.dtype.startswith("u"),
                            spec.mode == "linear_symmetric", sizes)
    if quant is None:
        return None, f"block size {spec.block_size} does not divide the weight's shape {tuple(w16.shape)}"
    return quant, None


@register_handler(QuantSpec)
def simulate_quant(spec: QuantSpec, w16: torch.Tensor, op_type: str, kmeans: str) -> SimResult:
    quant, reason = quantize_weight(spec, w16, op_type)
    if quant is None:
        return skipped(w16, reason, spec)
    return SimResult(quant.dequantize(tuple(w16.shape)), quant.params(tuple(w16.shape)))
