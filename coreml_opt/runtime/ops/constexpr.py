"""Constexpr (compressed-weight) ops of iOS16/17 and iOS18, decompressed with coremltools' own arithmetic.

Each follows the op's ``decompress`` in coremltools 9 (``ops/defs/iOS16/constexpr_ops.py``,
``ops/defs/iOS18/compression.py``, ``optimize/_utils.py``): same dtypes, same order of operations, so the
result equals ``decompress_weights`` bit for bit. They run once, when the graph is built.
"""
from __future__ import annotations

import numpy as np
import torch

from .registry import Args, Context, Node, Out, ints, register

_TORCH_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def _promote(param: torch.Tensor, data: torch.Tensor, axis) -> torch.Tensor:
    """Reshape a per-axis scale/zero point to data's rank (``promote_rank_to_same_as_data``)."""
    if param.dim() == data.dim():
        return param
    if param.numel() == 1:
        return param.reshape([1] * data.dim())
    shape = [1] * data.dim()
    shape[int(axis) % data.dim()] = param.numel()
    return param.reshape(shape)


def _repeat_as(param: torch.Tensor, shape) -> torch.Tensor:
    """Interleaved repeat of the leading dims of ``param`` up to ``shape`` (``repeat_data_as``)."""
    for axis, size in enumerate(shape):
        if param.shape[axis] != size:
            param = param.repeat_interleave(size // param.shape[axis], dim=axis)
    return param


def _unpack_bits(packed: torch.Tensor, nbits: int, count: int) -> torch.Tensor:
    from coremltools.optimize._utils import restore_elements_from_packed_bits

    values = restore_elements_from_packed_bits(packed.cpu().numpy().astype(np.uint8).reshape(-1), nbits, count)
    return torch.from_numpy(values.astype(np.int64)).to(packed.device)


@register("constexpr_affine_dequantize")
def affine_dequantize(a: Args, node: Node, ctx: Context) -> Out:
    """iOS16: ((q - zero_point) * scale) in fp32, then cast to the scale's dtype."""
    q, zp, scale, axis = a["quantized_data"], a["zero_point"], a["scale"], a["axis"]
    data = q.to(torch.float32)
    zp = _promote(torch.as_tensor(zp), q, axis).to(torch.float32).to(q.device)
    scale_t = _promote(torch.as_tensor(scale), q, axis).to(q.device)
    return ((data - zp) * scale_t.to(torch.float32)).to(scale_t.dtype)


@register("constexpr_cast")
def constexpr_cast(a: Args, node: Node, ctx: Context) -> Out:
    return a["source_val"].to(_TORCH_DTYPES[a["output_dtype"]])


@register("constexpr_lut_to_dense")
def lut_to_dense(a: Args, node: Node, ctx: Context) -> Out:
    """iOS16: packed indices into a flat LUT of 2**nbits entries. iOS18: per-block LUTs [..., palette, vector]."""
    indices, lut = a["indices"], a["lut"]
    if "shape" in a and a.get("shape") is not None:
        shape = ints(a["shape"])
        nbits = int(np.log2(lut.numel()))
        idx = _unpack_bits(indices, nbits, int(np.prod(shape)))
        return lut.reshape(-1)[idx].reshape(shape)
    vector_axis = a.get("vector_axis")
    return _lut_to_dense(indices, lut, vector_axis)


def _lut_to_dense(indices: torch.Tensor, lut: torch.Tensor, vector_axis) -> torch.Tensor:
    palette, vector = lut.shape[-2], lut.shape[-1]
    if vector > 1:
        vector_axis = int(vector_axis) % indices.dim()
        indices = indices.transpose(-1, vector_axis)
        lut = lut.transpose(-3, vector_axis)
    out_shape = list(indices.shape)
    if vector > 1:
        out_shape[-1] *= vector
    flat = indices.reshape(-1).long()
    repeated = _repeat_as(lut, indices.shape).reshape(flat.numel(), palette, vector)
    out = repeated[torch.arange(flat.numel(), device=flat.device), flat].reshape(out_shape)
    return out.transpose(-1, vector_axis) if vector > 1 else out


def _sparse_to_dense(nonzero: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(mask.shape, dtype=nonzero.dtype, device=nonzero.device)
    out[mask != 0] = nonzero
    return out


@register("constexpr_sparse_to_dense")
def sparse_to_dense(a: Args, node: Node, ctx: Context) -> Out:
    """iOS16: mask packed in uint8 bytes (LSB first) + shape. iOS18: uint1 mask of the dense shape."""
    nonzero, mask = a["nonzero_data"], a["mask"]
    if a.get("shape") is not None:
        shape = ints(a["shape"])
        bits = _unpack_bits(mask, 1, int(np.prod(shape))).reshape(shape)
        return _sparse_to_dense(nonzero, bits)
    return _sparse_to_dense(nonzero, mask)


def _shift_scale(data: torch.Tensor, scale: torch.Tensor, offset) -> torch.Tensor:
    data = data.to(scale.dtype)
    scale = _repeat_as(scale, data.shape)
    if offset is not None:
        offset = _repeat_as(offset, data.shape)
        data = data - offset
    return scale * data


@register("constexpr_blockwise_shift_scale")
def blockwise_shift_scale(a: Args, node: Node, ctx: Context) -> Out:
    """iOS18: scale * (data - offset) in the scale's dtype, scale/offset repeated per block."""
    return _shift_scale(a["data"], a["scale"], a.get("offset"))


@register("constexpr_lut_to_sparse")
def lut_to_sparse(a: Args, node: Node, ctx: Context) -> Out:
    """iOS18: (mask, non-zero values) of a LUT over sparse indices; vector LUTs widen the mask."""
    mask, lut, vector_axis = a["indices_mask"], a["lut"], a.get("vector_axis")
    indices = _sparse_to_dense(a["indices_nonzero_data"], mask)
    dense = _lut_to_dense(indices, lut, vector_axis)
    if vector_axis is not None and lut.shape[-1] > 1:
        mask = mask.repeat_interleave(lut.shape[-1], dim=int(vector_axis) % mask.dim())
    return mask, dense[mask != 0].reshape(-1)


@register("constexpr_sparse_blockwise_shift_scale")
def sparse_blockwise_shift_scale(a: Args, node: Node, ctx: Context) -> Out:
    """iOS18: (mask, non-zero values) of a quantized sparse weight."""
    mask = a["data_mask"]
    dense = _shift_scale(_sparse_to_dense(a["nonzero_data"], mask), a["scale"], a.get("offset"))
    return mask, dense[mask != 0].reshape(-1)
