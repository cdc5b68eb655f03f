"""Tensor-shape ops (iOS15/iOS17 ``tensor_transformation.py``, ``tensor_operation.py``, ``scatter_gather.py``).

Batching: packages usually declare batch 1. The batch axis of a tensor is the one whose declared size is 1
and whose run-time size is N (wherever transposes moved it). reshape carries it to the target dim that starts
at the same row-major offset when that dim is a literal 1; slice_by_index's [0:1] on it keeps the whole batch.
Other literal shapes are taken as written; where that breaks a batch the executable loops (graph.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Args, Context, Node, Out, axis_list, batch_axis, ints, register

_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "int32": torch.int32, "int64": torch.int64,
           "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}
_UNSIGNED_WIDE = {"uint16": (16, torch.int32), "uint32": (32, torch.int64)}




@register("const")
def const(a: Args, node: Node, ctx: Context) -> Out:
    return a["val"]


@register("reshape")
def reshape(a: Args, node: Node, ctx: Context) -> Out:
    x = a["x"]
    shape = ints(a["shape"])
    axis = batch_axis(node, ctx, x)
    if axis is not None:
        offset = 1
        for size in ctx.static_shape(node, "x")[:axis]:
            offset *= size
        running = 1
        for j, size in enumerate(shape):
            if running == offset and size == 1:
                shape[j] = x.shape[axis]
                break
            if size == -1:
                break
            running *= size
    return x.reshape(shape)


@register("flatten2d")
def flatten2d(a: Args, node: Node, ctx: Context) -> Out:
    x = a["x"]
    axis = a.get("axis", 1) % x.dim()
    return x.reshape(int(torch.tensor(x.shape[:axis]).prod()), -1)


@register("transpose")
def transpose(a: Args, node: Node, ctx: Context) -> Out:
    return a["x"].permute(ints(a["perm"]))


@register("expand_dims")
def expand_dims(a: Args, node: Node, ctx: Context) -> Out:
    x = a["x"]
    rank = x.dim() + len(ints(a["axes"]))
    for axis in sorted(v % rank for v in ints(a["axes"])):
        x = x.unsqueeze(axis)
    return x


@register("squeeze")
def squeeze(a: Args, node: Node, ctx: Context) -> Out:
    x = a["x"]
    if a.get("axes") is None:
        return x.squeeze()
    for axis in sorted(axis_list(a["axes"], x.dim()), reverse=True):
        x = x.squeeze(axis)
    return x


@register("concat")
def concat(a: Args, node: Node, ctx: Context) -> Out:
    values = [v if isinstance(v, torch.Tensor) else torch.as_tensor(v, device=ctx.device) for v in a["values"]]
    if a.get("interleave", False):
        axis = a["axis"] % values[0].dim()
        stacked = torch.stack(values, axis + 1)
        return stacked.flatten(axis, axis + 1)
    return torch.cat(values, dim=a["axis"])


@register("stack")
def stack(a: Args, node: Node, ctx: Context) -> Out:
    return torch.stack(list(a["values"]), dim=a["axis"])


@register("split")
def split(a: Args, node: Node, ctx: Context) -> Out:
    x = a["x"]
    axis = a["axis"]
    if a.get("split_sizes") is not None:
        return tuple(torch.split(x, ints(a["split_sizes"]), dim=axis))
    return tuple(torch.chunk(x, a["num_splits"], dim=axis))


@register("slice_by_index")
def slice_by_index(a: Args, node: Node, ctx: Context) -> Out:
    """Python-style slicing per dim with begin/end/squeeze masks; a negative stride flips the dim first."""
    x = a["x"]
    rank = x.dim()
    begin, end = ints(a["begin"]), ints(a["end"])
    stride = ints(a.get("stride") if a.get("stride") is not None else [1] * rank)
    begin_mask = a.get("begin_mask") or [False] * rank
    end_mask = a.get("end_mask") or [False] * rank
    squeeze_mask = a.get("squeeze_mask") or [False] * rank
    batched = batch_axis(node, ctx, x)
    index = []
    for d in range(rank):
        b = None if begin_mask[d] else begin[d]
        e = None if end_mask[d] else end[d]
        if d == batched and (b in (None, 0)) and e == 1 and not squeeze_mask[d]:
            e = None
        if squeeze_mask[d]:
            index.append(b if b is not None else 0)
            continue
        s = stride[d]
        if s < 0:
            raise NotImplementedError("slice_by_index with a negative stride")
        index.append(slice(b, e, s))
    return x[tuple(index)]


@register("slice_by_size")
def slice_by_size(a: Args, node: Node, ctx: Context) -> Out:
    x = a["x"]
    index = tuple(slice(b, None if s == -1 else b + s) for b, s in zip(ints(a["begin"]), ints(a["size"])))
    return x[index]


@register("gather")
def gather(a: Args, node: Node, ctx: Context) -> Out:
    """x.take along ``axis`` by ``indices`` of any shape (negative indices wrap); batch_dims leading dims shared."""
    x, idx = a["x"], a["indices"]
    if not isinstance(idx, torch.Tensor):
        idx = torch.as_tensor(idx, device=x.device)
    axis = a.get("axis", 0) % x.dim()
    batch_dims = a.get("batch_dims", 0)
    idx = idx.long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    if batch_dims == 0:
        out = x.index_select(axis, idx.reshape(-1))
        return out.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])
    results = [gather({"x": xi, "indices": ii, "axis": axis - 1, "batch_dims": batch_dims - 1}, node, ctx)
               for xi, ii in zip(x, idx)]
    return torch.stack(results)


@register("gather_along_axis")
def gather_along_axis(a: Args, node: Node, ctx: Context) -> Out:
    x, idx = a["x"], a["indices"].long()
    axis = a.get("axis", 0) % x.dim()
    return torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx))


@register("tile")
def tile(a: Args, node: Node, ctx: Context) -> Out:
    return a["x"].repeat(ints(a["reps"]))


@register("pad")
def pad(a: Args, node: Node, ctx: Context) -> Out:
    """``pad`` is [begin, end] per trailing dim, first dim first; modes constant/reflect/replicate."""
    x = a["x"]
    values = ints(a["pad"])
    pairs = [(values[2 * i], values[2 * i + 1]) for i in range(len(values) // 2)]
    while len(pairs) > 1 and pairs[0] == (0, 0):  # reflect/replicate pad only trailing dims in torch
        pairs.pop(0)
    flat = [p for pair in reversed(pairs) for p in pair]
    mode = a.get("mode", "constant")
    if mode == "constant":
        return F.pad(x, flat, value=float(a.get("constant_val", 0.0)))
    return F.pad(x, flat, mode={"reflect": "reflect", "replicate": "replicate"}[mode])


@register("shape")
def shape(a: Args, node: Node, ctx: Context) -> Out:
    return torch.tensor(a["x"].shape, dtype=torch.int32, device=ctx.device)


@register("fill")
def fill(a: Args, node: Node, ctx: Context) -> Out:
    return torch.full(ints(a["shape"]), float(a.get("value", 0.0)), device=ctx.device)


@register("cast")
def cast(a: Args, node: Node, ctx: Context) -> Out:
    """Float casts keep the compute dtype (fp32) and, in fp16 precision, the result is rounded by the graph."""
    x, name = a["x"], a["dtype"]
    if name in _UNSIGNED_WIDE:  # torch has no general uint16/uint32: wrap as Core ML does, keep in a wider int
        bits, wide = _UNSIGNED_WIDE[name]
        return (torch.trunc(x) if x.is_floating_point() else x).to(torch.int64).remainder(2 ** bits).to(wide)
    dtype = _DTYPES[name]
    if dtype.is_floating_point:
        return x.float() if not x.is_floating_point() else x
    if x.is_floating_point() and dtype != torch.bool:
        x = torch.trunc(x)
    return x.to(dtype)


@register("crop")
def crop(a: Args, node: Node, ctx: Context) -> Out:
    """Remove [begin, end] rows/columns from the last two dims (iOS15 ``image_resizing.crop``)."""
    x = a["x"]
    (top, bottom), (left, right) = ints(a["crop_height"]), ints(a["crop_width"])
    return x[..., top:x.shape[-2] - bottom, left:x.shape[-1] - right]
